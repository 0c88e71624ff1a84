"""``onnxpress optimize`` (the default calibrated pipeline, with every default target) on the
real-size architectures of the TVM zoo: does it finish, how long, what does qdq keep in float,
and how close is the result under each target's arithmetic.

  python tools/bench_optimize_zoo.py --models resnet18,efficientnet_b0 [--batch 1]
                                     [--batches 8] [--passes TEXT] [--json]

Models come from tools/_zoo_models.py (torchvision / transformers' BertModel / torch, random
weights, exported here, never committed). The image models calibrate on crops of
scikit-learn's two sample photos (real images, ImageNet-normalised, ``--batches`` batches of
``--batch``); the others on their export feed, float inputs with 10% noise and token ids
permuted per batch. Random weights make the logits of a classifier nearly tied, so its top-1
budget is harder to meet than a trained model's: a fallback count here is an upper bound.

``--json`` prints one object per model: model, seconds (the whole optimize), qdq_seconds,
quantized (nodes), fallback (layers kept in float), u8_weights (layers on u8 x u8 kernels for
the AVX2 target), metric, value and limit (the verifier's on this CPU), worst_target (the
emulated target furthest into its budget) and error (the first line of a failure, else null).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _zoo_models import ZOO, export

import onnxpress

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def photo_batches(batch: int, count: int, size: int = 224) -> list[dict[str, np.ndarray]]:
    """``count`` batches of random ``size``² crops of scikit-learn's sample photos."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise SystemExit("bench_optimize_zoo needs scikit-learn (the bench extra)") from exc
    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for index in range(count):
        crops = []
        for item in range(batch):
            photo = photos[(index * batch + item) % len(photos)]
            y = int(rng.integers(0, photo.shape[0] - size))
            x = int(rng.integers(0, photo.shape[1] - size))
            crop = (photo[y : y + size, x : x + size] / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            crops.append(crop.transpose(2, 0, 1))
        out.append({"input": np.stack(crops).astype(np.float32)})
    return out


def feed_batches(feed: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    """The export feed, then ``count - 1`` variants: float inputs + 10% noise, token ids
    permuted (masks and other integer inputs kept)."""
    rng = np.random.default_rng(1)
    out = [dict(feed)]
    for _ in range(count - 1):
        batch = {}
        for name, value in feed.items():
            if value.dtype.kind == "f":
                noise = 0.1 * float(np.std(value)) * rng.standard_normal(value.shape)
                batch[name] = (value + noise).astype(value.dtype)
            elif name == "input_ids":
                batch[name] = rng.permutation(value.ravel()).reshape(value.shape)
            else:
                batch[name] = value
        out.append(batch)
    return out


def measure(name: str, batch: int, count: int, passes: str | None) -> dict[str, Any]:
    model, feed = export(name, batch)
    image = set(feed) == {"input"} and feed["input"].shape[1:] == (3, 224, 224)
    calibration = photo_batches(batch, count) if image else feed_batches(feed, count)
    row: dict[str, Any] = {"model": name, "batch": batch, "error": None}
    started = time.perf_counter()
    try:
        _, report = onnxpress.optimize(model, passes=passes, calibration=calibration)
    except onnxpress.OnnxpressError as exc:
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["error"] = str(exc).splitlines()[0]
        return row
    row["seconds"] = round(time.perf_counter() - started, 1)
    qdq = next((p for p in report.passes if p.name == "qdq"), None)
    if qdq is not None:
        counts = qdq.result.counts
        row.update(
            qdq_seconds=round(qdq.seconds, 1),
            quantized=counts.get("nodes_quantized"),
            fallback=counts.get("fallback_layers"),
            u8_weights=counts.get("layers_u8_weights"),
        )
    last = report.passes[-1] if qdq is None else qdq
    check = last.verification
    row.update(metric=check.metric, value=check.value, limit=check.limit)
    worst = max(
        ((t, c) for t, c in (check.targets or {}).items() if c.get("limit")),
        key=lambda item: float(item[1]["value"]) / float(item[1]["limit"]),
        default=None,
    )
    row["worst_target"] = None if worst is None else f"{worst[0]} {worst[1]['value']:.4g}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO))
    parser.add_argument("--batch", type=int, default=1, help="images per calibration batch")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches")
    parser.add_argument("--passes", default=None, help="pipeline text (default: optimize's)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(ZOO))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; the zoo has {', '.join(ZOO)}")
    rows = []
    for name in args.models.split(","):
        row = measure(name, args.batch, args.batches, args.passes)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        keys = ["model", "seconds", "qdq_seconds", "quantized", "fallback", "u8_weights"]
        keys += ["metric", "value", "limit", "worst_target", "error"]
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()
