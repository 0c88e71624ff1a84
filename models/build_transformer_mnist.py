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

import math

import torch
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


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit q/k/v/out projections."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = d_model // heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B,T,D] -> [B,H,T,D/H]; the batch axis is inferred (-1) to stay dynamic."""
        return x.reshape(-1, ROWS, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.split_heads(self.query(x))
        key = self.split_heads(self.key(x))
        value = self.split_heads(self.value(x))
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.head_dim)
        context = torch.matmul(torch.softmax(scores, dim=-1), value)
        merged = context.transpose(1, 2).reshape(-1, ROWS, self.heads * self.head_dim)
        return self.out(merged)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: attention and ReLU feed-forward, each residual."""

    def __init__(self, d_model: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.ReLU(), nn.Linear(ffn, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class RowTransformer(nn.Module):
    """Transformer encoder reading MNIST digits row by row (transformer_mnist)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(ROWS, D_MODEL)
        self.position = nn.Parameter(torch.randn(1, ROWS, D_MODEL) * 0.02)
        self.layers = nn.Sequential(*(EncoderLayer(D_MODEL, HEADS, FFN) for _ in range(LAYERS)))
        self.norm = nn.LayerNorm(D_MODEL)
        self.classifier = nn.Linear(D_MODEL, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.layers(self.embed(x) + self.position)
        return self.classifier(self.norm(hidden).mean(dim=1))


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
