"""Train and export ``mlp_digits.onnx``: a three-layer MLP on scikit-learn's 8x8 digits.

Architecture: Linear(64->128)-ReLU-Linear(128->64)-ReLU-Linear(64->10) (exported as Gemm).
Data: ``sklearn.datasets.load_digits()`` (1797 images, pixel values 0..16), a stratified
80/20 split with ``random_state=0``; 360 digits are held out.
Input ``input`` float32 [batch,64] = pixels / 16; output ``logits`` float32 [batch,10].

Usage: python models/build_mlp_digits.py
"""

from __future__ import annotations

import numpy as np
import torch
from _common import (
    CALIBRATION_SIZE,
    DATA_DIR,
    MODELS_DIR,
    SEED,
    assert_close,
    check_dynamic_batch,
    check_model,
    export,
    make_deterministic,
    predict,
    report,
    run_onnx,
    save_calibration,
    save_npz,
    train_classifier,
)
from torch import nn

NAME = "mlp_digits"
EPOCHS = 40
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
PIXEL_MAX = 16.0


class DigitsMLP(nn.Module):
    """Three-layer ReLU MLP for the 8x8 scikit-learn digits (mlp_digits)."""

    def __init__(
        self, features: int = 64, hidden: tuple[int, int] = (128, 64), classes: int = 10
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(features, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 pixel rows [N,64] (values 0..16) and int64 labels, split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits.data.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=0.2, stratify=labels, random_state=SEED
    )
    return train_x, train_y, test_x, test_y


def to_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N,64] in 0..16 -> float32 [N,64] in [0,1], exactly as the model expects."""
    return pixels.astype(np.float32) / np.float32(PIXEL_MAX)


def main() -> None:
    generator = make_deterministic()
    train_pixels, train_labels, test_pixels, test_labels = load_split()
    train_x = torch.from_numpy(to_input(train_pixels))
    test_x = to_input(test_pixels)

    model = DigitsMLP()
    print(
        f"{NAME}: {sum(p.numel() for p in model.parameters())} parameters, "
        f"{len(train_x)} train / {len(test_x)} held out"
    )
    train_classifier(
        model,
        train_x,
        torch.from_numpy(train_labels),
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        lr=LEARNING_RATE,
        weight_decay=1e-4,
        generator=generator,
    )

    torch_logits = predict(model, torch.from_numpy(test_x))
    path = MODELS_DIR / f"{NAME}.onnx"
    export(model, torch.from_numpy(test_x[:2]), path)
    onnx_model = check_model(path)
    check_dynamic_batch(onnx_model)
    onnx_logits = run_onnx(path, {"input": test_x})
    assert_close(f"{NAME} onnxruntime vs torch", torch_logits, onnx_logits)

    accuracy = float((onnx_logits.argmax(1) == test_labels).mean())
    eval_path = DATA_DIR / f"{NAME}_eval.npz"
    save_npz(
        eval_path,
        {
            "task": np.array("classification"),
            "images": test_pixels,
            "labels": test_labels,
            "divisor": np.float32(PIXEL_MAX),
            "input_shape": np.array([64], dtype=np.int64),
            "input": test_x,
            "accuracy": np.float64(accuracy),
        },
    )
    calib_path = save_calibration(NAME, "input", to_input(train_pixels[:CALIBRATION_SIZE]))
    report(NAME, path, {"held-out accuracy": accuracy}, [eval_path, calib_path])


if __name__ == "__main__":
    main()
