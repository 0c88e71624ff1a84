"""models/detection.py: scene generation, decoding with NMS and COCO-style mAP, against
hand-computed cases."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"


def load_detection() -> ModuleType:
    spec = importlib.util.spec_from_file_location("models_detection", MODELS_DIR / "detection.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


det = load_detection()


Cell = tuple[float, float, float, float, int, float]


def output(cells: list[Cell], count: int = 4) -> np.ndarray:
    """A [1, 14, count] detector output with the given (cx, cy, w, h, class, score) cells."""
    out = np.zeros((1, 4 + det.CLASSES, count), np.float32)
    out[0, 2:4] = 1.0
    for index, (cx, cy, w, h, cls, score) in enumerate(cells):
        out[0, :4, index] = (cx, cy, w, h)
        out[0, 4 + cls, index] = score
    return out


def truth(*boxes: tuple[float, float, float, float, int]) -> tuple[np.ndarray, np.ndarray]:
    padded = np.zeros((1, det.MAX_DIGITS, 4), np.float32)
    labels = np.full((1, det.MAX_DIGITS), -1)
    for slot, (*box, label) in enumerate(boxes):
        padded[0, slot], labels[0, slot] = box, label
    return padded, labels


def test_box_iou_by_hand() -> None:
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], np.float32)
    np.testing.assert_allclose(det.box_iou(a, b), [[50 / 150, 0.0, 1.0]])


def test_perfect_detections_score_one_and_a_miss_scores_zero() -> None:
    boxes, labels = truth((10, 10, 30, 40, 3), (40, 20, 60, 44, 7))
    exact = output([(20, 25, 20, 30, 3, 0.9), (50, 32, 20, 24, 7, 0.8)])
    assert det.mean_average_precision(exact, boxes, labels) == {"map": 1.0, "map50": 1.0}
    wrong_class = output([(20, 25, 20, 30, 4, 0.9), (50, 32, 20, 24, 7, 0.8)])
    scores = det.mean_average_precision(wrong_class, boxes, labels)
    assert scores["map50"] == pytest.approx(0.5)  # class 3 AP 0, class 7 AP 1 (class 4: no truth)


def test_a_shifted_box_counts_only_below_its_iou() -> None:
    boxes, labels = truth((0, 0, 20, 20, 1))
    shifted = output([(12, 10, 20, 20, 1, 0.9)])  # 2 px to the right: IoU 360/440 = 0.818
    scores = det.mean_average_precision(shifted, boxes, labels)
    assert scores["map50"] == 1.0
    assert scores["map"] == pytest.approx(7 / 10)  # hits at IoU 0.50..0.80, misses 0.85..0.95


def test_a_higher_scored_false_positive_halves_precision_at_full_recall() -> None:
    boxes, labels = truth((0, 0, 20, 20, 2))
    out = output([(50, 50, 10, 10, 2, 0.95), (10, 10, 20, 20, 2, 0.5)])
    # ranked: miss then hit -> precision 1/2 at recall 1
    assert det.mean_average_precision(out, boxes, labels)["map50"] == pytest.approx(0.5)


def test_nms_drops_a_duplicate_of_the_same_class_only() -> None:
    out = output([(10, 10, 20, 20, 5, 0.9), (11, 10, 20, 20, 5, 0.8), (11, 10, 20, 20, 6, 0.7)])
    ((kept_boxes, kept_scores, kept_classes),) = det.decode(out)
    assert kept_classes.tolist() == [5, 6] and kept_scores.tolist() == pytest.approx([0.9, 0.7])
    assert kept_boxes[0].tolist() == [0, 0, 20, 20]


def test_scenes_hold_one_to_three_labelled_digits_inside_the_canvas() -> None:
    rng = np.random.default_rng(0)
    digits = np.zeros((5, 28, 28), np.uint8)
    digits[:, 4:24, 8:20] = 200
    scenes = det.make_scenes(digits, np.arange(5), 50, rng)
    counts = (scenes.labels >= 0).sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 3
    assert scenes.canvases.shape == (50, 64, 64) and scenes.canvases.max() == 200
    for box, label in zip(
        scenes.boxes[scenes.labels >= 0], scenes.labels[scenes.labels >= 0], strict=True
    ):
        assert box[2] - box[0] == 12 and box[3] - box[1] == 20 and 0 <= label < 5
        assert box.min() >= 0 and box.max() <= 64
