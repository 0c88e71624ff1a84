"""Transformer building blocks shared by the encoder build scripts (transformer_mnist,
encoder_digits): multi-head self-attention written out by hand and a pre-norm encoder layer.

The attention has separate q/k/v/out Linear layers and splits heads with Reshape +
Transpose, so the exported graph is plain MatMul / Add / Reshape / Transpose / Softmax /
LayerNormalization ops (no fused fast-path kernels). The token count is fixed at export
(the batch axis is inferred with -1 to stay dynamic).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit q/k/v/out projections."""

    def __init__(self, d_model: int, heads: int, tokens: int) -> None:
        super().__init__()
        self.heads = heads
        self.tokens = tokens
        self.head_dim = d_model // heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B,T,D] -> [B,H,T,D/H]; the batch axis is inferred (-1) to stay dynamic."""
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.split_heads(self.query(x))
        key = self.split_heads(self.key(x))
        value = self.split_heads(self.value(x))
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.head_dim)
        context = torch.matmul(torch.softmax(scores, dim=-1), value)
        merged = context.transpose(1, 2).reshape(-1, self.tokens, self.heads * self.head_dim)
        return self.out(merged)


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer: attention and a feed-forward block, each residual."""

    def __init__(
        self, d_model: int, heads: int, ffn: int, tokens: int, activation: type[nn.Module]
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, heads, tokens)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn), activation(), nn.Linear(ffn, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TokenEncoder(nn.Module):
    """Token embedding + learned positions, pre-norm encoder layers, a final LayerNorm, the
    mean over the tokens (ReduceMean) and a Linear classifier."""

    def __init__(
        self,
        shape: tuple[int, int],
        widths: tuple[int, int, int],
        layers: int,
        activation: type[nn.Module],
        classes: int = 10,
    ) -> None:
        """``shape`` (tokens, features per token); ``widths`` (d_model, heads, ffn)."""
        super().__init__()
        tokens, features = shape
        d_model, heads, ffn = widths
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
        self.layers = nn.Sequential(
            *(EncoderLayer(d_model, heads, ffn, tokens, activation) for _ in range(layers))
        )
        self.norm = nn.LayerNorm(d_model)
        self.classifier = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.layers(self.embed(x) + self.position)
        return self.classifier(self.norm(hidden).mean(dim=1))
