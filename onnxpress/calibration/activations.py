"""Streaming capture of intermediate activations on calibration data.

``stream_activations`` exposes chosen tensors as extra graph outputs and runs the model on
onnxruntime batch by batch, yielding one dict of arrays per batch, so that a pass can
accumulate statistics (``Moments``: XᵀX, XᵀY, sums) without holding all activations in
memory. Data-aware passes use it to read layer inputs of the student (the graph being
compressed) and layer outputs of the teacher (the original model).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from onnxpress.core.calibration_data import Batch
from onnxpress.core.ir import copy_model
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the tensors ``names``."""
    out = copy_model(model)
    existing = {o.name for o in out.graph.output}
    wanted = [n for n in dict.fromkeys(names) if n not in existing]
    if not wanted:
        return out
    types = _elem_types(model)
    produced = {o for node in model.graph.node for o in node.output}
    for name in wanted:
        elem = types.get(name, 0)
        if not elem and name in produced:  # an op ONNX cannot type (contrib): onnxruntime does
            out.graph.output.append(helper.make_empty_tensor_value_info(name))
        elif not elem:
            raise ValueError(f"tensor '{name}' has no inferred type; cannot expose it")
        else:
            out.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    return out


def stream_activations(
    model: onnx.ModelProto, names: Iterable[str], batches: Iterable[Batch]
) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{name: array}`` for each calibration batch (one ORT session for all)."""
    names = list(dict.fromkeys(names))
    runner = Runner(with_outputs(model, names))
    index = {name: runner.output_names.index(name) for name in names}
    for batch in batches:
        outputs = runner(batch)
        yield {name: outputs[i] for name, i in index.items()}


class Moments:
    """Running first and second moments of row vectors x (and optional targets y).

    Rows are the last axis: an activation of shape [..., d] contributes prod(...) rows.
    Accumulates in float64 (each batch's products in float32 or wider): n, Σx, XᵀX and, when targets are given, XᵀY and YᵀY.
    """

    def __init__(
        self, dim: int, target_dim: int | None = None, dtype: type[np.floating] = np.float64
    ) -> None:
        self.count = 0
        self.sum = np.zeros(dim)
        self.xtx = np.zeros((dim, dim), dtype)  # float32: half the memory, for a few batches
        self.xty = np.zeros((dim, target_dim), dtype) if target_dim is not None else None
        self.yty_trace = 0.0

    def add(
        self, x: np.ndarray, y: np.ndarray | None = None, xtx: np.ndarray | None = None
    ) -> None:
        """Add the rows of ``x`` (and targets ``y``); ``xtx``: their XᵀX, already computed
        (``gram``) for another Moments of the same rows."""
        work = np.result_type(x.dtype, np.float32)
        rows = x.reshape(-1, x.shape[-1]).astype(work, copy=False)
        self.count += rows.shape[0]
        self.sum += rows.sum(axis=0, dtype=np.float64)
        self.xtx += gram(rows) if xtx is None else xtx
        if y is not None:
            if self.xty is None:
                raise ValueError("Moments was created without a target dimension")
            targets = y.reshape(-1, y.shape[-1]).astype(work, copy=False)
            if targets.shape[0] != rows.shape[0]:
                raise ValueError(f"{targets.shape[0]} target rows for {rows.shape[0]} input rows")
            self.xty += rows.T @ targets
            self.yty_trace += float(np.einsum("ij,ij->", targets, targets, dtype=np.float64))

    @property
    def second_moment(self) -> np.ndarray:
        """E[xxᵀ]."""
        return self.xtx / max(self.count, 1)


def gram(x: np.ndarray) -> np.ndarray:
    """XᵀX of the rows of ``x`` in its precision, at least float32: one batch's products
    (float32 products run at twice the speed of float64 ones); Moments sums them in float64."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.result_type(x.dtype, np.float32), copy=False)
    return np.asarray(rows.T @ rows)


def regularized_cholesky(gram: np.ndarray, rel_eps: float = 1e-6) -> np.ndarray:
    """Lower-triangular L with L Lᵀ = gram + λI, λ = rel_eps·mean(diag): always positive definite."""
    dim = gram.shape[0]
    scale = float(np.trace(gram)) / max(dim, 1)
    damping = rel_eps * (scale if scale > 0 else 1.0)
    for _ in range(8):
        try:
            return np.linalg.cholesky(gram + damping * np.eye(dim))
        except np.linalg.LinAlgError:
            damping *= 10
    raise np.linalg.LinAlgError("second-moment matrix is not positive definite even after damping")
