"""Conversion for the ``qdq`` pass: rewrite an annotated float graph into standard QDQ ONNX.

    x -> consumers                 becomes  x -> QuantizeLinear -> DequantizeLinear -> consumers
    W (float constant) -> node     becomes  W_q (int8) -> DequantizeLinear(axis) -> node
    b (float constant) -> node     becomes  b_q (int32, scale s_x * s_w) -> DequantizeLinear -> node

Activations are uint8 with a zero point (asymmetric) or int8 with zero point 0 (symmetric);
weights are symmetric int8 in [-127, 127] (or [-63, 63] with ``reduce_range``, which keeps
onnxruntime's u8 x s8 AVX2 kernels clear of int16 saturation). Graph outputs keep their float
tensors; only node consumers read the dequantized copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.qdq.annotate import Annotation, BiasSpec, WeightSpec

from onnxpress.calibration.observers import Range
from onnxpress.core.ir import unique_name

# The largest int32 bias written: leaves 2**30 for the products summed on top of it.
BIAS_LIMIT = float(2**30)
# The smallest scale written: float32's smallest normal number, so that a scale is never 0
# or subnormal and 1 / scale stays finite. A range below it (an activation that is all 0 on
# the calibration data, weights of ~1e-40, a random-init MobileViT whose activations vanish)
# gets scale 1, as a zero range does: every value in it quantizes to the zero point. A zero
# scale made onnxruntime divide by zero and the TVM int8 build fail.
MIN_SCALE = float(np.finfo(np.float32).tiny)
QUINT8 = (0, 255)
QINT8 = (-128, 127)


@dataclass(frozen=True)
class QuantParams:
    scale: np.ndarray  # float32, scalar or 1-D (per channel)
    zero_point: np.ndarray  # uint8 / int8 / int32, same shape as scale
    axis: int | None = None


def activation_params(value_range: Range, symmetric: bool) -> QuantParams:
    """uint8 with a zero point for [lo, hi], or int8 with zero point 0 for [-t, t]."""
    lo, hi = min(value_range.lo, 0.0), max(value_range.hi, 0.0)
    if symmetric:
        t = max(-lo, hi)
        scale = _usable(t / 127.0)
        return QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    qmin, qmax = QUINT8
    scale = _usable((hi - lo) / (qmax - qmin))
    zero = int(np.clip(np.round(qmin - lo / scale), qmin, qmax))
    return QuantParams(np.array(scale, np.float32), np.array(zero, np.uint8))


def _usable(scale: float) -> float:
    """``scale``, or 1 where it is below MIN_SCALE (a zero or vanishing range)."""
    return scale if scale >= MIN_SCALE else 1.0


def quantize_weight(
    values: np.ndarray,
    axis: int | None,
    reduce_range: bool = False,
    min_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, QuantParams]:
    """Symmetric int8 per channel of ``axis`` (or per tensor): q = round(w / s), s = max|w| / qmax,
    or ``min_scale`` where that is larger (see bias_scale_floor)."""
    qmax = 63 if reduce_range else 127
    w = values.astype(np.float64)
    if axis is None:
        absmax = np.array(np.max(np.abs(w)) if w.size else 0.0)
        shape: tuple[int, ...] = ()
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        absmax = np.max(np.abs(moved), axis=1) if moved.size else np.zeros(w.shape[axis])
        shape = tuple(w.shape[axis] if i == axis else 1 for i in range(w.ndim))
    scale = np.where(absmax / qmax >= MIN_SCALE, absmax / qmax, 1.0).astype(np.float32)
    if min_scale is not None:
        scale = np.maximum(scale, min_scale.astype(np.float32))
    q = np.clip(np.round(w / scale.astype(np.float64).reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, QuantParams(scale, np.zeros(scale.shape, np.int8), axis)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    scale, zero = params.scale.astype(np.float64), params.zero_point.astype(np.float64)
    if params.axis is not None:
        shape = [1] * q.ndim
        shape[params.axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((q.astype(np.float64) - zero) * scale).astype(np.float32)


def bias_scale_floor(bias: np.ndarray, input_scale: np.ndarray, per_channel: bool) -> np.ndarray:
    """The smallest weight scale at which ``bias`` fits BIAS_LIMIT in int32 units of
    input_scale * weight_scale (per output channel, or one for the tensor). An activation whose
    calibrated range is tiny (a layer whose float output is all bias, as in random-weight or
    dead-ReLU branches) gives a bias scale so small that the int32 bias would clip and the
    layer's output collapse; a coarser weight scale keeps the bias exact, and costs little
    there: the bias then outweighs every product sum of fewer than ~66000 terms."""
    need = np.abs(bias.astype(np.float64)) / (float(input_scale) * BIAS_LIMIT)
    return (need if per_channel else np.array(need.max(initial=0.0))).astype(np.float32)


def quantize_bias(
    values: np.ndarray, input_scale: np.ndarray, weight: QuantParams
) -> tuple[np.ndarray, QuantParams]:
    scale = input_scale.astype(np.float64) * weight.scale.astype(np.float64)
    scale = np.broadcast_to(scale, values.shape) if weight.axis is not None else scale
    # both factors are at least MIN_SCALE; their product can still underflow float32
    safe = np.maximum(scale, MIN_SCALE)
    limit = float(np.iinfo(np.int32).max)
    q = np.clip(np.round(values.astype(np.float64) / safe), -limit, limit).astype(np.int32)
    per_channel = np.ndim(scale) == 1
    return q, QuantParams(
        safe.astype(np.float32), np.zeros(np.shape(scale), np.int32), 0 if per_channel else None
    )


@dataclass
class ConvertSummary:
    activations: int = 0
    weights: int = 0
    weight_only: int = 0
    biases: int = 0
    int8_bytes: int = 0


# id(weight array), axis, reduce_range -> (the array, kept alive so its id stays its own; int8
# values; parameters). Candidates of one qdq run share their weight arrays (gs copies share
# constant values, and the pass replaces arrays, never writes into them): quantize each once.
# A weight whose scale has a floor (bias_scale_floor) adds the floor's bytes to its key.
WeightCache = dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, QuantParams]]


class _Converter:
    def __init__(self, graph: gs.Graph, reduce_range: bool, cache: WeightCache | None) -> None:
        self.graph = graph
        self.reduce_range = reduce_range
        self.cache: WeightCache = {} if cache is None else cache
        self.taken = set(graph.tensors()) | {n.name for n in graph.nodes}
        self.summary = ConvertSummary()
        self.weight_params: dict[tuple[str, int | None], tuple[gs.Variable, QuantParams]] = {}

    def name(self, base: str) -> str:
        return unique_name(self.graph, base, self.taken)

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(base), np.asarray(values))

    def dequantize_node(self, base: str, q: gs.Tensor, params: QuantParams) -> gs.Variable:
        out = gs.Variable(self.name(f"{base}_dequantized"), dtype=np.float32)
        attrs = {} if params.axis is None else {"axis": params.axis}
        scale = self.const(f"{base}_scale", params.scale)
        zero = self.const(f"{base}_zero_point", params.zero_point)
        self.graph.nodes.append(
            gs.Node(
                "DequantizeLinear",
                self.name(f"{base}_DequantizeLinear"),
                attrs,
                [q, scale, zero],
                [out],
            )
        )
        return out

    def activation(self, tensor: gs.Variable, params: QuantParams, graph_output: bool) -> None:
        """x -> Q -> DQ; consumers read the DQ output. A graph output keeps its name: the
        producer writes a new tensor and the DQ writes the output."""
        if graph_output:
            source = gs.Variable(
                self.name(f"{tensor.name}_float"), dtype=tensor.dtype, shape=tensor.shape
            )
            producer = tensor.inputs[0]
            producer.outputs[producer.outputs.index(tensor)] = source
            dequantized = tensor
        else:
            source = tensor
            dequantized = gs.Variable(self.name(f"{tensor.name}_dequantized"), dtype=np.float32)
            for node in list(tensor.outputs):
                for i, t in enumerate(node.inputs):
                    if t is tensor:
                        node.inputs[i] = dequantized
        q = gs.Variable(self.name(f"{tensor.name}_quantized"), dtype=params.zero_point.dtype)
        scale = self.const(f"{tensor.name}_scale", params.scale)
        zero = self.const(f"{tensor.name}_zero_point", params.zero_point)
        self.graph.nodes.append(
            gs.Node(
                "QuantizeLinear",
                self.name(f"{tensor.name}_QuantizeLinear"),
                {},
                [source, scale, zero],
                [q],
            )
        )
        self.graph.nodes.append(
            gs.Node(
                "DequantizeLinear",
                self.name(f"{tensor.name}_DequantizeLinear"),
                {},
                [q, scale, zero],
                [dequantized],
            )
        )
        self.summary.activations += 1

    def weight(
        self, const: gs.Constant, spec: WeightSpec, floor: np.ndarray | None = None
    ) -> tuple[gs.Variable, QuantParams]:
        key = (const.name, spec.axis)
        if key not in self.weight_params:
            values = np.asarray(const.values)
            cached: tuple[Any, ...] = (id(values), spec.axis, self.reduce_range)
            if cached not in self.cache:
                q, params = quantize_weight(values, spec.axis, self.reduce_range)
                self.cache[cached] = (values, q, params)
            _, q, params = self.cache[cached]
            if floor is not None and np.any(floor > params.scale):  # a bias needs it
                if floor.shape != params.scale.shape:
                    floor = np.array(floor.max(), np.float32)
                cached += (floor.tobytes(),)
                if cached not in self.cache:
                    q, params = quantize_weight(values, spec.axis, self.reduce_range, floor)
                    self.cache[cached] = (values, q, params)
                _, q, params = self.cache[cached]
            q_const = self.const(f"{const.name}_quantized", q)
            self.weight_params[key] = (self.dequantize_node(const.name, q_const, params), params)
            self.summary.int8_bytes += q.nbytes
            if spec.weight_only:
                self.summary.weight_only += 1
            else:
                self.summary.weights += 1
        return self.weight_params[key]

    def bias(
        self,
        node: gs.Node,
        index: int,
        spec: BiasSpec,
        input_scale: np.ndarray,
        weight: QuantParams,
    ) -> None:
        values = np.asarray(node.inputs[index].values, dtype=np.float32)
        q, params = quantize_bias(values, input_scale, weight)
        q_const = self.const(f"{spec.tensor}_quantized", q)
        node.inputs[index] = self.dequantize_node(spec.tensor, q_const, params)
        self.summary.biases += 1


def convert(
    graph: gs.Graph,
    ann: Annotation,
    ranges: dict[str, Range],
    symmetric: bool,
    reduce_range: bool = False,
    cache: WeightCache | None = None,
) -> ConvertSummary:
    """Rewrite ``graph`` in place. ``ranges`` holds each activation's own range; tensors that
    share parameters (``ann.groups``) get the union of their ranges. ``cache``: quantized
    weights shared by the candidates of one run."""
    conv = _Converter(graph, reduce_range, cache)
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    grouped: dict[str, QuantParams] = {}
    for members in ann.group_members().values():
        union = Range(min(ranges[m].lo for m in members), max(ranges[m].hi for m in members))
        params = activation_params(union, symmetric)
        for name in members:
            grouped.setdefault(name, params)
    floors = _weight_floors(nodes, ann, grouped)
    for (node_name, index), spec in ann.weights.items():
        node = nodes[node_name]
        dq, _ = conv.weight(node.inputs[index], spec, floors.get((spec.tensor, spec.axis)))
        node.inputs[index] = dq
    act_params: dict[str, QuantParams] = {}
    for name, spec in ann.tied.items():
        act_params[name] = conv.weight_params[(spec.tensor, spec.axis)][1]
    for name, params in grouped.items():
        act_params.setdefault(name, params)
    for (node_name, index), bias_spec in ann.biases.items():
        node = nodes[node_name]
        _, w_params = conv.weight_params[(bias_spec.weight.tensor, bias_spec.weight.axis)]
        conv.bias(node, index, bias_spec, act_params[bias_spec.activation].scale, w_params)
    outputs = {t.name for t in graph.outputs}
    for name in ann.activations:
        conv.activation(tensors[name], act_params[name], name in outputs)
    return conv.summary


def _weight_floors(
    nodes: dict[str, gs.Node], ann: Annotation, act_params: dict[str, QuantParams]
) -> dict[tuple[str, int | None], np.ndarray]:
    """Per weight (tensor, axis): the scale floor its biases need to fit int32, where one
    does (bias_scale_floor); the largest over the layers sharing the weight."""
    floors: dict[tuple[str, int | None], np.ndarray] = {}
    for (node_name, index), spec in ann.biases.items():
        params = act_params.get(spec.activation)
        bias = nodes[node_name].inputs[index]
        if params is None or not isinstance(bias, gs.Constant):
            continue
        values = np.asarray(bias.values, np.float64)
        floor = bias_scale_floor(values, params.scale, spec.weight.axis is not None)
        key = (spec.weight.tensor, spec.weight.axis)
        if key in floors:
            floor = np.maximum(floors[key], floor)
        floors[key] = floor
    return floors
