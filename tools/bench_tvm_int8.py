"""Benchmark int8 on TVM: the QDQ-to-integer lowering (onnxpress.backends.tvm.int8) against TVM fp32
and onnxruntime (fp32 and its QDQ int8 kernels), per compile target.

  python tools/bench_tvm_int8.py [--models cnn_mnist,transformer_mnist,cnn_wide_mnist,mobilenet_mnist,mlp_digits,resnet112]
                                 [--targets avx2,x86] [--rounds 9] [--fake-quant] [--markdown]

Per bundled model: fp32 = the default lossless pipeline; int8 = the default calibrated
pipeline (qdq) on models/data/<model>_calib.npz. Both are compiled at batch 1 for each
target (``avx2`` = Haswell code: AVX2 + FMA, no AVX-512/VNNI, so int8 runs on the
vpmaddubsw / vpmaddwd kernels; ``x86`` = this CPU); ``--fake-quant`` adds the QDQ model with
``int8="off"`` (Relax's float fake-quant). All libraries of a model and onnxruntime are
timed in the same interleaved rounds (tools/_timing.py: each round takes a ~0.2 s sample of
every runner, order reversed every other round); the median per runner is reported and the
ratios are taken within the run. The code of every target must run on this CPU.
``resnet112`` is built here with random weights (speed only; calibrated and compared on
random inputs). Quality on the held-out set: top-1 accuracy of each TVM library (batch-1
calls over the 1000 digits) and of onnxruntime's QDQ run, and the fraction of digits where
TVM int8 and onnxruntime QDQ predict the same class. The "int8 kernels" column counts the
kernel each quantized conv/matmul ran on (manifest ``int8.layers``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.runtime import CompiledModel
from onnxpress.core.pipeline import DEFAULT_LOSSLESS

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "models")]
from _timing import interleaved_ms  # noqa: E402
from evaluate import load_eval_set, model_inputs  # noqa: E402

DEFAULT_MODELS = "cnn_mnist,transformer_mnist,cnn_wide_mnist,mobilenet_mnist,mlp_digits,resnet112"


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def resnet112() -> onnx.ModelProto:
    """Speed only: a plain ResNet-style conv stack at 1x3x112x112 with random He weights
    (stem 3->32 /2, then 32->64, 64->128, 128->256 stages of two 3x3 convs, the first /2)."""
    rng = np.random.default_rng(0)
    nodes, inits, previous, channels = [], [], "x", 3
    plan = [(32, 2)] + [(c, s) for c in (64, 128, 256) for s in (2, 1)]
    for index, (out, stride) in enumerate(plan):
        weight = rng.normal(0, np.sqrt(2 / (channels * 9)), (out, channels, 3, 3))
        inits += [
            numpy_helper.from_array(weight.astype(np.float32), f"w{index}"),
            numpy_helper.from_array(rng.normal(0, 0.05, out).astype(np.float32), f"b{index}"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [previous, f"w{index}", f"b{index}"],
                [f"c{index}"],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            ),
            helper.make_node("Relu", [f"c{index}"], [f"r{index}"]),
        ]
        previous, channels = f"r{index}", out
    inits.append(numpy_helper.from_array(rng.normal(0, 0.06, (100, 256)).astype(np.float32), "fc"))
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet112",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _sources(name: str) -> tuple[Any, Any, np.ndarray, np.ndarray | None]:
    """(model, calibration, held-out inputs, labels or None) of a bundled or synthetic model."""
    if name == "resnet112":
        rng = np.random.default_rng(1)
        batches = [
            {"x": rng.standard_normal((1, 3, 112, 112)).astype(np.float32)} for _ in range(8)
        ]
        return resnet112(), batches, rng.standard_normal((50, 3, 112, 112)).astype(np.float32), None
    eval_set = load_eval_set(ROOT / "models" / "data" / f"{name}_eval.npz")
    calibration = ROOT / "models" / "data" / f"{name}_calib.npz"
    return ROOT / "models" / f"{name}.onnx", calibration, model_inputs(eval_set), eval_set["labels"]


def _kernels(lowering: dict[str, Any]) -> str:
    """Per-layer kernels of an int8 library, counted: 'avx2-u8s8 4, relax-nhwc 2'."""
    counts = Counter(layer["kernel"] for layer in lowering.get("layers", []))
    return ", ".join(f"{kernel} {n}" for kernel, n in counts.most_common()) or "-"


def bench_model(
    name: str, targets: list[str], rounds: int, folder: Path, fake_quant: bool
) -> list[dict[str, Any]]:
    """One row per target: TVM fp32 and int8 (and fake-quant) libraries for that target and
    onnxruntime on this CPU, all timed in the same interleaved rounds."""
    source, calibration, inputs, labels = _sources(name)
    fp32, _ = onnxpress.optimize(source, DEFAULT_LOSSLESS)
    int8, _ = onnxpress.optimize(source, calibration=calibration)
    builds = [("tvm_fp32", fp32, "off"), ("tvm_int8", int8, "auto")]
    if fake_quant:
        builds.insert(1, ("tvm_fakequant", int8, "off"))
    libraries: dict[str, CompiledModel] = {}
    rows: dict[str, dict[str, Any]] = {t: {"model": name, "target": t} for t in targets}
    for target in targets:
        row = rows[target]
        for label, model, mode in builds:
            start = time.perf_counter()
            # fake-quant rounds at quantize boundaries differently from onnxruntime's float
            # run now and then (one step): it is a speed reference only, not verified here
            result = compile_model(
                model,
                target,
                folder / f"{name}-{target}-{label}",
                int8=mode,
                verify=label != "tvm_fakequant",
            )
            row[f"{label}_compile_s"] = time.perf_counter() - start
            libraries[f"{target}:{label}"] = CompiledModel(result.library)
            if mode == "auto":
                row["lowered"] = result.manifest["int8"]
                row["kernels"] = _kernels(result.manifest["int8"] or {})
                row["verification"] = result.manifest["verification"]["errors"]
    sessions = {"ort_fp32": _session(fp32), "ort_qdq": _session(int8)}
    input_name = fp32.graph.input[0].name
    x = inputs[:1]
    runners: dict[str, Callable[[], Any]] = {
        label: functools.partial(lib, x) for label, lib in libraries.items()
    }
    for label, sess in sessions.items():
        runners[label] = functools.partial(sess.run, None, {input_name: x})
    timed = interleaved_ms(runners, rounds)
    ort_predicted = np.array(
        [
            sessions["ort_qdq"].run(None, {input_name: inputs[i : i + 1]})[0].argmax()
            for i in range(len(inputs))
        ]
    )
    for target, row in rows.items():
        for label in ("ort_fp32", "ort_qdq"):
            row[f"{label}_ms"] = timed[label]
        for label, _, _ in builds:
            row[f"{label}_ms"] = timed[f"{target}:{label}"]
        row["int8_vs_fp32_tvm"] = row["tvm_int8_ms"] / row["tvm_fp32_ms"]
        row["tvm_int8_vs_ort_fp32"] = row["tvm_int8_ms"] / row["ort_fp32_ms"]
        row["tvm_int8_vs_ort_qdq"] = row["tvm_int8_ms"] / row["ort_qdq_ms"]
        if fake_quant:
            row["int8_vs_fakequant_tvm"] = row["tvm_int8_ms"] / row["tvm_fakequant_ms"]
        predictions = {
            label: np.array(
                [
                    libraries[f"{target}:{label}"](inputs[i : i + 1])[0].argmax()
                    for i in range(len(inputs))
                ]
            )
            for label, _, _ in builds
        }
        predictions["ort_qdq"] = ort_predicted
        for label, predicted in predictions.items():
            row[f"{label}_accuracy"] = (
                float(np.mean(predicted == labels)) if labels is not None else None
            )
        row["int8_agrees_with_ort_qdq"] = float(np.mean(predictions["tvm_int8"] == ort_predicted))
    return list(rows.values())


def _accuracies(row: dict[str, Any]) -> str:
    if row["tvm_fp32_accuracy"] is None:
        return "- (random weights)"
    keys = ("tvm_fp32_accuracy", "ort_qdq_accuracy", "tvm_int8_accuracy")
    return " / ".join(f"{row[k]:.3f}" for k in keys)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model (batch 1) | TVM target | ORT fp32 ms | ORT QDQ ms | TVM fp32 ms | TVM int8 ms | int8 / fp32 (TVM) | TVM int8 / ORT fp32 | TVM int8 / ORT QDQ | int8 kernels (layers) | accuracy fp32 / ORT QDQ / TVM int8 | TVM int8 = ORT QDQ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['target']} | {r['ort_fp32_ms']:.3f} | {r['ort_qdq_ms']:.3f} | "
            f"{r['tvm_fp32_ms']:.3f} | {r['tvm_int8_ms']:.3f} | {r['int8_vs_fp32_tvm']:.2f} | "
            f"{r['tvm_int8_vs_ort_fp32']:.2f} | {r['tvm_int8_vs_ort_qdq']:.2f} | {r['kernels']} | "
            f"{_accuracies(r)} | {r['int8_agrees_with_ort_qdq']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--targets", default="avx2,x86", help="compile targets, comma-separated")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--fake-quant", action="store_true", help="also time TVM's float fake-quant"
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name.strip(), targets, args.rounds, Path(tmp), args.fake_quant)
            print(f"done {name}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(markdown(rows) if args.markdown else "\n".join(str(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
