"""Residual-width pruning and svd / qdq composition on the bundled encoders (issue 19).

1. ``models/encoder_digits.onnx`` (4 layers, 8 heads, d 144, FFN 576, 1.0 M params; 360
   held-out 8x8 digits), calibrated on its bundled 64-digit batch: fp32, ``qdq``,
   ``svd{budget=0.75}``, ``svd{budget=0.75},qdq`` and ``svd{budget=0.5}``: accuracy, logits
   rel-L2 against fp32, and which weights svd factored (attention projections vs FFN).
2. Each model cut to a MACs target by ``prune-channels`` (the residual width and the FFN
   neurons under one budget, spread by measured sensitivity; ``prune-heads`` first in the
   rows that say so): accuracy, then ``onnxpress distill`` (the CLI) against the original on
   the model's training data with labels; the split of the cut (heads / width / FFN).

    python tools/bench_width.py --distill-epochs 10 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import onnxpress

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "models" / "data"
sys.path.insert(0, str(REPO / "models"))
SVD_QDQ = {
    "qdq": "qdq",
    "svd 0.75": "svd{budget=0.75}",
    "svd 0.75 + qdq": "svd{budget=0.75},qdq",
    "svd 0.5": "svd{budget=0.5}",
}
PRUNE = "prune-channels{{macs={macs}}}"
# (model, label, pipeline, distill): prune-channels' target is relative to its own input
CUTS = [
    ("encoder_digits", "width + FFN", PRUNE.format(macs=0.5), True),
    ("encoder_digits", "2 of 8 heads + width + FFN", "prune-heads{keep=0.75}," + PRUNE.format(macs=0.58), True),
    ("transformer_mnist", "width + FFN", PRUNE.format(macs=0.6), True),
]  # fmt: skip


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def held_out(name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(DATA / f"{name}_eval.npz")
    shape = [-1, *data["input_shape"].tolist()]
    return (data["images"] / data["divisor"]).astype(np.float32).reshape(shape), data["labels"]


def training_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The model's training inputs and labels, as its build script split them."""
    if name == "encoder_digits":
        from build_encoder_digits import to_input
        from build_mlp_digits import load_split

        pixels, labels, _, _ = load_split()
        return to_input(pixels), labels
    from bench_distill import training_data

    return training_data((28, 28))


def accuracy(model: onnx.ModelProto, name: str) -> float:
    x, labels = held_out(name)
    return float(np.mean(logits(model, x).argmax(1) == labels))


def factored(details: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Factored weights by part: the attention projections and the FFN layers."""
    out: dict[str, list[str]] = {"attention": [], "ffn": []}
    for record in details:
        node = record["nodes"][0]
        part = "attention" if "/attention/" in node else "ffn"
        out[part].append(f"{node.split('/')[2]}.{node.split('/')[-2]} r{record['rank']}")
    return out


def svd_qdq_rows(name: str) -> list[dict[str, Any]]:
    x, labels = held_out(name)
    original = onnx.load(str(REPO / "models" / f"{name}.onnx"))
    reference = logits(original, x)
    rows: list[dict[str, Any]] = [
        {"pipeline": "fp32", "accuracy": float(np.mean(reference.argmax(1) == labels))}
    ]
    for label, spec in SVD_QDQ.items():
        start = time.perf_counter()
        out, report = onnxpress.optimize(
            original, passes=spec, calibration=str(DATA / f"{name}_calib.npz")
        )
        scores = logits(out, x)
        row: dict[str, Any] = {
            "pipeline": label,
            "passes": spec,
            "accuracy": float(np.mean(scores.argmax(1) == labels)),
            "rel_l2": float(np.linalg.norm(scores - reference) / np.linalg.norm(reference)),
            "seconds": time.perf_counter() - start,
        }
        if spec.startswith("svd"):
            row["factored"] = factored(report.passes[0].result.details)
        rows.append(row)
        print(f"  {name} {label}: {row}", file=sys.stderr)
    return rows


def cut_split(report: Any) -> dict[str, Any]:
    """Heads removed, width kept, FFN neurons removed per layer, from the pass reports."""
    split: dict[str, Any] = {"heads_removed": 0, "width": None, "ffn": []}
    for entry in report.passes:
        result = entry.result
        split["heads_removed"] += int(result.counts.get("heads_pruned", 0))
        for record in result.details:
            if record.get("kind") != "group":
                continue
            if record.get("width"):
                split["width"] = f"{record['kept']}/{record['channels']}"
            else:
                split["ffn"].append(record["channels"] - record["kept"])
    return split


def distill_cli(
    student: onnx.ModelProto, name: str, epochs: int, folder: Path
) -> tuple[float, float]:
    """``onnxpress distill`` on the training set with labels; (accuracy, seconds)."""
    inputs, labels = training_set(name)
    np.savez(folder / "train.npz", input=inputs)
    np.savez(folder / "labels.npz", labels=labels)
    onnx.save(student, str(folder / "student.onnx"))
    command = [
        sys.executable, "-m", "onnxpress.cli", "distill", str(folder / "student.onnx"),
        "--teacher", str(REPO / "models" / f"{name}.onnx"), "--data", str(folder / "train.npz"),
        "--labels", str(folder / "labels.npz"), "--epochs", str(epochs), "--lr", "3e-4",
        "--batch-size", "64", "--patience", str(epochs), "-o", str(folder / "distilled.onnx"),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return accuracy(onnx.load(str(folder / "distilled.onnx")), name), seconds


def cut_rows(epochs: int, only: set[str]) -> list[dict[str, Any]]:
    rows = []
    for name, label, spec, distil in CUTS:
        if only and name not in only:
            continue
        start = time.perf_counter()
        model, report = onnxpress.optimize(
            str(REPO / "models" / f"{name}.onnx"),
            passes=spec,
            calibration=str(DATA / f"{name}_calib.npz"),
        )
        row: dict[str, Any] = {
            "model": name,
            "cut": label,
            "passes": spec,
            "macs": report.after.macs / report.before.macs,
            "params": report.after.params / report.before.params,
            "split": cut_split(report),
            "accuracy": accuracy(model, name),
            "optimize_seconds": time.perf_counter() - start,
        }
        if distil and epochs:
            with tempfile.TemporaryDirectory() as folder:
                row["distilled"], row["distill_seconds"] = distill_cli(
                    model, name, epochs, Path(folder)
                )
        rows.append(row)
        print(f"  {name} {label}: {row}", file=sys.stderr)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for name, rows in results.get("svd_qdq", {}).items():
        lines += [
            f"**{name}**",
            "",
            "| pipeline | accuracy | logits rel-L2 | factored: attention | factored: FFN | time |",
            "|---|---|---|---|---|---|",
        ]
        for row in rows:
            parts = row.get("factored", {})
            lines.append(
                f"| {row['pipeline']} | {row['accuracy']:.4f} | {row.get('rel_l2', 0):.4f} | "
                f"{', '.join(parts.get('attention', [])) or '—'} | "
                f"{', '.join(parts.get('ffn', [])) or '—'} | {row.get('seconds', 0):.0f} s |"
            )
        lines.append("")
    if results.get("cuts"):
        lines += [
            "| model | cut | MACs kept | heads removed | width kept | FFN neurons removed "
            "(per layer) | accuracy | distilled | distill time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["cuts"]:
            split = row["split"]
            lines.append(
                f"| {row['model']} | {row['cut']} | {row['macs']:.3f} | {split['heads_removed']} | "
                f"{split['width'] or 'all'} | {sum(split['ffn'])} {split['ffn']} | "
                f"{row['accuracy']:.4f} | {row.get('distilled', float('nan')):.4f} | "
                f"{row.get('distill_seconds', 0):.0f} s |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-svd", action="store_true")
    parser.add_argument("--skip-cuts", action="store_true")
    parser.add_argument("--models", default="", help="comma-separated: only these models' cuts")
    parser.add_argument("--distill-epochs", type=int, default=10, help="0: no distillation")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    if not args.skip_svd:
        results["svd_qdq"] = {"encoder_digits": svd_qdq_rows("encoder_digits")}
    if not args.skip_cuts:
        only = {m for m in args.models.split(",") if m}
        results["cuts"] = cut_rows(args.distill_epochs, only)
    table = markdown(results)
    if args.json is not None:
        args.json.write_text(json.dumps({**results, "markdown": table}, indent=2))
    sys.stdout.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
