"""Train and export ``crnn_lines.onnx``: a CNN + BiLSTM text-line recognizer read with CTC.

The classic CRNN shape: a Conv-BN-ReLU backbone that collapses the line's height to one
row of 32 time steps, a bidirectional LSTM over them (exported as one ONNX ``LSTM`` op with
``direction="bidirectional"``) and a per-step Softmax over blank + 36 characters.

Architecture (BatchNorm folded into the Convs by the exporter):
    backbone  Conv3x3(1->16)-BN-ReLU, MaxPool2          32x128 -> 16x64
              Conv3x3(16->32)-BN-ReLU, MaxPool2         -> 8x32
              Conv3x3(32->64)-BN-ReLU, MaxPool(2,1)     -> 4x32
              Conv3x3(64->64)-BN-ReLU
              Conv(4x1, 64->128)-BN-ReLU                -> 1x32, squeezed to [batch, 32, 128]
    sequence  LSTM(128 -> 2 x 96, bidirectional)        -> [batch, 32, 192]
    head      Linear(192 -> 37), Softmax over the last axis -> [batch, 32, 37]

Data: printed lines of 3-8 digits and lower-case letters (``printed_lines.py``): fresh
training lines every epoch from one seeded generator; 500 held-out lines from another
(``data/crnn_lines_eval.npz``, stored as 8-bit images; read by ``evaluate.py`` as CER,
character accuracy and line accuracy) and 256 calibration lines on the same 8-bit grid
(``data/crnn_lines_calib.npz``). Trained with CTC loss,
AdamW and a one-cycle lr on the CPU, single-threaded kernels (deterministic).

Usage: OMP_NUM_THREADS=1 python models/build_crnn_lines.py
"""

from __future__ import annotations

import _common as common
import _ctc
import numpy as np
import printed_lines
import torch
from torch import nn

NAME = "crnn_lines"
EPOCHS = 20
LINES_PER_EPOCH = 4096
BATCH_SIZE = 64
LEARNING_RATE = 4e-3
TEST_LINES = 500
CALIBRATION_LINES = 256
HIDDEN = 96


def conv_bn(cin: int, cout: int, kernel: tuple[int, int] = (3, 3)) -> list[nn.Module]:
    padding = (1, 1) if kernel == (3, 3) else (0, 0)
    return [nn.Conv2d(cin, cout, kernel, 1, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class CrnnLines(nn.Module):
    """CNN + BiLSTM text-line recognizer; per-step Softmax over blank + 36 characters."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            *conv_bn(1, 16),
            nn.MaxPool2d(2),
            *conv_bn(16, 32),
            nn.MaxPool2d(2),
            *conv_bn(32, 64),
            nn.MaxPool2d((2, 1)),
            *conv_bn(64, 64),
            *conv_bn(64, 128, (4, 1)),
        )
        self.rnn = nn.LSTM(128, hidden, bidirectional=True, batch_first=True)
        self.classifier = nn.Linear(2 * hidden, printed_lines.CLASSES)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x).squeeze(2).transpose(1, 2)  # [batch, time, 128]
        return self.classifier(self.rnn(features)[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=-1)


def main() -> None:
    common.make_deterministic()
    torch.set_num_threads(1)
    model = CrnnLines()
    print(f"{NAME}: {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    _ctc.train_ctc(
        model,
        printed_lines.draw_lines,
        epochs=EPOCHS,
        lines_per_epoch=LINES_PER_EPOCH,
        batch_size=BATCH_SIZE,
        lr=LEARNING_RATE,
        seed=common.SEED,
        clip=5.0,
    )
    rng = np.random.default_rng(common.SEED + 1)
    test_x, test_y = printed_lines.draw_lines(TEST_LINES, rng)
    calibration = _ctc.eight_bit(printed_lines.draw_lines(CALIBRATION_LINES, rng)[0])
    onnx_model, path, cer, line_accuracy, files = _ctc.export_recognizer(
        NAME, model, (_ctc.eight_bit(test_x), test_y), calibration, as_images=True
    )
    lstm = [n for n in onnx_model.graph.node if n.op_type == "LSTM"]
    directions = [a.s.decode() for n in lstm for a in n.attribute if a.name == "direction"]
    if directions != ["bidirectional"]:
        raise AssertionError(f"{NAME}: expected one bidirectional LSTM op, got {directions}")
    metrics = {
        "held-out CER": cer,
        "held-out character accuracy": 1.0 - cer,
        "held-out line accuracy": line_accuracy,
    }
    common.report(NAME, path, metrics, files)


if __name__ == "__main__":
    main()
