"""Train and export ``transformer_mnist.onnx``: a two-layer transformer encoder over MNIST rows.

Each 28x28 digit is read as a sequence of 28 rows of 28 pixels.
    embed   Linear(28->64) per row + learned positional embedding [28,64]
    2 x     pre-norm encoder layer: x + MHA(LN(x)), then x + FFN(LN(x))
            MHA: 4 heads of 16, separate q/k/v/out Linear, Softmax(q k^T / 4) v
            FFN: Linear(64->128)-ReLU-Linear(128->64)
    head    LayerNorm, mean over the 28 rows (ReduceMean), Linear(64->10)

The attention is written out by hand (no ``nn.MultiheadAttention``) so that the exported
graph is plain MatMul / Add / Reshape / Transpose / Softmax / LayerNormalization ops,
with no fused fast-path kernels. Data and split as ``cnn_mnist`` (1000 held out).
Input ``input`` float32 [batch,28,28] in [0,1]; output ``logits`` float32 [batch,10].

Usage: python models/build_transformer_mnist.py
"""

from __future__ import annotations

from _attention import TokenEncoder
from _common import MnistTraining, build_mnist_classifier, report
from torch import nn

NAME = "transformer_mnist"
ROWS = 28
D_MODEL = 64
HEADS = 4
FFN = 128
LAYERS = 2
EPOCHS = 30
BATCH_SIZE = 64
LEARNING_RATE = 2e-3


class RowTransformer(TokenEncoder):
    """Transformer encoder reading MNIST digits row by row (transformer_mnist)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__((ROWS, ROWS), (D_MODEL, HEADS, FFN), LAYERS, nn.ReLU, classes)


TRAINING = MnistTraining(
    epochs=EPOCHS,
    lr=LEARNING_RATE,
    weight_decay=1e-2,
    batch_size=BATCH_SIZE,
    input_shape=(ROWS, ROWS),
)


def main() -> None:
    _, _, path, accuracy, files = build_mnist_classifier(
        NAME, RowTransformer, TRAINING, required_ops={"MatMul", "Softmax"}
    )
    report(NAME, path, {"held-out accuracy": accuracy}, files)


if __name__ == "__main__":
    main()
