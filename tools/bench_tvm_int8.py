"""Benchmark int8 on TVM: the QDQ-to-integer lowering (onnxpress.tvm_int8) against TVM fp32,
TVM's float fake-quant of the same QDQ model, and onnxruntime (fp32 and its QDQ int8 kernels).

  python tools/bench_tvm_int8.py [--models cnn_mnist,transformer_mnist,cnn_wide_mnist,mlp_digits]
                                 [--rounds 9] [--target x86] [--markdown]

Per bundled model: fp32 = the default lossless pipeline; int8 = the default calibrated
pipeline (qdq) on models/data/<model>_calib.npz. Both are compiled at batch 1 for the
target: fp32; the QDQ model with ``int8="off"`` (Relax's float fake-quant) and with the
integer lowering. All five runners are timed in interleaved rounds (each round takes a
~0.2 s sample of every runner, order reversed every other round); the median per runner is
reported and the ratios are taken within the run. Quality on the held-out set: top-1
accuracy of each TVM library (batch-1 calls over the 1000 digits) and of onnxruntime's QDQ
run, and the fraction of digits where TVM int8 and onnxruntime QDQ predict the same class.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import onnxpress
from onnxpress.pipeline import DEFAULT_LOSSLESS
from onnxpress.tvm_backend import CompiledModel, compile_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
from evaluate import load_eval_set, model_inputs  # noqa: E402

DEFAULT_MODELS = "cnn_mnist,transformer_mnist,cnn_wide_mnist,mlp_digits"
SAMPLE_S = 0.2


def _sample(run: Callable[[], Any]) -> float:
    run()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < SAMPLE_S:
        run()
        calls += 1
    return (time.perf_counter() - start) / calls


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bench_model(name: str, target: str, rounds: int, folder: Path) -> dict[str, Any]:
    source = ROOT / "models" / f"{name}.onnx"
    fp32, _ = onnxpress.optimize(source, DEFAULT_LOSSLESS)
    int8, _ = onnxpress.optimize(source, calibration=ROOT / "models" / "data" / f"{name}_calib.npz")
    libraries: dict[str, CompiledModel] = {}
    row: dict[str, Any] = {"model": name}
    for label, model, mode in (("tvm_fp32", fp32, "off"), ("tvm_fakequant", int8, "off"), ("tvm_int8", int8, "auto")):
        start = time.perf_counter()
        result = compile_model(model, target, folder / f"{name}-{label}", int8=mode)
        row[f"{label}_compile_s"] = time.perf_counter() - start
        libraries[label] = CompiledModel(result.library)
        if mode == "auto":
            row["lowered"] = result.manifest["int8"]
            row["verification"] = result.manifest["verification"]["errors"]
    sessions = {"ort_fp32": _session(fp32), "ort_qdq": _session(int8)}
    eval_set = load_eval_set(ROOT / "models" / "data" / f"{name}_eval.npz")
    inputs = model_inputs(eval_set)
    input_name = fp32.graph.input[0].name
    x = inputs[:1]
    runners: dict[str, Callable[[], Any]] = {
        label: (lambda lib=lib: lib(x)) for label, lib in libraries.items()
    }
    for label, sess in sessions.items():
        runners[label] = lambda sess=sess: sess.run(None, {input_name: x})
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for round_index in range(rounds):
        order = list(runners) if round_index % 2 == 0 else list(reversed(runners))
        for label in order:
            samples[label].append(_sample(runners[label]))
    for label, values in samples.items():
        row[f"{label}_ms"] = statistics.median(values) * 1e3
    row["int8_vs_fp32_tvm"] = row["tvm_int8_ms"] / row["tvm_fp32_ms"]
    row["int8_vs_fakequant_tvm"] = row["tvm_int8_ms"] / row["tvm_fakequant_ms"]
    row["tvm_int8_vs_ort_fp32"] = row["tvm_int8_ms"] / row["ort_fp32_ms"]
    labels = eval_set["labels"]
    predictions = {
        label: np.array([lib(inputs[i : i + 1])[0].argmax() for i in range(len(inputs))])
        for label, lib in libraries.items()
    }
    predictions["ort_qdq"] = np.concatenate(
        [sessions["ort_qdq"].run(None, {input_name: inputs[i : i + 100]})[0].argmax(axis=-1) for i in range(0, len(inputs), 100)]
    )
    for label, predicted in predictions.items():
        row[f"{label}_accuracy"] = float(np.mean(predicted == labels))
    row["int8_agrees_with_ort_qdq"] = float(np.mean(predictions["tvm_int8"] == predictions["ort_qdq"]))
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model (batch 1) | ORT fp32 ms | ORT QDQ ms | TVM fp32 ms | TVM fake-quant ms | TVM int8 ms | int8 / fp32 (TVM) | TVM int8 / ORT fp32 | accuracy fp32 / ORT QDQ / TVM int8 | TVM int8 = ORT QDQ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ort_fp32_ms']:.3f} | {r['ort_qdq_ms']:.3f} | {r['tvm_fp32_ms']:.3f} | "
            f"{r['tvm_fakequant_ms']:.3f} | {r['tvm_int8_ms']:.3f} | {r['int8_vs_fp32_tvm']:.2f} | "
            f"{r['tvm_int8_vs_ort_fp32']:.2f} | {r['tvm_fp32_accuracy']:.3f} / {r['ort_qdq_accuracy']:.3f} / "
            f"{r['tvm_int8_accuracy']:.3f} | {r['int8_agrees_with_ort_qdq']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--target", default="x86")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(bench_model(name.strip(), args.target, args.rounds, Path(tmp)))
            print(f"done {name}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(markdown(rows) if args.markdown else "\n".join(str(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
