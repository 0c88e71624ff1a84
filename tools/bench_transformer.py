"""Transformer benchmark: ``svd`` budget allocation and ``svd`` + ``qdq`` composition.

1. ``models/transformer_mnist.onnx`` (trained; 1000 held-out digits), calibrated on the
   bundled batch of 64 training digits: fp32, ``svd{budget=B}`` for B in 0.75 and 0.5 with the
   allocation before this change (``sensitivity=false,rank-floor=0``) and after, ``qdq``
   alone, and each svd followed by ``qdq``. Accuracy, logits rel-L2 against fp32 on the
   held-out digits, and where the factored params went (attention projections vs FFN).
2. ``transformer_mnist`` at 0.6 of its MACs: ``prune-channels`` with one budget over the
   FFN neurons only, heads + FFN, head dimensions + FFN, and all of them (the default); with
   ``--prune-heads-pass`` instead ``prune-heads`` followed by an FFN-only ``prune-channels``.
   Accuracy before and after ``onnxpress.distill`` against the original (the 4000 training
   digits with labels, KD T=4 + 0.5·CE, Adam 3e-4, ``--distill-epochs``), and how much of
   the model's MACs each kind of cut removes alone (heads / head dims / channels).
3. The synthetic 22M-param encoder of ``bench_svd.py`` (6 layers, d 384, FFN 1536, 128
   tokens, random weights): ``svd{budget=0.75}`` time and peak RSS in a subprocess.

    python tools/bench_transformer.py              # markdown on stdout
    python tools/bench_transformer.py --skip-encoder --skip-svd --distill-epochs 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from bench_svd import memory_run

import onnxpress

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "transformer_mnist.onnx"
CALIBRATION = REPO / "models" / "data" / "transformer_mnist_calib.npz"
EVAL = REPO / "models" / "data" / "transformer_mnist_eval.npz"
BEFORE = "sensitivity=false,rank-floor=0"
PIPELINES = {
    "qdq": "qdq",
    **{
        f"svd {b}, {label}": f"svd{{budget={b}{opts}}}"
        for b in ("0.75", "0.5")
        for label, opts in (("allocation before", f",{BEFORE}"), ("allocation now", ""))
    },
}
PIPELINES.update({f"{name} + qdq": f"{spec},qdq" for name, spec in list(PIPELINES.items())[1:]})


PRUNE = "prune-channels{{macs={macs},criterion=l1,allocation=sensitivity}}"
# (name, pipeline): prune-heads first; prune-channels' target is relative to its own input,
# chosen so that the whole pipeline lands at 0.6 of the original MACs (--prune-heads-pass)
PRUNE_HEADS = [
    ("FFN only", PRUNE.format(macs=0.6)),
    ("1 of 8 heads + FFN", "prune-heads{keep=0.875}," + PRUNE.format(macs=0.646)),
    ("2 of 8 heads + FFN", "prune-heads{keep=0.75}," + PRUNE.format(macs=0.693)),
    ("half the q/k dims + FFN", "prune-heads{keep=1.0,qk-dims=0.5}," + PRUNE.format(macs=0.7)),
]
# one prune-channels pass, one MAC budget spread by measured sensitivity over the units
# it may cut (the default)
PRUNING = [
    ("FFN only", "prune-channels{macs=0.6,heads=false,head-dims=false}"),
    ("heads + FFN", "prune-channels{macs=0.6,head-dims=false}"),
    ("head dims + FFN", "prune-channels{macs=0.6,heads=false}"),
    ("heads, head dims, FFN", "prune-channels{macs=0.6}"),
]


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": images})[0])


def split(details: list[dict[str, Any]]) -> dict[str, Any]:
    """Factored weights and params kept, attention projections vs feed-forward layers."""
    out: dict[str, Any] = {}
    for part in ("attention", "ffn"):
        mine = [d for d in details if f"/{part}/" in d["nodes"][0]]
        out[part] = {
            "factored": len(mine),
            "ranks": [d["rank"] for d in mine],
            "params_saved": sum(d["params_before"] - d["params_after"] for d in mine),
        }
    return out


def mnist_rows() -> dict[str, Any]:
    data = np.load(EVAL)
    images = (data["images"] / data["divisor"]).astype(np.float32)
    labels = data["labels"]
    original = onnx.load(MODEL)
    reference = logits(original, images)
    rows = [{"pipeline": "fp32", "accuracy": float(np.mean(reference.argmax(1) == labels))}]
    for name, spec in PIPELINES.items():
        start = time.perf_counter()
        out, report = onnxpress.optimize(original, passes=spec, calibration=str(CALIBRATION))
        seconds = time.perf_counter() - start
        scores = logits(out, images)
        row: dict[str, Any] = {
            "pipeline": name,
            "passes": spec,
            "accuracy": float(np.mean(scores.argmax(1) == labels)),
            "rel_l2": float(np.linalg.norm(scores - reference) / np.linalg.norm(reference)),
            "seconds": seconds,
        }
        if spec.startswith("svd"):
            row["split"] = split(report.passes[0].result.details)
        rows.append(row)
        print(f"  {name}: {row['accuracy']:.4f} {row['rel_l2']:.4f}", file=sys.stderr)
    return {"rows": rows}


def pruning_rows(epochs: int, rows: list[tuple[str, str]]) -> list[dict[str, Any]]:
    from bench_distill import accuracy, training_data

    inputs, labels = training_data((28, 28))
    out = []
    for name, spec in rows:
        model, report = onnxpress.optimize(str(MODEL), passes=spec, calibration=str(CALIBRATION))
        counts: dict[str, int] = {}
        for step in report.passes:
            for key, value in step.result.counts.items():
                counts[key] = counts.get(key, 0) + value
        allocation = next(
            (d for d in report.passes[-1].result.details if d.get("kind") == "allocation"), {}
        )
        row: dict[str, Any] = {
            "cut": name,
            "passes": spec,
            "macs": report.after.macs / report.before.macs,
            "heads_pruned": counts.get("heads_pruned", 0) + counts.get("heads_removed", 0),
            "qk_dims_removed": counts.get("qk_dims_removed", 0),
            "vo_dims_removed": counts.get("vo_dims_removed", 0),
            "split": allocation.get("cut"),
            "accuracy": accuracy(model, "transformer_mnist"),
        }
        row["ffn_neurons_removed"] = report.passes[-1].result.counts.get("channels_removed", 0)
        if epochs:
            start = time.perf_counter()
            tuned, _ = onnxpress.distill(
                model,
                str(MODEL),
                [{"input": inputs}],
                labels=labels,
                epochs=epochs,
                lr=3e-4,
                alpha=0.5,
                batch_size=64,
            )
            row["distilled"] = accuracy(tuned, "transformer_mnist")
            row["distill_seconds"] = time.perf_counter() - start
        out.append(row)
        print(f"  {name}: {row}", file=sys.stderr)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = (
        []
        if not results["mnist"]["rows"]
        else [
            "| pipeline | accuracy | logits rel-L2 | attention: factored, params saved | "
            "FFN: factored, params saved | time |",
            "|---|---|---|---|---|---|",
        ]
    )
    for row in results["mnist"]["rows"]:
        parts = row.get("split")
        cells = [
            f"{parts[p]['factored']} {parts[p]['ranks']}, {parts[p]['params_saved']:,}"
            if parts
            else "—"
            for p in ("attention", "ffn")
        ]
        rel = f"{row['rel_l2']:.4f}" if "rel_l2" in row else "—"
        took = f"{row['seconds']:.1f} s" if "seconds" in row else "—"
        lines.append(
            f"| {row['pipeline']} | {row['accuracy']:.4f} | {rel} | {' | '.join(cells)} | {took} |"
        )
    if results.get("pruning"):
        lines += [
            "",
            "| cut at 0.6 MACs | MACs kept | heads removed | q/k, v dims removed | "
            "FFN neurons removed | MACs cut by heads / head dims / channels | accuracy | "
            "distilled | distill time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in results["pruning"]:
            split = row.get("split") or {}
            shares = " / ".join(
                f"{split.get(k, 0.0):.3f}" for k in ("heads", "head_dims", "channels")
            )
            lines.append(
                f"| {row['cut']} | {row['macs']:.3f} | {row['heads_pruned']} | "
                f"{row['qk_dims_removed']}, {row['vo_dims_removed']} | "
                f"{row['ffn_neurons_removed']} | {shares} | {row['accuracy']:.4f} | "
                f"{row.get('distilled', float('nan')):.4f} | {row.get('distill_seconds', 0):.0f} s |"
            )
    encoder = results.get("encoder")
    if encoder:
        lines += [
            "",
            "| encoder params | after | factored | time | peak RSS | RSS before the pass |",
            "|---|---|---|---|---|---|",
            f"| {encoder['params']:,} | {encoder['params_after']:,} | {encoder['factored']} | "
            f"{encoder['seconds']:.0f} s | {encoder['peak_rss_mb']:.0f} MiB | "
            f"{encoder['rss_before_pass_mb']:.0f} MiB |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-encoder", action="store_true")
    parser.add_argument("--skip-svd", action="store_true")
    parser.add_argument("--skip-pruning", action="store_true")
    parser.add_argument("--distill-epochs", type=int, default=8, help="0: no distillation")
    parser.add_argument(
        "--prune-heads-pass",
        action="store_true",
        help="the pruning rows of prune-heads followed by prune-channels (FFN only)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine()}
    results["mnist"] = {"rows": []} if args.skip_svd else mnist_rows()
    if not args.skip_pruning:
        rows = PRUNE_HEADS if args.prune_heads_pass else PRUNING
        results["pruning"] = pruning_rows(args.distill_epochs, rows)
    if not args.skip_encoder:
        results["encoder"] = memory_run()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
