"""Calibration for the ``qdq`` pass: stream the float model over calibration batches into
observers, then turn each shared-parameter group's observations into one clipping range.

One onnxruntime session exposes every annotated activation; each batch's arrays update the
observers and are dropped before the next batch runs, so memory is one batch of activations
plus a fixed-size state per tensor (a 2048-bin histogram, or two numbers for ``minmax``),
whatever the number of batches. Bias correction reads per-channel input means the same way:

    b' = b + E[x] . (W - dequantize(quantize(W)))   (summed over the kernel, per output channel)

A bias-free MatMul that only feeds a biased MatMul (the two factors x·U·V + b of ``svd``) has
its shift carried to that bias: b' += E[x] . (U - Uq) . V, applied when both are quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxpress.passes.qdq.annotate import Annotation
from onnxpress.passes.qdq.convert import dequantize, quantize_weight

from onnxpress.calibration.activations import with_outputs
from onnxpress.calibration.cache import (
    cone_keys,
    observer_from_state,
    observer_state,
    statistics_key,
)
from onnxpress.calibration.observers import (
    HistogramObserver,
    MeanObserver,
    MinMaxObserver,
    Range,
    compute_range,
    minmax_range,
)
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.context import StatisticsStore
from onnxpress.core.errors import CalibrationError
from onnxpress.core.ir import own_constant, unique_name
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)

CARRIED = "<-"  # key of a delta carried to a reader's bias: "reader<-source"


def float_tensor_names(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor that ONNX shape inference can type."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    names = {
        vi.name
        for vi in [*g.input, *g.value_info, *g.output]
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    return names | {t.name for t in g.initializer if t.data_type == onnx.TensorProto.FLOAT}


@dataclass
class Observations:
    ranges: dict[str, HistogramObserver | MinMaxObserver] = field(default_factory=dict)
    means: dict[str, MeanObserver] = field(default_factory=dict)
    batches: int = 0
    reused: int = 0  # statistics taken from the store (an earlier run, same graph above)

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in [*self.ranges.values(), *self.means.values()])


def observe(
    model: onnx.ModelProto,
    tensors: list[str],
    mean_axes: dict[str, int],
    calibration: CalibrationData,
    histogram_bins: int | None,
    limit: int | None = None,
    store: StatisticsStore | None = None,
) -> Observations:
    """Stream ``model`` over the calibration batches into one observer per tensor.

    ``histogram_bins`` None keeps only running min/max; ``mean_axes`` maps tensors whose
    per-channel mean is wanted (bias correction) to their channel axis. With a ``store``,
    a tensor whose ancestor cone and data match an earlier run's takes that run's
    statistics, and only the others are streamed (``onnxpress.calibration.cache``).
    """
    obs = Observations()
    wanted = [(name, "range") for name in tensors] + [(name, "mean") for name in mean_axes]
    keys: dict[tuple[str, str], str] = {}
    if store is not None:
        cones = cone_keys(model, [name for name, _ in wanted])
        data = calibration.fingerprint(limit)
        kind = "minmax" if histogram_bins is None else f"histogram:{histogram_bins}"
        for name, role in wanted:
            cone = cones[name]
            if cone is not None:
                what = kind if role == "range" else f"mean:{mean_axes[name]}"
                keys[(name, role)] = statistics_key(cone, data, what)
        for (name, _), key in keys.items():
            state = store.load(key)
            if state is None:
                continue
            observer, obs.batches = observer_from_state(state)
            if isinstance(observer, MeanObserver):
                obs.means[name] = observer
            else:
                obs.ranges[name] = observer
            obs.reused += 1
    fresh: dict[tuple[str, str], HistogramObserver | MinMaxObserver | MeanObserver] = {}
    for name, role in wanted:
        if role == "range" and name not in obs.ranges:
            fresh[(name, role)] = obs.ranges[name] = (
                MinMaxObserver() if histogram_bins is None else HistogramObserver(histogram_bins)
            )
        elif role == "mean" and name not in obs.means:
            fresh[(name, role)] = obs.means[name] = MeanObserver(mean_axes[name])
    if fresh or not wanted:
        obs.batches = _stream(model, fresh, calibration, limit)
    if obs.batches == 0:
        raise CalibrationError("pass 'qdq': the calibration data yielded no batches")
    if store is not None:
        for slot, observer in fresh.items():
            if slot in keys:
                store.store(keys[slot], observer_state(observer, obs.batches))
    logger.debug(
        "observed %d tensors over %d batches (%d bytes of state, %d reused)",
        len(tensors),
        obs.batches,
        obs.nbytes,
        obs.reused,
    )
    return obs


def _stream(
    model: onnx.ModelProto,
    observers: dict[tuple[str, str], HistogramObserver | MinMaxObserver | MeanObserver],
    calibration: CalibrationData,
    limit: int | None,
) -> int:
    """Update ``observers`` ((tensor, role) -> observer) batch by batch; the batch count."""
    inputs = {i.name for i in model.graph.input}
    names = sorted({name for name, _ in observers})
    exposed = [n for n in names if n not in inputs]
    runner = Runner(with_outputs(model, exposed)) if exposed else None
    index = {n: runner.output_names.index(n) for n in exposed} if runner else {}
    batches = 0
    for batch in calibration.batches(limit):
        outputs = runner(batch) if runner is not None else []
        for (name, _), observer in observers.items():
            observer.update(batch[name] if name in inputs else outputs[index[name]])
        batches += 1
    return batches


def tensor_ranges(
    ann: Annotation,
    obs: Observations,
    method: str,
    symmetric: bool,
    percentile: float,
    unclipped: set[str],
) -> dict[str, Range]:
    """The clipping range of every observed activation by ``method``; tensors in ``unclipped``
    (graph outputs: clipping the largest logit changes the answer) keep their min/max."""
    ranges: dict[str, Range] = {}
    for name in ann.activations:
        observer = obs.ranges.get(name)
        if observer is None:
            raise CalibrationError(f"pass 'qdq': no observation for tensor '{name}'")
        if isinstance(observer, MinMaxObserver) or name in unclipped:
            ranges[name] = minmax_range(observer, symmetric)
        else:
            ranges[name] = compute_range(method, observer, symmetric, percentile)
    return ranges


def mixed_range_concats(
    graph: gs.Graph, ann: Annotation, obs: Observations, symmetric: bool, spread: float
) -> dict[str, str]:
    """Quantized Concats whose inputs' observed ranges differ by more than ``spread`` and whose
    output no quantized node reads -> why they stay float. One scale shared across such inputs
    (a detector's pixel boxes beside its 0..1 scores) would leave the narrowest input
    log2(ratio) bits short; where a quantized layer reads the Concat, its input scale costs
    those bits anyway, so the Concat stays int8."""
    reasons: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "Concat" or node.name not in ann.quantized_nodes:
            continue
        if any(c.name in ann.quantized_nodes for c in node.outputs[0].outputs):
            continue
        observers = [obs.ranges.get(t.name) for t in node.inputs]
        if any(o is None for o in observers):
            continue
        widths = [r.hi - r.lo for r in (minmax_range(o, symmetric) for o in observers if o)]
        narrow, wide = min(widths), max(widths)
        if wide > 0 and wide > spread * narrow:
            ratio = wide / narrow if narrow > 0 else float("inf")
            reasons[node.name] = (
                f"input ranges differ {ratio:.0f}x (widths {narrow:.3g} to {wide:.3g}; "
                f"concat-spread {spread:g}): one shared scale would cost the narrowest input "
                f"{np.log2(ratio):.1f} bits, so the Concat stays float"
            )
    return reasons


# --- bias correction -------------------------------------------------------------------------


def mean_axes_for(graph: gs.Graph, ann: Annotation) -> dict[str, int]:
    """Inputs of layers that bias correction can fix -> their channel axis."""
    axes: dict[str, int] = {}
    nodes = {n.name: n for n in graph.nodes}
    for (name, index), spec in ann.weights.items():
        node = nodes[name]
        if spec.weight_only or index != 1:
            continue
        if node.op == "Conv" or (node.op == "Gemm" and not node.attrs.get("transA", 0)):
            axes[node.inputs[0].name] = 1
        elif node.op == "MatMul" and (
            _matmul_bias(node) is not None or _factor_reader(node) is not None
        ):
            axes[node.inputs[0].name] = -1
    return axes


def _factor_reader(node: gs.Node) -> gs.Node | None:
    """The biased MatMul by a constant that alone reads this bias-free MatMul's output."""
    out = node.outputs[0]
    if node.op != "MatMul" or _matmul_bias(node) is not None or len(out.outputs) != 1:
        return None
    reader = out.outputs[0]
    weight = reader.inputs[1] if reader.op == "MatMul" else None
    if reader.inputs[0] is not out or not isinstance(weight, gs.Constant):
        return None
    return reader if _matmul_bias(reader) is not None else None


def _matmul_bias(node: gs.Node) -> gs.Constant | None:
    """The constant of an Add that alone reads a MatMul's output and adds a [N] vector."""
    out = node.outputs[0]
    if len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    add = out.outputs[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    n = np.shape(node.inputs[1].values)[-1] if isinstance(node.inputs[1], gs.Constant) else -1
    if (
        isinstance(other, gs.Constant)
        and np.shape(other.values) == (n,)
        and len(other.outputs) == 1
    ):
        return other
    return None


def bias_deltas(
    graph: gs.Graph, ann: Annotation, obs: Observations, reduce_range: bool
) -> dict[str, np.ndarray]:
    """Node name -> per-output-channel shift E[x] . (W - Wq) for every correctable layer."""
    deltas: dict[str, np.ndarray] = {}
    nodes = {n.name: n for n in graph.nodes}
    for (name, index), spec in ann.weights.items():
        node = nodes[name]
        mean = obs.means.get(node.inputs[0].name)
        if spec.weight_only or index != 1 or mean is None:
            continue
        w = np.asarray(node.inputs[1].values, np.float64)
        error = w - dequantize(*quantize_weight(w.astype(np.float32), spec.axis, reduce_range))
        x = mean.mean
        if node.op == "Conv":
            groups = int(node.attrs.get("group", 1))
            per_group = error.shape[1]
            summed = error.reshape(error.shape[0], per_group, -1).sum(axis=2)  # [O, C/g]
            group_of = np.arange(error.shape[0]) // (error.shape[0] // groups)
            inputs = x.reshape(groups, per_group)[group_of]  # [O, C/g]
            deltas[name] = (summed * inputs).sum(axis=1)
        elif node.op == "Gemm":
            b = error.T if node.attrs.get("transB", 0) else error  # [K, N]
            deltas[name] = x @ b
        elif node.op == "MatMul" and error.ndim == 2:
            reader = _factor_reader(node)
            if reader is None:
                deltas[name] = x @ error
            elif np.ndim(reader.inputs[1].values) == 2:
                # carried through the reader's weight as the reader will hold it
                spec_r = ann.weights.get((reader.name, 1))
                v = np.asarray(reader.inputs[1].values, np.float64)
                if spec_r is not None:
                    v = dequantize(
                        *quantize_weight(v.astype(np.float32), spec_r.axis, reduce_range)
                    )
                deltas[f"{reader.name}{CARRIED}{name}"] = (x @ error) @ v
    return deltas


def apply_bias_deltas(graph: gs.Graph, deltas: dict[str, np.ndarray], quantized: set[str]) -> int:
    """Add each quantized layer's shift to its float bias (before conversion); returns count.
    A bias other nodes read too is copied for the layer first."""
    applied = 0
    carried: dict[str, list[np.ndarray]] = {}
    for key, delta in deltas.items():
        reader, _, source = key.partition(CARRIED)
        if source and reader in quantized and source in quantized:
            carried.setdefault(reader, []).append(delta)
    for node in graph.nodes:
        own = deltas.get(node.name)
        parts = ([own] if own is not None else []) + carried.get(node.name, [])
        if not parts or node.name not in quantized:
            continue
        delta = np.sum(parts, axis=0)
        target = (
            _matmul_bias(node)
            if node.op == "MatMul"
            else (node.inputs[2] if len(node.inputs) > 2 else None)
        )
        if not isinstance(target, gs.Constant):
            continue
        if node.op != "MatMul":  # (a MatMul's bias Add is read by it alone)
            target = own_constant(graph, node, 2)
        values = np.asarray(target.values, np.float64)
        target.values = (values + delta).astype(np.float32)
        applied += 1
    return applied


def add_zero_biases(graph: gs.Graph, layers: set[str]) -> int:
    """Give each named Conv and plain Gemm with constant weights and no bias a zero bias, for
    bias correction to adjust (lossless)."""
    added = 0
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    for node in graph.nodes:
        if node.name not in layers:
            continue
        if len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = np.asarray(node.inputs[1].values)
        if node.op == "Conv":
            channels = w.shape[0]
        elif node.op == "Gemm" and float(node.attrs.get("beta", 1.0)) == 1.0:
            channels = w.shape[0 if node.attrs.get("transB", 0) else 1]
        else:
            continue
        name = unique_name(graph, f"{node.name}_bias", taken)
        node.inputs.append(gs.Constant(name, np.zeros(channels, np.float32)))
        added += 1
    return added
