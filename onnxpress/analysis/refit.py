"""Layer-wise least squares on calibration data, for passes that rebuild a linear layer.

A layer is seen as a linear map on rows, y = x·W (a MatMul row, a Gemm row, a conv patch).
``collect_moments`` runs the student (the graph being rewritten) and the teacher (the
original model) side by side on onnxruntime, batch by batch, and accumulates per tap
XᵀX of the student's layer-input rows and XᵀY against the teacher's layer-output rows
(``Moments``). Only the requested tensors are computed and no batch is kept. From them:

* ``whitened_svd``: the SVD of Lᵀ·W with L·Lᵀ = XᵀX + λI (regularised Cholesky), whose
  truncation minimises ‖X·W − X·Ŵ‖ on the calibration rows rather than ‖W − Ŵ‖;
* ``refit_right``: V = argmin ‖X·U·V − Y‖² + λ‖V − V₀‖² for a fixed U (normal equations);
* ``squared_output_error``: ‖X·Ŵ − Y‖² and ‖Y‖² from the moments alone.

``layer_waves`` orders layers for layer-wise processing: each wave holds the layers whose
inputs depend only on layers of earlier waves, so that one calibration run serves a whole
wave and every layer sees the inputs of the already-compressed student.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from numpy.lib.stride_tricks import sliding_window_view

from onnxpress.calibration.activations import Moments, gram, regularized_cholesky, with_outputs
from onnxpress.core.calibration_data import Batch
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)

RowsFn = Callable[[np.ndarray], np.ndarray]
FLOAT32_SVD_SIZE = 128  # whitened_svd: matrices at least this large on both sides


@dataclass(frozen=True)
class Tap:
    """Rows of one student tensor (and optionally targets from one teacher tensor).

    Taps that share a ``key`` add into the same Moments (e.g. every user of a shared weight).
    ``rows`` maps the captured activation to [rows, dim]; ``targets`` maps the teacher's
    activation to [rows, target_dim], row for row.
    """

    key: str
    student: str
    rows: RowsFn
    dim: int
    teacher: str | None = None
    targets: RowsFn | None = None
    target_dim: int | None = None


class TensorCapture:
    """One onnxruntime session over a model that exposes ``names`` as extra outputs.

    A call computes only the tensors it asks for (all of ``names`` by default), so a capture
    of the teacher can be built once and serve every wave of a layer-wise pass.
    """

    def __init__(self, model: onnx.ModelProto, names: Sequence[str]) -> None:
        self.names = list(dict.fromkeys(names))
        self.runner = Runner(with_outputs(model, self.names)) if self.names else None

    def __call__(self, batch: Batch, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        wanted = self.names if names is None else list(dict.fromkeys(names))
        if self.runner is None or not wanted:
            return {}
        values = self.runner.session.run(wanted, batch)
        return {name: np.asarray(v) for name, v in zip(wanted, values, strict=True)}


def collect_moments(
    student: onnx.ModelProto | TensorCapture,
    teacher: onnx.ModelProto | TensorCapture | None,
    taps: Sequence[Tap],
    batches: Iterable[Batch],
) -> dict[str, Moments]:
    """Stream the calibration batches once through both models; one Moments per tap key."""
    student_names = [t.student for t in taps]
    teacher_names = [t.teacher for t in taps if t.teacher is not None]
    if teacher_names and teacher is None:
        raise ValueError("taps ask for teacher tensors but no teacher model was given")
    capture_student = (
        student if isinstance(student, TensorCapture) else TensorCapture(student, student_names)
    )
    capture_teacher = (
        teacher
        if isinstance(teacher, TensorCapture) or teacher is None
        else TensorCapture(teacher, teacher_names)
    )

    def pairs() -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        for batch in batches:
            inputs = capture_student(batch, student_names)
            outputs = capture_teacher(batch, teacher_names) if capture_teacher is not None else {}
            yield inputs, outputs

    return accumulate_moments(taps, pairs())


def accumulate_moments(
    taps: Sequence[Tap],
    pairs: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    dtype: type[np.floating] = np.float64,
) -> dict[str, Moments]:
    """One Moments per tap key from (student tensors, teacher tensors) per batch."""
    moments: dict[str, Moments] = {}
    for tap in taps:
        if tap.key not in moments:
            moments[tap.key] = Moments(tap.dim, tap.target_dim, dtype)
    for index, (inputs, outputs) in enumerate(pairs):
        # taps whose rows are the same view of one captured tensor (q, k and v read one
        # tensor) share one XᵀX; the tensors stay alive for the batch, so the key is unique
        grams: dict[tuple[str, tuple[int, ...], tuple[int, ...]], np.ndarray] = {}
        for tap in taps:
            captured = inputs[tap.student]
            rows = tap.rows(captured)
            targets = None
            if tap.teacher is not None and tap.targets is not None:
                targets = tap.targets(outputs[tap.teacher])
            view = rows.reshape(-1, rows.shape[-1])
            if _data(view) != _data(captured) or view.dtype != captured.dtype:
                moments[tap.key].add(rows, targets)
                continue
            key = (tap.student, view.shape, view.strides)
            if key not in grams:
                grams[key] = gram(view)
            moments[tap.key].add(rows, targets, grams[key])
        logger.debug("collected moments of %d taps on batch %d", len(taps), index)
    return moments


def _data(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


@dataclass
class Spectrum:
    """W ≈ left·diag(singular)·right, truncatable at any rank.

    With whitening, ``left`` is L⁻ᵀ·P for the SVD P·S·Qᵀ of Lᵀ·W, and ``singular`` measures
    the layer's output energy on the calibration rows: Σ_{i≥r} s_i² is ‖X·W − X·Ŵ_r‖² (up
    to the regularisation λ).
    """

    left: np.ndarray  # [k, s]
    singular: np.ndarray  # [s], descending
    right: np.ndarray  # [s, n]

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Balanced rank-``rank`` factors U [k, r], V [r, n] with U·V = Ŵ_r."""
        root = np.sqrt(self.singular[:rank])
        return self.left[:, :rank] * root, root[:, None] * self.right[:rank]

    def tail_energy(self, rank: int) -> float:
        return float(np.sum(self.singular[rank:] ** 2))

    def total_energy(self) -> float:
        return float(np.sum(self.singular**2))


def whitened_svd(weight: np.ndarray, gram: np.ndarray | None, damping: float) -> Spectrum:
    """SVD of ``weight`` [k, n], whitened by the input second moment ``gram`` [k, k] if given.

    Matrices with both sides >= ``FLOAT32_SVD_SIZE`` are decomposed in float32 (LAPACK's
    sgesdd, about twice as fast): the kept directions and the tail energies the rank rules
    read are far above its rounding (relative 1e-7 of the largest singular value).
    """
    weight = np.asarray(weight, dtype=np.float64)
    chol = None if gram is None else regularized_cholesky(gram, damping)
    matrix = weight if chol is None else chol.T @ weight
    if min(matrix.shape) >= FLOAT32_SVD_SIZE:
        left, singular, right = (
            a.astype(np.float64) for a in np.linalg.svd(matrix.astype(np.float32), False)
        )
    else:
        left, singular, right = np.linalg.svd(matrix, full_matrices=False)
    if chol is None:
        return Spectrum(left, singular, right)
    return Spectrum(np.linalg.solve(chol.T, left), singular, right)


def refit_right(
    left: np.ndarray, moments: Moments, initial: np.ndarray, damping: float
) -> np.ndarray:
    """V = argmin ‖X·U·V − Y‖² + λ‖V − V₀‖², λ = damping · mean eigenvalue of UᵀXᵀXU."""
    if moments.xty is None:
        raise ValueError("refit needs moments collected with targets")
    gram = left.T @ moments.xtx @ left
    rank = gram.shape[0]
    scale = float(np.trace(gram)) / max(rank, 1)
    ridge = damping * (scale if scale > 0 else 1.0)
    rhs = left.T @ moments.xty + ridge * initial
    return np.asarray(np.linalg.solve(gram + ridge * np.eye(rank), rhs))


def squared_output_error(approx: np.ndarray, moments: Moments) -> tuple[float, float]:
    """(‖X·Ŵ − Y‖², ‖Y‖²) over the calibration rows, from XᵀX, XᵀY and tr(YᵀY)."""
    if moments.xty is None:
        raise ValueError("output error needs moments collected with targets")
    cross = float(np.sum(approx * moments.xty))
    quadratic = float(np.sum(approx * (moments.xtx @ approx)))
    error = moments.yty_trace - 2.0 * cross + quadratic
    return max(error, 0.0), moments.yty_trace


def layer_waves(graph: gs.Graph, layers: Sequence[Sequence[gs.Node]]) -> list[list[int]]:
    """Indices of ``layers`` (each a set of nodes) in topological waves.

    A layer comes in a later wave than every layer with a node upstream of one of its nodes;
    layers that feed each other (a cycle through shared weights) share a wave.
    """
    nodes = nx.DiGraph()
    for node in graph.nodes:
        nodes.add_node(id(node))
        for tensor in node.outputs:
            for consumer in tensor.outputs:
                nodes.add_edge(id(node), id(consumer))
    owner = {id(node): index for index, layer in enumerate(layers) for node in layer}
    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(layers)))
    for index, layer in enumerate(layers):
        for node in layer:
            for ancestor in nx.ancestors(nodes, id(node)):
                other = owner.get(ancestor)
                if other is not None and other != index:
                    deps.add_edge(other, index)
    condensed = nx.condensation(deps)
    return [
        sorted(i for c in generation for i in condensed.nodes[c]["members"])
        for generation in nx.topological_generations(condensed)
    ]


def conv_patches(
    x: np.ndarray,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
    auto_pad: str = "NOTSET",
) -> np.ndarray:
    """im2col of an N×C×spatial input: one row per output position, C·Πkernel wide, features
    ordered (channel, kernel positions) like a Conv weight [M, C, k...] flattened per filter.

    ``pads`` is ONNX's [begin..., end...]; ``auto_pad`` SAME_UPPER/SAME_LOWER/VALID override it.
    """
    dims = len(kernel)
    if auto_pad == "VALID":
        pads = [0] * 2 * dims
    elif auto_pad.startswith("SAME"):
        pads = [0] * 2 * dims
        for i, (size, k, s, d) in enumerate(
            zip(x.shape[2:], kernel, strides, dilations, strict=True)
        ):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            low = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + dims] = low, total - low
    x = np.pad(x, [(0, 0), (0, 0), *zip(pads[:dims], pads[dims:], strict=True)])
    window = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    view = sliding_window_view(x, window, axis=tuple(range(2, 2 + dims)))
    steps = [*strides, *dilations]
    view = view[tuple([slice(None), slice(None), *(slice(None, None, s) for s in steps)])]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    rows = x.shape[1] * int(np.prod(kernel))
    return np.ascontiguousarray(np.transpose(view, order)).reshape(-1, rows)
