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

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxpress.core import io as model_io
from onnxpress.core.calibration_data import Batch, CalibrationData
from onnxpress.core.ir import copy_model
from onnxpress.core.partition import CHUNK_NODES, NotPartitionable, PartitionedRunner
from onnxpress.core.task_metric import concatenated, task_score

logger = logging.getLogger(__name__)

LOSSLESS_TOLERANCE = 1e-5
RANDOM_BATCH_SIZES = (1, 3)
SYMBOLIC_DIM = 8
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
    if model.ByteSize() > model_io.EXTERNAL_DATA_THRESHOLD:
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
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


class Runner:
    """An onnxruntime session over a ModelProto: graph optimizations off, or with
    ``optimized`` at onnxruntime's default level, as users run it (QDQ on integer kernels)."""

    def __init__(self, model: onnx.ModelProto, optimized: bool = False) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimized
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        options.log_severity_level = 3
        options.intra_op_num_threads = min(4, os.cpu_count() or 1)
        # A session here runs a few feeds once each. The memory pattern is planned on the
        # first run and pays off only when a shape repeats; planning it is superlinear in
        # the node count (seconds at 80k nodes) and never changes the results.
        options.enable_mem_pattern = False
        if model.ByteSize() > model_io.EXTERNAL_DATA_THRESHOLD:
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
        return [np.asarray(x) for x in self.session.run(None, feed)]


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 4, shape).astype(dtype)
    raise ValueError(f"cannot make random data of dtype {dtype}")


def random_inputs(model: onnx.ModelProto, seed: int) -> list[Batch]:
    """Seeded normal inputs; two batch sizes when the first axis is symbolic.

    A symbolic dimension gets one size per name across all inputs, so that inputs sharing
    a dimension (``x[T, batch, I]`` and ``h0[1, batch, H]``) stay consistent: names that
    head an input's shape are batch-like and take the varying batch size, other names and
    unnamed dimensions take a fixed size.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    batch_names: set[str] = set()
    dynamic_batch = False
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dynamic_batch = True
            if dims[0].dim_param:
                batch_names.add(dims[0].dim_param)
    sizes = RANDOM_BATCH_SIZES if dynamic_batch else RANDOM_BATCH_SIZES[:1]
    rng = np.random.default_rng(seed)
    feeds: list[Batch] = []
    for batch_size in sizes:
        feed: Batch = {}
        for vi in inputs:
            t = vi.type.tensor_type
            dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
            shape: list[int] = []
            for axis, d in enumerate(t.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                elif d.dim_param in batch_names or (axis == 0 and not d.dim_param):
                    shape.append(batch_size)
                else:
                    shape.append(SYMBOLIC_DIM)
            feed[vi.name] = _random_array(rng, np.dtype(dtype), shape)
        feeds.append(feed)
    return feeds


def verification_inputs(
    model: onnx.ModelProto, calibration: CalibrationData | None, seed: int
) -> list[Batch]:
    if calibration is not None:
        return list(calibration.batches(limit=MAX_CALIBRATION_BATCHES))
    return random_inputs(model, seed)


def verification_runner(
    model: onnx.ModelProto, optimized: bool = False
) -> Runner | PartitionedRunner:
    """A Runner, or for very large graphs a PartitionedRunner with the same outputs.

    onnxruntime's session creation is superlinear in graph size; chunking keeps the
    verifier's cost linear (docs/BENCHMARKS.md, "Scale").
    """
    if (
        len(model.graph.node) > 2 * CHUNK_NODES
        and model.ByteSize() <= model_io.EXTERNAL_DATA_THRESHOLD
    ):
        try:
            return PartitionedRunner(model, lambda m: Runner(m, optimized), chunk_nodes=CHUNK_NODES)
        except NotPartitionable as exc:
            logger.debug("running the model in one session: %s", exc)
    return Runner(model, optimized)


def run_all(
    runner: Callable[[Batch], list[np.ndarray]], feeds: list[Batch]
) -> list[list[np.ndarray]]:
    return [runner(feed) for feed in feeds]


def compare_lossless(
    names: list[str],
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    tolerance: float = LOSSLESS_TOLERANCE,
) -> Comparison:
    """Worst max|ref - new| / max|ref| over outputs and feeds (``max-rel``)."""
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
            if np.issubdtype(ref.dtype, np.floating):
                ref_nan, new_nan = np.isnan(ref), np.isnan(new)
                if not np.array_equal(ref_nan, new_nan):
                    return Comparison("nan", float("inf"), name, tolerance)
                value = _max_rel(np.where(ref_nan, 0, ref), np.where(new_nan, 0, new))
            else:
                value = 0.0 if np.array_equal(ref, new) else float("inf")
            if value > worst.value or not worst.output:
                worst = Comparison("max-rel", value, name, tolerance)
    return worst


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
            value = (
                fn(ref, new)
                if np.issubdtype(ref.dtype, np.floating)
                else (0.0 if np.array_equal(ref, new) else float(np.mean(ref != new)))
            )
            if not np.isfinite(value) or value > worst.value or not worst.output:
                worst = Comparison(metric, float(value), name, budget)
    return worst
