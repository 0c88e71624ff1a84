"""Verification of a rewritten model: structure, then a differential run on onnxruntime.

Structure: ``onnx.checker.check_model(full_check=True)`` and strict shape inference.
Numerics: the rewritten model and a reference model run on the same inputs (calibration
batches, or seeded random inputs spanning negative and positive values at two batch sizes
when the batch axis is symbolic). Lossless passes must match within a relative tolerance of
the output's scale; lossy passes are judged by a named metric against a budget.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxpress.core import sizing
from onnxpress.core.calibration_data import Batch, CalibrationData
from onnxpress.core.errors import InvalidModelError
from onnxpress.core.ir import copy_model
from onnxpress.core.partition import CHUNK_NODES, NotPartitionable, PartitionedRunner
from onnxpress.core.precision import (  # re-exported: the verifier's tolerances
    LOSSLESS_TOLERANCE,
    compute_tolerance,
    lossless_tolerance,
)
from onnxpress.core.random_inputs import (
    HOW_TO_GIVE_DATA,
    NeedsRealDataError,
    random_inputs,
    unconstrained_integer_inputs,
)
from onnxpress.core.stats import shape_skeleton
from onnxpress.core.task_metric import as_array, concatenated, task_score

logger = logging.getLogger(__name__)

MAX_CALIBRATION_BATCHES = 4


def _rel_l2(ref: np.ndarray, new: np.ndarray) -> float:
    ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
    denom = float(np.linalg.norm(ref64))
    return float(np.linalg.norm(ref64 - new64)) / max(denom, 1e-12)


def _max_rel(ref: np.ndarray, new: np.ndarray) -> float:
    ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
    scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
    return float(np.max(np.abs(ref64 - new64))) / max(scale, 1e-12) if ref64.size else 0.0


def _top1_disagreement(ref: np.ndarray, new: np.ndarray) -> float:
    if ref.ndim == 0 or ref.shape[-1] < 2:
        return _max_rel(ref, new)
    return float(np.mean(np.argmax(ref, axis=-1) != np.argmax(new, axis=-1)))


# metric name -> (function, description); lower is better, compared against a budget.
METRICS: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], str]] = {
    "rel-l2": (_rel_l2, "relative L2 error of each output, worst output"),
    "max-rel": (_max_rel, "max absolute error over the output's max magnitude"),
    "top1": (_top1_disagreement, "fraction of argmax (last axis) predictions that changed"),
    "task": (
        lambda ref, new: task_score(ref, new).value,
        "per output, its task's yardstick: top-1 agreement, embedding rank agreement, or "
        "noise-to-signal ratio (onnxpress.core.task_metric)",
    ),
}


@dataclass
class Comparison:
    metric: str
    value: float
    output: str
    limit: float

    @property
    def ok(self) -> bool:
        return bool(self.value <= self.limit)


def _save_with_external_data(model: onnx.ModelProto, path: str) -> None:
    """Save a copy (onnx's external-data save rewrites the proto it is given)."""
    onnx.save_model(copy_model(model), path, save_as_external_data=True, location="model.data")


def check_structure(model: onnx.ModelProto) -> None:
    """Raise onnx's checker / shape-inference errors for an invalid model."""
    if sizing.too_large_to_serialize(model):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            _save_with_external_data(model, path)
            onnx.checker.check_model(path, full_check=True)
            onnx.shape_inference.infer_shapes_path(
                path,
                os.path.join(tmp, "inferred.onnx"),
                check_type=True,
                strict_mode=True,
                data_prop=True,
            )
        return
    # the checker's full check is the strict inference below, run on the model without its
    # large weights' values (typed inputs instead: all inference reads of them)
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(
        shape_skeleton(model), check_type=True, strict_mode=True, data_prop=True
    )


_THREADS: list[int | None] = [None]  # set_session_threads: None = as many as allowed


def set_session_threads(threads: int | None) -> None:
    """Threads of every onnxruntime session this process opens from now on (None: the CPUs
    this process may run on, at most 4); ``search --threads 1`` for one-thread workers."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, not {threads}")
    _THREADS[0] = threads


def session_threads() -> int:
    if _THREADS[0] is not None:
        return _THREADS[0]
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return min(4, allowed or os.cpu_count() or 1)


class Runner:
    """An onnxruntime session over a ModelProto: graph optimizations off, or with
    ``optimized`` at onnxruntime's default level, as users run it (QDQ on integer kernels).
    ``exact_int8`` asks for its exact u8 x u8 kernels where the default ones sum u8 x s8 pairs
    in int16 (x86 without VNNI: ``session.x64quantprecision``)."""

    def __init__(
        self, model: onnx.ModelProto, optimized: bool = False, exact_int8: bool = False
    ) -> None:
        options = ort.SessionOptions()
        if exact_int8:
            options.add_session_config_entry("session.x64quantprecision", "1")
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimized
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 3
        options.intra_op_num_threads = session_threads()
        # A session here runs a few feeds once each. The memory pattern is planned on the
        # first run and pays off only when a shape repeats; planning it is superlinear in
        # the node count (seconds at 80k nodes) and never changes the results.
        options.enable_mem_pattern = False
        if sizing.too_large_to_serialize(model):
            self._tmp = tempfile.TemporaryDirectory()
            path = os.path.join(self._tmp.name, "model.onnx")
            _save_with_external_data(model, path)
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        else:
            self.session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feed: Batch) -> list[np.ndarray]:
        return [as_array(x) for x in self.session.run(None, feed)]


def verification_inputs(
    model: onnx.ModelProto, calibration: CalibrationData | None, seed: int
) -> list[Batch]:
    if calibration is not None:
        return list(calibration.batches(limit=MAX_CALIBRATION_BATCHES))
    return random_inputs(model, seed)


def verification_runner(
    model: onnx.ModelProto, optimized: bool = False, exact_int8: bool = False
) -> Runner | PartitionedRunner:
    """A Runner, or for very large graphs a PartitionedRunner with the same outputs.

    onnxruntime's session creation is superlinear in graph size; chunking keeps the
    verifier's cost linear (docs/BENCHMARKS.md, "Scale").
    """
    if len(model.graph.node) > 2 * CHUNK_NODES and not sizing.too_large_to_serialize(model):
        try:
            return PartitionedRunner(
                model, lambda m: Runner(m, optimized, exact_int8), chunk_nodes=CHUNK_NODES
            )
        except NotPartitionable as exc:
            logger.debug("running the model in one session: %s", exc)
    return Runner(model, optimized, exact_int8)


def reference_outputs(
    model: onnx.ModelProto,
    feeds: list[Batch],
    from_calibration: bool,
    make_runner: Callable[[onnx.ModelProto], Runner | PartitionedRunner] | None = None,
) -> tuple[Runner | PartitionedRunner, list[list[np.ndarray]]]:
    """The original model's runner and outputs; the model's own failure in onnxruntime is
    an InvalidModelError (or NeedsRealDataError on random inputs), with onnxruntime's reason."""
    try:
        runner = (make_runner or verification_runner)(model)
    except Exception as exc:
        raise InvalidModelError(
            f"the input model fails in onnxruntime: {_first_line(exc)}"
        ) from exc
    try:
        return runner, run_all(runner, feeds)
    except Exception as exc:
        reason = _first_line(exc)
        if from_calibration:
            raise InvalidModelError(
                f"the input model fails in onnxruntime on the calibration data: {reason}"
            ) from exc
        suspects = unconstrained_integer_inputs(model)
        named = f" for input(s) {', '.join(suspects)}" if suspects else ""
        raise NeedsRealDataError(
            f"the input model fails in onnxruntime on random verification inputs ({reason}); "
            f"{HOW_TO_GIVE_DATA}{named}, or use --verify structure"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n")[0].split())[:400]


def run_all(
    runner: Callable[[Batch], list[np.ndarray]], feeds: list[Batch]
) -> list[list[np.ndarray]]:
    return [runner(feed) for feed in feeds]


def compare_lossless(
    names: list[str],
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    tolerance: float = LOSSLESS_TOLERANCE,
    compute: Any | None = None,
) -> Comparison:
    """Worst max|ref - new| / max|ref| over outputs and feeds (``max-rel``), against
    ``tolerance`` or, for an fp16/bf16 output, its dtype's rounding (``lossless_tolerance``),
    and at least the rounding of ``compute``, the float the model computes in
    (``core.precision.compute_dtype``)."""
    least = compute_tolerance(compute, tolerance)
    worst = Comparison("max-rel", 0.0, "", tolerance)
    for ref_outs, new_outs in zip(reference, candidate, strict=True):
        for name, ref, new in zip(names, ref_outs, new_outs, strict=True):
            if ref.shape != new.shape:
                return Comparison(
                    "shape", float("inf"), f"{name} {ref.shape} vs {new.shape}", tolerance
                )
            if ref.dtype != new.dtype:
                return Comparison(
                    "dtype", float("inf"), f"{name} {ref.dtype} vs {new.dtype}", tolerance
                )
            limit = max(lossless_tolerance(ref.dtype, tolerance), least)
            if ref.dtype.kind in "fcV":  # V: ml_dtypes (bfloat16, float8)
                matched = _matching_nonfinite(_as_float64(ref), _as_float64(new))
                if matched is None:
                    return Comparison("nan/inf", float("inf"), name, limit)
                value = _max_rel(*matched)
            else:
                value = 0.0 if identical(ref, new) else float("inf")
            if _ratio(value, limit) > _ratio(worst.value, worst.limit) or not worst.output:
                worst = Comparison("max-rel", value, name, limit)
    return worst


def identical(a: Any, b: Any) -> bool:
    """Same shape, dtype and values (NaN equal to NaN); object arrays (sequences, optional
    values) element by element."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.kind == "O":
            return all(identical(x, y) for x, y in zip(a.reshape(-1), b.reshape(-1), strict=True))
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    return bool(a == b)


def _as_float64(array: np.ndarray) -> np.ndarray:
    """float64 values; a complex array as (real, imaginary) pairs on a last axis."""
    if array.dtype.kind == "c":
        return np.stack([array.real, array.imag], -1).astype(np.float64)
    return array.astype(np.float64)


def _matching_nonfinite(ref: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Both arrays with the NaN/inf they share set to 0; None when they differ there."""
    ref_bad, new_bad = ~np.isfinite(ref), ~np.isfinite(new)
    if not (ref_bad.any() or new_bad.any()):
        return ref, new
    same = (ref == new) | (np.isnan(ref) & np.isnan(new))
    if not np.array_equal(ref_bad & same, ref_bad) or not np.array_equal(new_bad & same, new_bad):
        return None
    return np.where(ref_bad, 0.0, ref), np.where(new_bad, 0.0, new)


def max_rel_error(ref: np.ndarray, new: np.ndarray) -> float:
    """``max-rel`` of two float outputs; the NaN/inf they share (a -inf log-probability)
    match, and infinite where they differ in them."""
    matched = _matching_nonfinite(ref.astype(np.float64), new.astype(np.float64))
    return float("inf") if matched is None else _max_rel(*matched)


def _ratio(value: float, limit: float) -> float:
    if limit > 0:
        return value / limit
    return 0.0 if value == 0 else float("inf")


def compare_task(
    names: list[str],
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    budget: float | None,
) -> Comparison:
    """The output furthest over (or nearest to) its task budget, all batches together."""
    worst: tuple[float, Comparison] | None = None
    for index, name in enumerate(names):
        ref, new = concatenated(reference, index), concatenated(candidate, index)
        pairs = (
            [(ref, new)]
            if ref is not None and new is not None and ref.shape == new.shape
            else [(r[index], n[index]) for r, n in zip(reference, candidate, strict=True)]
        )
        for r, n in pairs:
            if r.shape != n.shape:
                return Comparison("shape", float("inf"), f"{name} {r.shape} vs {n.shape}", 0.0)
            if identical(r, n):
                continue
            if r.dtype.kind == "f":
                matched = _matching_nonfinite(r, n)
                if matched is None:
                    return Comparison("nan/inf", float("inf"), name, budget or 0.0)
                dtype = r.dtype
                r, n = matched[0].astype(dtype), matched[1].astype(dtype)
            score = task_score(r, n, budget)
            if worst is None or score.ratio > worst[0]:
                worst = (score.ratio, Comparison(score.kind, score.value, name, score.budget))
    return worst[1] if worst else Comparison("task", 0.0, "", budget or 0.0)


def compare_metric(
    names: list[str],
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    metric: str,
    budget: float | None,
) -> Comparison:
    if metric == "task":
        return compare_task(names, reference, candidate, budget)
    if budget is None:
        raise ValueError(f"metric {metric} needs a budget")
    fn = METRICS[metric][0]
    worst = Comparison(metric, 0.0, "", budget)
    for ref_outs, new_outs in zip(reference, candidate, strict=True):
        for name, ref, new in zip(names, ref_outs, new_outs, strict=True):
            if ref.shape != new.shape:
                return Comparison(
                    "shape", float("inf"), f"{name} {ref.shape} vs {new.shape}", budget
                )
            if identical(ref, new):
                value = 0.0
            elif np.issubdtype(ref.dtype, np.floating):
                matched = _matching_nonfinite(ref, new)
                value = float("inf") if matched is None else fn(*matched)
            else:
                value = 0.0 if np.array_equal(ref, new) else float(np.mean(ref != new))
            if not np.isfinite(value) or value > worst.value or not worst.output:
                worst = Comparison(metric, float(value), name, budget)
    return worst
