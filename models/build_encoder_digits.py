"""Train and export ``encoder_digits.onnx``: a four-layer, eight-head transformer encoder.

The larger encoder of issue 19 (>= 4 layers, >= 4 heads, >= 1 M parameters), on
scikit-learn's 8x8 digits (``sklearn.datasets.load_digits``: 1797 images, the stratified
80/20 split of ``mlp_digits``, 360 held out). Each digit is read as 4 tokens, one per
pair of pixel rows (16 pixels), so the model input is the image reshaped to [batch, 4, 16]
(pixels / 16; a plain reshape, which ``evaluate.py`` does from the stored images).
    embed   Linear(16->144) per token + learned positional embedding [4,144]
    4 x     pre-norm encoder layer: x + MHA(LN(x)), then x + FFN(LN(x))
            MHA: 8 heads of 18, separate q/k/v/out Linear, Softmax(q k^T / sqrt(18)) v
            FFN: Linear(144->576)-GELU-Linear(576->144)
    head    LayerNorm, mean over the 4 tokens (ReduceMean), Linear(144->10)
1.007 M parameters. The attention is written out by hand (as in
``build_transformer_mnist.py``), so the exported graph is plain MatMul / Add / Reshape /
Transpose / Softmax / LayerNormalization ops; GELU exports as its exact Erf form. Trained
with AdamW on a one-cycle schedule, one-pixel shift augmentation of the 8x8 image. Input ``input`` float32
[batch,4,16] in [0,1]; output ``logits`` float32 [batch,10].

Usage: python models/build_encoder_digits.py
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from _attention import TokenEncoder
from _common import (
    CALIBRATION_SIZE,
    export_mnist_classifier,
    make_deterministic,
    report,
    save_calibration,
    shift_augment,
    train_classifier,
)
from build_mlp_digits import PIXEL_MAX, load_split
from torch import nn

NAME = "encoder_digits"
SIDE = 8
TOKENS = 4
TOKEN_PIXELS = 16
D_MODEL = 144
HEADS = 8
FFN = 576
LAYERS = 4
EPOCHS = 12
BATCH_SIZE = 32
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 5e-2


class RowEncoder(TokenEncoder):
    """Transformer encoder reading 8x8 digits two rows per token (encoder_digits)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__((TOKENS, TOKEN_PIXELS), (D_MODEL, HEADS, FFN), LAYERS, nn.GELU, classes)


def to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N,64] in 0..16 -> float32 [N,4,16] in [0,1]."""
    return (pixels.astype(np.float32) / np.float32(PIXEL_MAX)).reshape(-1, TOKENS, TOKEN_PIXELS)


def image_shift(generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """One-pixel shift augmentation applied to the 8x8 image behind each token batch."""
    shift = shift_augment(generator, max_shift=1)

    def augment(batch: torch.Tensor) -> torch.Tensor:
        return shift(batch.reshape(-1, SIDE, SIDE)).reshape(batch.shape)

    return augment


def main() -> None:
    generator = make_deterministic()
    train_pixels, train_labels, test_pixels, test_labels = load_split()
    train_x = torch.from_numpy(to_input(train_pixels))
    model = RowEncoder()
    params = sum(p.numel() for p in model.parameters())
    print(f"{NAME}: {params} parameters; digits: {len(train_x)} train, {len(test_pixels)} held out")
    schedule = {"epochs": EPOCHS, "batch_size": BATCH_SIZE, "lr": LEARNING_RATE}
    labels = torch.from_numpy(train_labels)
    augment = image_shift(generator)
    train_classifier(
        model,
        train_x,
        labels,
        weight_decay=WEIGHT_DECAY,
        generator=generator,
        augment=augment,
        **schedule,
    )
    path, onnx_model, accuracy, eval_path = export_mnist_classifier(
        NAME,
        model,
        test_pixels.reshape(-1, TOKENS, TOKEN_PIXELS),
        to_input(test_pixels),
        test_labels,
        divisor=PIXEL_MAX,
        input_shape=(TOKENS, TOKEN_PIXELS),
    )
    ops = {node.op_type for node in onnx_model.graph.node}
    if not {"MatMul", "Softmax", "Erf", "LayerNormalization"} <= ops:
        raise AssertionError(f"{NAME}: unexpected ops {sorted(ops)}")
    calib_path = save_calibration(NAME, "input", to_input(train_pixels[:CALIBRATION_SIZE]))
    report(NAME, path, {"held-out accuracy": accuracy}, [eval_path, calib_path])


if __name__ == "__main__":
    main()
