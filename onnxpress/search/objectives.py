"""What a search trial is scored on: accuracy on held-out data, size on disk, MACs.

Accuracy comes from the user's metric, a Python callable ``metric(outputs, labels) -> float``
(higher is better; ``outputs`` is the list of model outputs over the whole evaluation set,
``labels`` the set's ``labels`` array or None), named ``module:function`` or
``path/to/file.py:function``. Without one, accuracy is the agreement with the float model on
the same inputs, by the yardstick of the first output's task (``onnxpress.core.task_metric``):
1 - the share of changed top-1 predictions, or 1 - the noise-to-signal ratio.

The evaluation set is an ``.npz`` keyed by the model's input names, with an optional
``labels`` array; the eval sets of ``models/data`` (``images``, ``divisor``, ``input_shape``)
are read as they are.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxpress.core.calibration_data import CalibrationData, check_npz_headers
from onnxpress.core.errors import OnnxpressError
from onnxpress.core.sizing import serialized_size
from onnxpress.core.task_metric import concatenated, task_score
from onnxpress.core.verify import Runner, run_all

Batch = dict[str, np.ndarray]
Metric = Callable[[list[np.ndarray], "np.ndarray | None"], float]
EVAL_BATCH = 256  # samples per onnxruntime run over the evaluation set


class SearchError(OnnxpressError):
    """Bad search input (metric, storage, time budget, objectives) or a search that found
    nothing to report."""


class TrialFailed(Exception):
    """A trial that produced no scored model; the message is its reason (one line)."""


@dataclass
class EvalSet:
    """Evaluation inputs in batches, and the labels of all samples (or None)."""

    batches: list[Batch]
    labels: np.ndarray | None
    origin: str

    @classmethod
    def from_npz(cls, path: str | Path, model: onnx.ModelProto) -> EvalSet:
        file = Path(path)
        if not file.is_file():
            raise SearchError(f"{file}: evaluation data not found")
        check_npz_headers(file)
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        inputs = _model_inputs(model)
        if "images" in arrays and "divisor" in arrays and len(inputs) == 1:
            images = arrays["images"].astype(np.float32) / np.float32(arrays["divisor"])
            shape = [int(d) for d in arrays.get("input_shape", images.shape[1:])]
            arrays[inputs[0]] = images.reshape(len(images), *shape)
        missing = [name for name in inputs if name not in arrays]
        if missing:
            raise SearchError(
                f"{file}: no array for model input(s) {missing} (keys: {sorted(arrays)})"
            )
        labels = arrays.get("labels", arrays.get("target"))
        count = len(arrays[inputs[0]])
        batches = [
            {name: arrays[name][start : start + EVAL_BATCH] for name in inputs}
            for start in range(0, count, EVAL_BATCH)
        ]
        return cls(batches, labels, str(file))

    @classmethod
    def from_calibration(cls, calibration: CalibrationData) -> EvalSet:
        return cls(list(calibration.batches()), None, calibration.origin)


def _model_inputs(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def load_metric(spec: str) -> Metric:
    """The callable named by ``module:function`` or ``file.py:function`` (one-line errors)."""
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise SearchError(f"metric '{spec}': expected module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise SearchError(f"metric '{spec}': {file} not found")
            name = "onnxpress_metric_" + re.sub(r"\W", "_", file.stem)
            loader = importlib.util.spec_from_file_location(name, file)
            if loader is None or loader.loader is None:
                raise SearchError(f"metric '{spec}': {file} is not a loadable Python file")
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except SearchError:
        raise
    except Exception as exc:
        raise SearchError(f"metric '{spec}': cannot load: {type(exc).__name__}: {exc}") from None
    found = getattr(module, function, None)
    if not callable(found):
        raise SearchError(f"metric '{spec}': {module_name} has no callable '{function}'")
    return found


def model_outputs(
    model: onnx.ModelProto,
    eval_set: EvalSet,
    runner: Callable[[Batch], list[np.ndarray]] | None = None,
) -> list[np.ndarray]:
    """Each output of ``model`` over the whole evaluation set: onnxruntime as users run it,
    or ``runner`` (e.g. a target's emulated int8 arithmetic)."""
    batches = run_all(runner or Runner(model, optimized=True), eval_set.batches)
    joined = [concatenated(batches, index) for index in range(len(batches[0]))]
    return [
        j if j is not None else np.asarray([b[i] for b in batches], dtype=object)
        for i, j in enumerate(joined)
    ]


@dataclass
class Scorer:
    """Accuracy of a model's outputs: the user's metric, or agreement with the reference."""

    eval_set: EvalSet
    reference: list[np.ndarray]
    metric: Metric | None = None
    metric_name: str = "agreement"

    def score(self, outputs: list[np.ndarray]) -> float:
        if self.metric is None:
            return 1.0 - task_score(self.reference[0], outputs[0]).value
        try:
            value = self.metric(outputs, self.eval_set.labels)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise SearchError(
                f"metric '{self.metric_name}' raised {type(exc).__name__}: {exc}"
            ) from None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SearchError(
                f"metric '{self.metric_name}' returned {type(value).__name__}, not a number"
            ) from None
        if not math.isfinite(number):
            raise SearchError(f"metric '{self.metric_name}' returned {number}")
        return number


def top1_accuracy(outputs: list[np.ndarray], labels: np.ndarray | None) -> float:
    """Share of samples whose first output's argmax is the label (a ``--metric``)."""
    if labels is None:
        raise ValueError("top1_accuracy needs 'labels' in the evaluation data")
    predicted = np.argmax(outputs[0].reshape(len(labels), -1), axis=1)
    return float(np.mean(predicted == labels.reshape(-1)))


def negative_rmse(outputs: list[np.ndarray], labels: np.ndarray | None) -> float:
    """Minus the RMSE of the first output against the labels (a ``--metric``: higher is
    better)."""
    if labels is None:
        raise ValueError("negative_rmse needs 'labels' in the evaluation data")
    error = outputs[0].reshape(-1).astype(np.float64) - labels.reshape(-1).astype(np.float64)
    return -float(np.sqrt(np.mean(error * error)))


def file_size(model: onnx.ModelProto) -> int:
    """Bytes of the serialized model, as written to disk."""
    return serialized_size(model)
