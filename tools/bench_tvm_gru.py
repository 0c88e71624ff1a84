"""Benchmark GRU on TVM: the loop-form kernel (onnxpress.backends.tvm.gru) against lower-gru's unrolled
steps and onnxruntime's GRU op.

  python tools/bench_tvm_gru.py [--rounds 9] [--markdown]

Models: the bundled gru_sunspots (24 steps, hidden 32 as built) and one-GRU models with
random weights at 200 steps (hidden 16 and 64, input 8, batch 1; both linear_before_reset
values for hidden 64). Each is compiled for this CPU in both forms (compile seconds
recorded) and the two libraries and an onnxruntime session are timed in interleaved
rounds (~0.2 s sample per runner per round, order reversed every other round); medians.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.runtime import CompiledModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from _timing import interleaved_ms  # noqa: E402


def gru_model(steps: int, hidden: int, lbr: int, inputs: int = 8) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.normal(0, 0.3, (1, 3 * hidden, inputs)),
        "R": rng.normal(0, 0.3 / np.sqrt(hidden), (1, 3 * hidden, hidden)),
        "B": rng.normal(0, 0.1, (1, 6 * hidden)),
    }
    graph = helper.make_graph(
        [
            helper.make_node(
                "GRU", ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden, linear_before_reset=lbr
            )
        ],
        "gru",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, inputs])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, hidden])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bench(label: str, model: onnx.ModelProto, rounds: int, folder: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"model": label}
    libraries = {}
    for form in ("loop", "unroll"):
        start = time.perf_counter()
        result = compile_model(model, "x86", folder / f"{label}-{form}", gru=form)
        row[f"{form}_compile_s"] = time.perf_counter() - start
        libraries[form] = CompiledModel(result.library)
        feed = {
            e["name"]: np.random.default_rng(1).standard_normal(e["shape"]).astype(np.float32)
            for e in result.manifest["inputs"]
        }
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(model.SerializeToString(), options)
    arrays = list(feed.values())
    runners: dict[str, Callable[[], Any]] = {"ort": lambda: session.run(None, feed)}
    for form, lib in libraries.items():
        runners[form] = functools.partial(lib, *arrays)
    for name, ms in interleaved_ms(runners, rounds).items():
        row[f"{name}_ms"] = ms
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    cases = [
        ("gru_sunspots (T=24)", onnx.load(str(ROOT / "models" / "gru_sunspots.onnx"))),
        ("T=200 H=16 lbr=1", gru_model(200, 16, 1)),
        ("T=200 H=64 lbr=1", gru_model(200, 64, 1)),
        ("T=200 H=64 lbr=0", gru_model(200, 64, 0)),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in cases:
            rows.append(bench(label, model, args.rounds, Path(tmp)))
            print(f"done {label}", file=sys.stderr)
    if not args.markdown:
        print("\n".join(str(r) for r in rows))
        return 0
    print(
        "| model (batch 1) | ORT ms | TVM loop ms (× ORT) | TVM unrolled ms (× ORT) | compile s loop / unrolled |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['ort_ms']:.3f} | {r['loop_ms']:.3f} ({r['loop_ms'] / r['ort_ms']:.1f}×) | "
            f"{r['unroll_ms']:.3f} ({r['unroll_ms'] / r['ort_ms']:.1f}×) | "
            f"{r['loop_compile_s']:.1f} / {r['unroll_compile_s']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
