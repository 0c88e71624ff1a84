"""Shared training and export of the CTC text-line recognizers (``ctc_lines``, ``crnn_lines``).

``train_ctc`` trains a model whose ``logits(x)`` are [batch, time, classes] with CTC loss
(blank class 0), AdamW and a one-cycle lr on fresh lines every epoch; ``export_recognizer``
exports the per-step Softmax model, checks it against torch on onnxruntime and writes its
held-out set (CER and line accuracy by greedy decoding, ``text_lines.py``) and calibration
batch. Only the build scripts import this module; it needs torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import _common as common
import numpy as np
import onnx
import text_lines
import torch
from torch import nn

Draw = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def ctc_targets(labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated class targets (label + 1) and their lengths."""
    rows = text_lines.references(labels)
    flat = torch.tensor([c + 1 for row in rows for c in row], dtype=torch.long)
    return flat, torch.tensor([len(row) for row in rows], dtype=torch.long)


def train_ctc(
    model: nn.Module,
    draw: Draw,
    *,
    epochs: int,
    lines_per_epoch: int,
    batch_size: int,
    lr: float,
    seed: int,
    clip: float | None = None,
) -> None:
    """Train ``model.logits`` with CTC on ``draw(lines_per_epoch, rng)`` lines per epoch."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = (lines_per_epoch + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps
    )
    ctc = nn.CTCLoss(blank=text_lines.BLANK, zero_infinity=True)
    for epoch in range(epochs):
        started = time.perf_counter()
        model.train()
        lines, targets = draw(lines_per_epoch, rng)
        total = 0.0
        for start in range(0, lines_per_epoch, batch_size):
            batch = torch.from_numpy(lines[start : start + batch_size])
            flat, lengths = ctc_targets(targets[start : start + batch_size])
            log_probs = torch.log_softmax(model.logits(batch), -1).transpose(0, 1)
            steps_in = torch.full((len(batch),), log_probs.shape[0], dtype=torch.long)
            loss = ctc(log_probs, flat, steps_in, lengths)
            optimizer.zero_grad()
            loss.backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        print(
            f"  epoch {epoch + 1:2d}/{epochs}: ctc loss {total / lines_per_epoch:.4f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    model.eval()


def eight_bit(lines: np.ndarray) -> np.ndarray:
    """Lines in [0, 1] rounded to the 256 levels of an 8-bit image (as float32)."""
    return (np.round(lines * 255.0) / 255.0).astype(np.float32)


def export_recognizer(
    name: str,
    model: nn.Module,
    test: tuple[np.ndarray, np.ndarray],
    calibration: np.ndarray,
    *,
    as_images: bool = False,
) -> tuple[onnx.ModelProto, Path, float, float, list[Path]]:
    """Export ``model`` to ``<name>.onnx`` (output ``probabilities``), check it and write its
    held-out set and calibration batch. With ``as_images`` the held-out lines, which must be
    on the 8-bit grid (``eight_bit``), are stored as uint8 ``images`` with ``divisor`` 255.
    Returns (model, path, CER, line accuracy, data files)."""
    test_x, test_y = test
    path = common.MODELS_DIR / f"{name}.onnx"
    expected = common.predict(model, torch.from_numpy(test_x))
    common.export(model, torch.from_numpy(test_x[:2]), path, output_name="probabilities")
    onnx_model = common.check_model(path)
    common.check_dynamic_batch(onnx_model)
    produced = common.run_onnx(path, {"input": test_x})
    common.assert_close(f"{name} onnxruntime vs torch", expected, produced)
    cer, line_accuracy = text_lines.cer_and_line_accuracy(produced, test_y)
    eval_path = common.DATA_DIR / f"{name}_eval.npz"
    if as_images:
        images = np.round(test_x[:, 0] * 255.0).astype(np.uint8)
        if not np.array_equal(images.astype(np.float32) / np.float32(255.0), test_x[:, 0]):
            raise AssertionError(f"{name}: held-out lines are not on the 8-bit grid")
        inputs = {
            "images": images,
            "divisor": np.float32(255.0),
            "input_shape": np.array(test_x.shape[1:], np.int64),
        }
    else:
        inputs = {"input": test_x}
    common.save_npz(
        eval_path,
        {
            "task": np.array("ctc"),
            **inputs,
            "labels": test_y,
            "cer": np.float64(cer),
            "line_accuracy": np.float64(line_accuracy),
        },
    )
    calib_path = common.save_calibration(name, "input", calibration)
    return onnx_model, path, cer, line_accuracy, [eval_path, calib_path]
