"""Transformer benchmark: ``svd`` budget allocation and ``svd`` + ``qdq`` composition.

1. ``models/transformer_mnist.onnx`` (trained; 1000 held-out digits), calibrated on the
   bundled batch of 64 training digits: fp32, ``svd{budget=B}`` for B in 0.75 and 0.5 with the
   allocation before this change (``sensitivity=false,rank-floor=0``) and after, ``qdq``
   alone, and each svd followed by ``qdq``. Accuracy, logits rel-L2 against fp32 on the
   held-out digits, and where the factored params went (attention projections vs FFN).
2. ``transformer_mnist`` at 0.6 of its MACs: ``prune-channels`` alone (only the FFN can be
   cut) against ``prune-heads`` (whole heads, or query/key head dimensions) carrying part
   of the cut before it; accuracy before and after ``onnxpress.distill`` against the original
   (the 4000 training digits with labels, KD T=4 + 0.5·CE, Adam 3e-4, ``--distill-epochs``).
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
# chosen so that the whole pipeline lands at 0.6 of the original MACs
PRUNING = [
    ("FFN only", PRUNE.format(macs=0.6)),
    ("1 of 8 heads + FFN", "prune-heads{keep=0.875}," + PRUNE.format(macs=0.646)),
    ("2 of 8 heads + FFN", "prune-heads{keep=0.75}," + PRUNE.format(macs=0.693)),
    ("half the q/k dims + FFN", "prune-heads{keep=1.0,qk-dims=0.5}," + PRUNE.format(macs=0.7)),
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


def pruning_rows(epochs: int) -> list[dict[str, Any]]:
    from bench_distill import accuracy, training_data

    inputs, labels = training_data((28, 28))
    rows = []
    for name, spec in PRUNING:
        model, report = onnxpress.optimize(str(MODEL), passes=spec, calibration=str(CALIBRATION))
        heads = report.passes[0].result.counts.get("heads_pruned", 0) if "heads" in spec else 0
        row: dict[str, Any] = {
            "cut": name,
            "passes": spec,
            "macs": report.after.macs / report.before.macs,
            "heads_pruned": heads,
            "accuracy": accuracy(model, "transformer_mnist"),
        }
        channels = report.passes[-1].result.counts.get("channels_removed", 0)
        row["ffn_neurons_removed"] = channels
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
        rows.append(row)
        print(f"  {name}: {row}", file=sys.stderr)
    return rows


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
            "| cut at 0.6 MACs | MACs kept | heads removed | FFN neurons removed | accuracy | "
            "distilled | distill time |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in results["pruning"]:
            lines.append(
                f"| {row['cut']} | {row['macs']:.3f} | {row['heads_pruned']} | "
                f"{row['ffn_neurons_removed']} | {row['accuracy']:.4f} | "
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
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": platform.processor() or platform.machine()}
    results["mnist"] = {"rows": []} if args.skip_svd else mnist_rows()
    if not args.skip_pruning:
        results["pruning"] = pruning_rows(args.distill_epochs)
    if not args.skip_encoder:
        results["encoder"] = memory_run()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
