"""Benchmark ``onnxpress compile`` (TVM, untuned) against onnxruntime on the bundled models.

  python tools/bench_tvm.py [--models cnn_mnist,transformer_mnist,gru_sunspots,mlp_digits]
                            [--rounds 7] [--iters 50] [--markdown]

For each model at batch 1: compile for this CPU twice (TVM's plain CPU pipeline, and with
onnxpress's default parallel/vector schedules), then time the two TVM libraries and an
onnxruntime session (all graph optimizations, threads = CPU count) in interleaved rounds on
the same input; report each round's mean per call and the median over rounds, and the
TVM / ORT ratio (> 1: TVM is slower).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxpress.tvm_backend import CompiledModel, compile_model

MODELS = Path(__file__).resolve().parents[1] / "models"
DEFAULT_MODELS = "cnn_mnist,transformer_mnist,gru_sunspots,mlp_digits"


def _time(fn: Callable[[], Any], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def _caller(lib: CompiledModel, arrays: list[np.ndarray]) -> Callable[[], Any]:
    return lambda: lib(*arrays)


def bench_model(name: str, rounds: int, iters: int, folder: Path) -> dict[str, Any]:
    path = MODELS / f"{name}.onnx"
    row: dict[str, Any] = {"model": name}
    libraries: dict[str, CompiledModel] = {}
    feed: dict[str, np.ndarray] = {}
    for label, schedules in (("tvm_plain", False), ("tvm_default", True)):
        start = time.perf_counter()
        result = compile_model(path, "x86", folder / f"{name}-{label}",
                               default_schedules=schedules)
        row[f"{label}_compile_s"] = time.perf_counter() - start
        libraries[label] = CompiledModel(result.library)
        rng = np.random.default_rng(0)
        feed = {e["name"]: rng.standard_normal(e["shape"]).astype(e["dtype"])
                for e in result.manifest["inputs"]}
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    arrays = list(feed.values())
    runners: dict[str, Callable[[], Any]] = {"ort": lambda: session.run(None, feed)}
    for label, lib in libraries.items():
        runners[label] = _caller(lib, arrays)
    for run in runners.values():  # warm up
        run()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            samples[label].append(_time(run, iters))
    for label, values in samples.items():
        row[f"{label}_ms"] = statistics.median(values) * 1e3
    row["ratio_plain"] = row["tvm_plain_ms"] / row["ort_ms"]
    row["ratio_default"] = row["tvm_default_ms"] / row["ort_ms"]
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model (batch 1) | ORT ms | TVM plain ms | ratio | TVM + default schedules ms | ratio | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ort_ms']:.3f} | {r['tvm_plain_ms']:.3f} | "
            f"{r['ratio_plain']:.1f}× | {r['tvm_default_ms']:.3f} | {r['ratio_default']:.1f}× | "
            f"{r['tvm_default_compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(bench_model(name.strip(), args.rounds, args.iters, Path(tmp)))
            print(f"done {name}", file=sys.stderr)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"medians of {args.rounds} interleaved rounds of {args.iters} calls")
    if args.markdown:
        print(markdown(rows))
    else:
        for row in rows:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
