"""Knowledge distillation: fine-tune a compressed student ONNX model against its teacher.

    loss = KL(softmax(t/T) ‖ softmax(s/T))·T²  [+ α·CE(s, labels)]  [+ w·Σ ‖A(s_f) − t_f‖²/E t_f²]

on the logits behind an output Softmax/LogSoftmax, on probabilities (log p as logits) where
the output holds them, per time step for sequence outputs (``distill_heads``), and MSE to
the teacher for regression outputs; hint pairs get a learned adapter where a pruned student
has fewer channels (``distill_features``). A run whose held-out loss never falls keeps the
input weights and reports "no improvement"; a degenerate loss is an error.
The teacher runs once per sample on onnxruntime (cached); the student runs in torch through
``onnxpress.train.torch_convert`` (QDQ pairs as fake-quant with a straight-through estimator, so
a quantized student is trained quantization-aware and its scales can be learned). A seeded
held-out split picks the best epoch (the untuned student counts as epoch 0, so the result is
never worse on it) and stops early. The tuned values are written back into the same graph:
nodes, inputs and outputs are unchanged, only initializers differ. The result is checked
like any pass: checker and strict shape inference, then onnxruntime against the teacher.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.analysis.refit import TensorCapture
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.errors import CalibrationError, OnnxpressError, VerificationError
from onnxpress.core.io import prepare_model
from onnxpress.core.verify import METRICS, Runner, check_structure
from onnxpress.train.distill_features import build_adapters, feature_pairs, hint_pairs
from onnxpress.train.distill_heads import Head, head_plan, is_sequence, softmax_producer
from onnxpress.train.distill_loop import split_rows, train
from onnxpress.train.distill_options import (
    DistillOptions,
    DistillProgress,
    DistillReport,
    LossPlan,
    require_torch,
)

logger = logging.getLogger(__name__)

DataLike = CalibrationData | str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]]
TEACHER_BATCH = 256


def load_labels(labels: np.ndarray | str | os.PathLike[str] | None) -> np.ndarray | None:
    """Labels as an int64 array: an array, or an .npz holding ``labels``."""
    if labels is None or isinstance(labels, np.ndarray):
        return None if labels is None else labels.astype(np.int64).reshape(-1)
    path = Path(labels)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "labels" not in archive.files:
                raise CalibrationError(f"{path}: holds no 'labels' array")
            return np.asarray(archive["labels"]).astype(np.int64).reshape(-1)
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None


def stack_samples(data: CalibrationData, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All batches concatenated along the first axis, per model input."""
    data.validate(model)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in data.batches():
        for name, array in batch.items():
            parts.setdefault(name, []).append(array)
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def _chunks(samples: Mapping[str, np.ndarray], size: int) -> Iterable[dict[str, np.ndarray]]:
    count = len(next(iter(samples.values())))
    for start in range(0, count, size):
        yield {name: array[start : start + size] for name, array in samples.items()}


def capture_tensors(
    model: onnx.ModelProto, samples: Mapping[str, np.ndarray], names: Iterable[str]
) -> dict[str, np.ndarray]:
    """The named tensors of ``model`` for every sample (one onnxruntime session)."""
    wanted = list(dict.fromkeys(names))
    capture = TensorCapture(model, wanted)
    rows = [capture(chunk, wanted) for chunk in _chunks(samples, TEACHER_BATCH)]
    return {name: np.concatenate([row[name] for row in rows]) for name in wanted}


def _head_inputs(model: onnx.ModelProto) -> list[str]:
    """The Softmax/LogSoftmax inputs behind the graph outputs (candidate logits)."""
    found = (softmax_producer(model, o.name) for o in model.graph.output)
    return [node.input[0] for node in found if node is not None]


def _loss_plan(
    torch: Any,
    student: onnx.ModelProto,
    samples: Mapping[str, np.ndarray],
    train_rows: np.ndarray,
    heads: list[tuple[Head, Head]],
    pairs: list[tuple[str, str]],
    teacher_values: Mapping[str, np.ndarray],
) -> LossPlan:
    """Heads and feature pairs, adapters fit on up to 512 training samples of both models."""
    probe = train_rows[: min(len(train_rows), 512)]
    subset = {name: array[probe] for name, array in samples.items()}
    student_values = capture_tensors(student, subset, [s for s, _ in pairs])
    teacher_probe = {t: teacher_values[t][probe] for _, t in pairs}
    features = feature_pairs(pairs, student_values, teacher_probe)
    return LossPlan(heads, features, build_adapters(torch, features, student_values, teacher_probe))


class _Deterministic:
    """Seeded, single-process torch settings for the run; restored afterwards."""

    def __init__(self, torch: Any, threads: int) -> None:
        self.torch, self.threads = torch, threads

    def __enter__(self) -> None:
        self.saved = (
            self.torch.get_num_threads(),
            self.torch.are_deterministic_algorithms_enabled(),
            self.torch.utils.deterministic.fill_uninitialized_memory,
        )
        self.torch.set_num_threads(self.threads)
        self.torch.use_deterministic_algorithms(True, warn_only=True)
        # Filling every new tensor with NaN costs a third of the CPU time and changes
        # nothing here: no kernel reads memory it did not write.
        self.torch.utils.deterministic.fill_uninitialized_memory = False

    def __exit__(self, *exc: object) -> None:
        self.torch.set_num_threads(self.saved[0])
        self.torch.use_deterministic_algorithms(self.saved[1])
        self.torch.utils.deterministic.fill_uninitialized_memory = self.saved[2]


def same_structure(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """Same nodes (ops, attributes, wiring), inputs, outputs and initializer names/types."""

    def key(m: onnx.ModelProto) -> tuple[Any, ...]:
        g = m.graph
        return (
            [n.SerializeToString(deterministic=True) for n in g.node],
            [i.SerializeToString(deterministic=True) for i in g.input],
            [o.SerializeToString(deterministic=True) for o in g.output],
            [(t.name, t.data_type, list(t.dims)) for t in g.initializer],
        )

    return key(a) == key(b)


def _check_feature_names(
    student: onnx.ModelProto, teacher: onnx.ModelProto, pairs: Iterable[tuple[str, str]]
) -> None:
    def tensors(m: onnx.ModelProto) -> set[str]:
        return {o for n in m.graph.node for o in n.output} | {i.name for i in m.graph.input}

    for role, model, names in (
        ("student", student, [s for s, _ in pairs]),
        ("teacher", teacher, [t for _, t in pairs]),
    ):
        unknown = [name for name in names if name not in tensors(model)]
        if unknown:
            raise OnnxpressError(f"distill: the {role} has no tensor(s) {', '.join(unknown)}")


def _metric(
    names: list[str], reference: list[np.ndarray], candidate: list[np.ndarray], metric: str
) -> float:
    fn = METRICS[metric][0]
    return max(fn(r, c) for r, c in zip(reference, candidate, strict=True)) if names else 0.0


def _run(model: onnx.ModelProto, samples: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    runner = Runner(model)
    rows = [runner(chunk) for chunk in _chunks(samples, TEACHER_BATCH)]
    return [np.concatenate([row[i] for row in rows]) for i in range(len(runner.output_names))]


def distill(
    student: onnx.ModelProto | str | os.PathLike[str],
    teacher: onnx.ModelProto | str | os.PathLike[str],
    data: DataLike,
    *,
    labels: np.ndarray | str | os.PathLike[str] | None = None,
    options: DistillOptions | None = None,
    on_progress: DistillProgress | None = None,
    **settings: Any,
) -> tuple[onnx.ModelProto, DistillReport]:
    """Fine-tune ``student`` to match ``teacher`` on ``data``; returns the tuned model.

    ``data`` is a CalibrationData, an ``.npz`` file or folder, or an iterable of input
    dicts; ``labels`` (an int array or an ``.npz`` with ``labels``) adds the hard-label
    loss. Settings are DistillOptions fields (``epochs=5, lr=1e-3``) or ``options``.
    """
    torch = require_torch()
    opts = options if options is not None else DistillOptions(**settings)
    started = time.perf_counter()
    student_model, _ = prepare_model(student)
    teacher_model, _ = prepare_model(teacher)
    calibration = CalibrationData.coerce(Path(data) if isinstance(data, os.PathLike) else data)
    if calibration is None:
        raise CalibrationError("distill needs data")
    samples = stack_samples(calibration, student_model)
    count = len(next(iter(samples.values())))
    label_array = load_labels(labels)
    if label_array is not None and len(label_array) != count:
        raise CalibrationError(f"{len(label_array)} labels for {count} samples")
    pairs = [*opts.feature_losses, *hint_pairs(student_model, teacher_model, opts.hints)]
    _check_feature_names(student_model, teacher_model, pairs)
    outputs = [o.name for o in teacher_model.graph.output]
    teacher_values = capture_tensors(
        teacher_model, samples, [*outputs, *_head_inputs(teacher_model), *(t for _, t in pairs)]
    )
    heads = head_plan(student_model, teacher_model, [teacher_values[o] for o in outputs], opts.task)
    if label_array is not None:
        sequences = [t.output for _, t in heads if is_sequence(t, teacher_values[t.output])]
        if sequences:
            raise CalibrationError(
                f"distill: labels are one class per sample, but output {sequences[0]} has "
                "several rows of classes per sample (a sequence); distill it without --labels"
            )
    train_rows, held_rows = split_rows(count, opts.holdout, opts.seed)
    plan = _loss_plan(torch, student_model, samples, train_rows, heads, pairs, teacher_values)
    targets = [teacher_values[name] for name in plan.teacher_tensors]
    with _Deterministic(torch, opts.threads):
        tuned, report = train(
            torch,
            student_model,
            samples,
            targets,
            plan,
            label_array,
            opts,
            on_progress,
        )
    if not same_structure(student_model, tuned):
        raise VerificationError("distill", "write-back changed the graph structure")
    try:
        check_structure(tuned)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise VerificationError("distill", str(exc).strip().splitlines()[0]) from None
    reference = [teacher_values[o] for o in outputs]
    metric = "top1" if all(t.kind != "regression" for _, t in heads) else "rel-l2"
    before_outputs, after_outputs = _run(student_model, samples), _run(tuned, samples)
    report.metric = metric
    report.metric_before = _metric(outputs, reference, before_outputs, metric)
    report.metric_after = _metric(outputs, reference, after_outputs, metric)
    if len(held_rows):
        held = [r[held_rows] for r in reference]
        report.holdout_metric_before = _metric(
            outputs, held, [o[held_rows] for o in before_outputs], metric
        )
        report.holdout_metric_after = _metric(
            outputs, held, [o[held_rows] for o in after_outputs], metric
        )
    report.heads = [t.describe() for _, t in heads]
    report.features = [pair.describe() for pair in plan.features]
    report.seconds = time.perf_counter() - started
    if report.improved:
        logger.info("%s", report.describe())
    else:
        logger.warning("%s", report.describe())
    return tuned, report
