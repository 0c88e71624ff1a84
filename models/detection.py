"""Digit-detection scenes and their metric (numpy only): scene generation, decoding, NMS, mAP.

A scene is a 64x64 canvas holding 1-3 MNIST digits at random places (their 28x28 patches
may touch but their ink boxes overlap by IoU < 0.2). Ground truth per digit: the tight box of
its ink, (x1, y1, x2, y2) in pixels, and its label.

A detector's output follows the YOLOv8 export layout: [batch, 4 + classes, cells], rows 0-3
the box (cx, cy, w, h) in pixels, the rest per-class scores in [0, 1]; one candidate per
grid cell. ``decode`` keeps each cell's best class, drops scores below ``score_floor``,
and applies per-class non-maximum suppression. ``mean_average_precision`` is the COCO-style
mean over classes of the all-point interpolated AP, at IoU 0.5 and averaged over IoU
0.50:0.05:0.95.

Used by ``build_digit_detector.py`` (training data), ``evaluate.py`` and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANVAS = 64
DIGIT = 28
MAX_DIGITS = 3
CLASSES = 10


@dataclass(frozen=True)
class Scenes:
    """Canvases (uint8 [N, 64, 64]) with padded ground truth: boxes [N, 3, 4], labels [N, 3]
    (-1 where a scene holds fewer digits)."""

    canvases: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray


def ink_box(image: np.ndarray) -> np.ndarray:
    """(x1, y1, x2, y2) of the non-zero pixels of a [28, 28] image (x2/y2 exclusive)."""
    rows = np.flatnonzero(image.max(axis=1))
    cols = np.flatnonzero(image.max(axis=0))
    if rows.size == 0:
        return np.array([0, 0, DIGIT, DIGIT], np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [n, 4] with every box in ``b`` [m, 4] (x1, y1, x2, y2)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def make_scenes(
    images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
) -> Scenes:
    """``count`` scenes drawn from ``images`` (uint8 [M, 28, 28]) and their ``labels``."""
    canvases = np.zeros((count, CANVAS, CANVAS), np.uint8)
    boxes = np.zeros((count, MAX_DIGITS, 4), np.float32)
    scene_labels = np.full((count, MAX_DIGITS), -1, np.int64)
    for scene in range(count):
        placed: list[np.ndarray] = []
        for slot in range(int(rng.integers(1, MAX_DIGITS + 1))):
            pick = int(rng.integers(len(images)))
            for _ in range(20):  # a few tries to find a free spot, else fewer digits
                top, left = (int(v) for v in rng.integers(0, CANVAS - DIGIT + 1, size=2))
                box = ink_box(images[pick]) + np.array([left, top, left, top], np.float32)
                if not placed or box_iou(box[None], np.stack(placed)).max() < 0.2:
                    break
            else:
                continue
            patch = canvases[scene, top : top + DIGIT, left : left + DIGIT]
            np.maximum(patch, images[pick], out=patch)
            boxes[scene, slot] = box
            scene_labels[scene, slot] = labels[pick]
            placed.append(box)
    return Scenes(canvases, boxes, scene_labels)


def decode(
    output: np.ndarray, score_floor: float = 0.01, iou: float = 0.5, max_detections: int = 20
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes [k, 4] x1y1x2y2, scores [k], classes [k]) after per-class NMS."""
    results = []
    for cells in output.astype(np.float64):
        cx, cy, w, h = cells[:4]
        scores = cells[4:]
        classes = scores.argmax(axis=0)
        best = scores.max(axis=0)
        keep = np.flatnonzero(best >= score_floor)
        keep = keep[np.argsort(-best[keep], kind="stable")][: 4 * max_detections]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)[keep]
        chosen: list[int] = []
        for index in range(len(keep)):
            same = [j for j in chosen if classes[keep[j]] == classes[keep[index]]]
            if same and box_iou(boxes[index : index + 1], boxes[same]).max() > iou:
                continue
            chosen.append(index)
            if len(chosen) == max_detections:
                break
        picked = keep[chosen]
        results.append((boxes[chosen], best[picked], classes[picked]))
    return results


def _average_precision(hits: np.ndarray, scores: np.ndarray, positives: int) -> float:
    if positives == 0:
        return float("nan")
    if hits.size == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    true_pos = np.cumsum(hits[order])
    recall = true_pos / positives
    precision = true_pos / np.arange(1, len(order) + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(steps * envelope))


def mean_average_precision(
    output: np.ndarray, scenes_boxes: np.ndarray, scenes_labels: np.ndarray
) -> dict[str, float]:
    """``map50`` (IoU 0.5) and ``map`` (mean over IoU 0.50:0.05:0.95) of a detector output."""
    detections = decode(output)
    thresholds = np.arange(0.5, 0.96, 0.05)
    per_threshold = []
    for threshold in thresholds:
        aps = []
        for cls in range(CLASSES):
            hits, scores, positives = [], [], 0
            for (boxes, conf, classes), truth, truth_labels in zip(
                detections, scenes_boxes, scenes_labels, strict=True
            ):
                gt = truth[truth_labels == cls]
                positives += len(gt)
                mine = np.flatnonzero(classes == cls)
                mine = mine[np.argsort(-conf[mine], kind="stable")]
                used = np.zeros(len(gt), bool)
                overlaps = box_iou(boxes[mine], gt) if len(gt) else np.zeros((len(mine), 0))
                for row, det in enumerate(mine):
                    scores.append(conf[det])
                    candidates = np.where(used, -1.0, overlaps[row]) if len(gt) else []
                    match = int(np.argmax(candidates)) if len(gt) else -1
                    hit = match >= 0 and candidates[match] >= threshold
                    if hit:
                        used[match] = True
                    hits.append(float(hit))
            aps.append(_average_precision(np.array(hits), np.array(scores), positives))
        per_threshold.append(float(np.nanmean(aps)))
    return {"map50": per_threshold[0], "map": float(np.mean(per_threshold))}
