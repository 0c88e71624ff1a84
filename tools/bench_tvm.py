"""Benchmark ``onnxpress compile`` (TVM, untuned and tuned) against onnxruntime.

  python tools/bench_tvm.py [--models cnn_mnist,transformer_mnist,gru_sunspots,mlp_digits]
                            [--rounds 7] [--iters 50] [--markdown]
                            [--tune-trials N [--tuning-db DIR]]

For each model at batch 1: compile for this CPU twice (TVM's plain CPU pipeline, and with
onnxpress's default parallel/vector schedules), with --tune-trials a third time with N
MetaSchedule trials (into a fresh database unless --tuning-db is given, so the tuning time
is that of N trials), then time the TVM libraries and an onnxruntime session (all graph
optimizations, threads = CPU count) in interleaved rounds on the same input; report each
round's mean per call and the median over rounds, and the TVM / ORT ratio (> 1: TVM is
slower).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.runtime import CompiledModel
from onnxpress.backends.tvm.tune import TuneOptions

MODELS = Path(__file__).resolve().parents[1] / "models"
sys.path.insert(0, str(MODELS.parent / "tools"))
from _timing import interleaved_ms  # noqa: E402

DEFAULT_MODELS = "cnn_mnist,transformer_mnist,gru_sunspots,mlp_digits"


def _caller(lib: CompiledModel, arrays: list[np.ndarray]) -> Callable[[], Any]:
    return lambda: lib(*arrays)


def bench_model(
    name: str, rounds: int, iters: int, folder: Path, tuning: TuneOptions | None = None
) -> dict[str, Any]:
    path = MODELS / f"{name}.onnx"
    row: dict[str, Any] = {"model": name}
    libraries: dict[str, CompiledModel] = {}
    feed: dict[str, np.ndarray] = {}
    variants: list[tuple[str, bool, TuneOptions | None]] = [
        ("tvm_plain", False, None),
        ("tvm_default", True, None),
    ]
    if tuning is not None:
        variants.append(("tvm_tuned", True, tuning))
    for label, schedules, options in variants:
        start = time.perf_counter()
        result = compile_model(
            path, "x86", folder / f"{name}-{label}", default_schedules=schedules, tuning=options
        )
        row[f"{label}_compile_s"] = time.perf_counter() - start
        if options is not None:
            summary = result.manifest["tuning"]
            row["tune_trials"] = summary["trials_run"]
            row["tune_min"] = summary["seconds"] / 60
            row["tune_tasks"] = len(summary["tasks"])
            row["tune_applied"] = summary["kernels_applied"]
        libraries[label] = CompiledModel(result.library)
        rng = np.random.default_rng(0)
        feed = {
            e["name"]: rng.standard_normal(e["shape"]).astype(e["dtype"])
            for e in result.manifest["inputs"]
        }
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    arrays = list(feed.values())
    runners: dict[str, Callable[[], Any]] = {"ort": lambda: session.run(None, feed)}
    for label, lib in libraries.items():
        runners[label] = _caller(lib, arrays)
    for label, ms in interleaved_ms(runners, rounds, calls=iters).items():
        row[f"{label}_ms"] = ms
    row["ratio_plain"] = row["tvm_plain_ms"] / row["ort_ms"]
    row["ratio_default"] = row["tvm_default_ms"] / row["ort_ms"]
    if tuning is not None:
        row["ratio_tuned"] = row["tvm_tuned_ms"] / row["ort_ms"]
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
    if all("tvm_tuned_ms" in r for r in rows):
        lines += [
            "",
            "| model (batch 1) | ORT ms | TVM untuned ms | ratio | TVM tuned ms | ratio "
            "| trials | kernels tuned / all | tuning min |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['ort_ms']:.3f} | {r['tvm_default_ms']:.3f} | "
            f"{r['ratio_default']:.2f}× | {r['tvm_tuned_ms']:.3f} | {r['ratio_tuned']:.2f}× | "
            f"{r['tune_trials']} | {r['tune_applied']} / {r['tune_tasks']} | {r['tune_min']:.1f} |"
            for r in rows
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--tune-trials", type=int, default=0, help="also compile tuned")
    parser.add_argument("--tuning-db", help="reuse this tuning database (default: a fresh one)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        database = Path(args.tuning_db) if args.tuning_db else Path(tmp) / "tuning-db"
        tuning = TuneOptions(args.tune_trials, database) if args.tune_trials else None
        for name in args.models.split(","):
            rows.append(bench_model(name.strip(), args.rounds, args.iters, Path(tmp), tuning))
            print(f"done {name}", file=sys.stderr)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"medians of {args.rounds} interleaved rounds of {args.iters} calls"
    )
    if args.markdown:
        print(markdown(rows))
    else:
        for row in rows:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
