"""Saturation-safe int8 weights for targets that sum u8 x s8 pairs in int16 (x86 without VNNI).

For each integer layer with weight pairs at risk (``onnxpress.analysis.saturation``), two
remedies are built and measured on the data; the one whose pair-saturating output is closest
to the layer's exact int32 output with its original weights is kept:

- ``reround``: only the offending same-sign pairs shrink, just enough that
  a0|w0| + a1|w1| <= 32767, taking from the weight that meets the larger activation first
  (fewest units); scales are kept. ``a`` is the largest activation byte seen per input
  channel, times ``margin`` (at most 255), or 255 without data.
- ``narrow``: the output channels with a pair at risk get 7-bit weights ([-63, 63]) and
  their scales doubled (the whole layer when weights are per tensor); the int32 bias is
  rescaled to match. No pair of theirs can then saturate (255 * 126 < 32767); the other
  channels keep 8 bits.
- ``u8``: the weights move to uint8 (+128, zero point +128). onnxruntime then runs the layer on
  its u8 x u8 kernels, which widen to int16 before multiplying: exact on every CPU (checked
  against the AVX2 kernels under qemu), same values as full 8 bits, but slower kernels
  (BENCHMARKS.md gives the price).

``auto`` keeps the better of reround and narrow (same speed as full 8 bits) where its error
on the data is within ``tolerance`` (rel-L2 of the layer's output against exact int32 sums
with the original weights), and takes ``u8`` where neither is.

Nothing changes where no named target saturates. The change works on any QDQ model and needs
no recalibration; it is what ``qdq`` does last and what ``fix-saturation`` does to models that
other tools quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.analysis.saturation import (
    U8_MAX,
    activation_bound,
    layer_error,
    pairs_at_risk,
    saturating_layers,
)
from onnxpress.core.context import PassContext
from onnxpress.core.int8_emulation import Batch, layer_output
from onnxpress.core.int8_layers import (
    IntegerLayer,
    from_reduction_matrix,
    reduction_matrix,
)
from onnxpress.core.pass_base import PassResult
from onnxpress.core.targets import EXACT

logger = logging.getLogger(__name__)

REMEDIES = ("reround", "narrow", "u8")
NARROW_MAX = 63
LIMIT = 32767


@dataclass(frozen=True)
class Policy:
    """How layers at risk are made safe: the remedy (auto, reround, narrow, u8 or off), the
    headroom over the activation bytes seen, and auto's error tolerance for the fast remedies."""

    remedy: str = "auto"
    margin: float = 1.25
    tolerance: float = 0.002


@dataclass
class Change:
    """New constant values for one layer's DequantizeLinear inputs."""

    weight: np.ndarray
    scale: np.ndarray | None = None  # narrow: the weight's new scale
    bias: np.ndarray | None = None  # narrow: the int32 bias for the new scale
    bias_scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None  # u8: the weight's new zero point


@dataclass
class Remedy:
    layer: str
    op: str
    chosen: str
    pairs_at_risk: int
    weights_changed: int
    errors: dict[str, float] = field(default_factory=dict)  # candidate -> rel-L2 vs exact

    def to_json(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "op": self.op,
            "chosen": self.chosen,
            "pairs_at_risk": self.pairs_at_risk,
            "weights_changed": self.weights_changed,
            "errors": {k: round(v, 6) for k, v in self.errors.items()},
        }


def reround(matrix: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Shrink same-sign pairs of ``matrix`` [K, N] until a0|w0| + a1|w1| <= 32767 for the
    activation bound ``a``, by the smallest squared change."""
    w = matrix.astype(np.int64)
    a = bound.astype(np.float64)
    odd = w.shape[0] % 2
    if odd:
        w, a = np.pad(w, ((0, 1), (0, 0))), np.pad(a, (0, 1))
    w2 = w.reshape(-1, 2, w.shape[1]).copy()
    a2 = np.broadcast_to(a.reshape(-1, 2, 1), w2.shape)
    risky = pairs_at_risk(w[: len(w)], a)  # [pairs, N]
    magnitude, sign = np.abs(w2).astype(np.float64), np.sign(w2)
    # the least-squares cut: c_i = excess * a_i / (a0^2 + a1^2), rounded up, at most |w_i|
    excess = np.where(risky, (a2 * magnitude).sum(axis=1) - LIMIT, 0)[:, None, :]
    norm = np.maximum((a2**2).sum(axis=1, keepdims=True), 1.0)
    magnitude -= np.minimum(magnitude, np.ceil(excess * a2 / norm))
    # whatever rounding left over comes off the member that meets the larger activation
    first = np.where(a2[:, 0] >= a2[:, 1], 0, 1)
    for order in (first, 1 - first):
        excess = np.where(risky, (a2 * magnitude).sum(axis=1) - LIMIT, 0)
        member_a = np.take_along_axis(a2, order[:, None], axis=1)[:, 0]
        member_w = np.take_along_axis(magnitude, order[:, None], axis=1)[:, 0]
        cut = np.where(
            excess > 0, np.minimum(member_w, np.ceil(excess / np.maximum(member_a, 1))), 0
        )
        np.put_along_axis(magnitude, order[:, None], (member_w - cut)[:, None], axis=1)
    out = (sign * magnitude).reshape(w.shape)
    return (out[:-1] if odd else out).astype(np.int8)


def narrow(layer: IntegerLayer, channels: np.ndarray | None = None) -> Change:
    """7-bit weights for the output ``channels`` at risk (all, per tensor or when None), the
    others untouched, with the int32 bias rescaled to match."""
    wt = layer.weight
    assert wt.value is not None
    q = wt.value.astype(np.float64) - wt.zero_point.astype(np.float64).reshape(
        _channel_shape(wt.value, wt.axis)
    )
    reduce_axes = tuple(i for i in range(q.ndim) if wt.axis is None or i != wt.axis % q.ndim)
    peak = np.max(np.abs(q), axis=reduce_axes, keepdims=True)
    chosen = np.ones(peak.shape, bool)
    if channels is not None and wt.axis is not None and channels.size == peak.size:
        chosen = channels.reshape(peak.shape)
    narrowed = chosen & (peak > NARROW_MAX)
    factor = np.where(narrowed, peak / NARROW_MAX, 1.0)  # new scale / old scale
    limit = np.where(narrowed, NARROW_MAX, 127)
    new_q = np.clip(np.round(q / factor), -limit, limit)
    new_q += wt.zero_point.astype(np.float64).reshape(_channel_shape(wt.value, wt.axis))
    scale = (wt.scale.astype(np.float64) * factor.reshape(wt.scale.shape)).astype(np.float32)
    change = Change(new_q.astype(np.int8), scale=scale)
    bias = layer.bias if layer.bias is not None else layer.bias_add
    if bias is not None and bias.value is not None:
        values = bias.value.astype(np.float64)
        per_out = np.broadcast_to(factor.reshape(-1), values.shape)
        change.bias = np.round(values / per_out).astype(np.int32)
        old_scale = bias.scale.astype(np.float64)
        change.bias_scale = (
            old_scale * per_out.reshape(old_scale.shape)
            if old_scale.ndim
            else old_scale * float(per_out.reshape(-1)[0])
        ).astype(np.float32)
    return change


def _channel_shape(values: np.ndarray, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return ()
    axis %= values.ndim
    return tuple(values.shape[axis] if i == axis else 1 for i in range(values.ndim))


def widen(layer: IntegerLayer) -> Change | None:
    """uint8 weights with the same values (q + 128, zero point + 128); None where the zero
    points differ between channels (onnxruntime's u8 conv needs one)."""
    wt = layer.weight
    assert wt.value is not None
    if np.unique(wt.zero_point).size > 1:
        return None
    value = (wt.value.astype(np.int16) + 128).astype(np.uint8)
    return Change(value, zero_point=(wt.zero_point.astype(np.int16) + 128).astype(np.uint8))


def _trial(layer: IntegerLayer, change: Change) -> IntegerLayer:
    weight = replace(
        layer.weight,
        value=change.weight,
        scale=change.scale if change.scale is not None else layer.weight.scale,
        zero_point=change.zero_point if change.zero_point is not None else layer.weight.zero_point,
        dtype=change.weight.dtype,
    )
    if layer.bias is None or change.bias is None:  # a bias Add stays outside the layer
        return replace(layer, weight=weight)
    return replace(layer, weight=weight, bias_int32=change.bias.astype(np.int64))


def plan(
    model: onnx.ModelProto,
    batches: list[Batch] | None,
    policy: Policy = Policy(),
) -> list[tuple[IntegerLayer, Remedy, Change]]:
    """The remedy for each layer that can saturate, measured on ``batches`` where given."""
    planned = []
    remedy = policy.remedy
    for layer, operands in saturating_layers(model, batches):
        seen = activation_bound(layer, operands)
        bound = np.minimum(seen * policy.margin, U8_MAX) if operands else seen
        matrices = reduction_matrix(layer)
        at_risk = int(sum(pairs_at_risk(m, bound).sum() for m in matrices))
        if not at_risk:
            continue
        candidates: dict[str, Change] = {}
        if remedy in ("auto", "reround"):
            rounded = np.stack([reround(m, bound) for m in matrices])
            candidates["reround"] = Change(from_reduction_matrix(layer, rounded))
        if remedy in ("auto", "narrow"):
            # the whole layer: narrowing only the channels at risk measured 0.1 pt better on
            # cnn_mnist but 0.4 pt worse on mobilenet_mnist (BENCHMARKS.md)
            candidates["narrow"] = narrow(layer)
        wide = widen(layer) if remedy in ("auto", "u8") else None
        if wide is not None:
            candidates["u8"] = wide
        if not candidates:
            continue
        fast = [name for name in candidates if name != "u8"]
        errors: dict[str, float] = {}
        if operands:
            reference = [layer_output(layer, x, None, EXACT) for x in operands]
            errors["none"] = layer_error(layer, operands, reference)
            for name, change in candidates.items():
                errors[name] = layer_error(_trial(layer, change), operands, reference)
            chosen = min(candidates, key=lambda name: errors[name])
            if fast and remedy == "auto":
                best = min(fast, key=lambda name: errors[name])
                chosen = best if errors[best] <= policy.tolerance or wide is None else "u8"
        elif fast:  # no data: the smaller change to the weights, in units of the old scale
            chosen = min(fast, key=lambda name: _weight_change(layer, candidates[name]))
        else:
            chosen = "u8"
        change = candidates[chosen]
        assert layer.weight.value is not None
        shift = 128 if change.zero_point is not None else 0  # u8: same values
        changed = int(np.sum(change.weight.astype(np.int16) - shift != layer.weight.value))
        planned.append(
            (layer, Remedy(layer.name, layer.op, chosen, at_risk, changed, errors), change)
        )
    return planned


def _weight_change(layer: IntegerLayer, change: Change) -> float:
    trial = _trial(layer, change)
    assert layer.weight.value is not None and trial.weight.value is not None
    old = layer.weight.value.astype(np.float64) * layer.weight.scale.reshape(
        _channel_shape(layer.weight.value, layer.weight.axis)
    )
    new = trial.weight.value.astype(np.float64) * trial.weight.scale.reshape(
        _channel_shape(layer.weight.value, layer.weight.axis)
    )
    return float(np.linalg.norm(new - old))


def apply(graph: gs.Graph, planned: list[tuple[IntegerLayer, Remedy, Change]]) -> int:
    """Write each change into ``graph`` as new constants of the layer's DequantizeLinears;
    the number of layers changed. A layer is found by its output tensor (else its node
    name), its DequantizeLinears through the node's inputs: ``graph`` may be another
    candidate of the same model, whose generated tensor names (the DequantizeLinear outputs
    of a shared constant) are numbered differently. A layer absent from ``graph`` or left in
    float there is skipped."""
    writers = {out.name: node for node in graph.nodes for out in node.outputs}
    named = {node.name: node for node in graph.nodes if node.name}
    names = set(graph.tensors())
    applied = 0
    for layer, _, change in planned:
        node = writers.get(layer.node.output[0]) or named.get(layer.node.name)
        found = _dequantizers(layer, node)
        if found is None:
            continue
        weight_dq, bias_dq = found
        _replace(weight_dq, 0, change.weight, names)
        if change.scale is not None:
            _replace(weight_dq, 1, change.scale, names)
        if change.zero_point is not None:
            _replace(weight_dq, 2, change.zero_point, names)
        if bias_dq is not None and change.bias is not None and change.bias_scale is not None:
            _replace(bias_dq, 0, change.bias, names)
            _replace(bias_dq, 1, change.bias_scale, names)
        applied += 1
    return applied


def _dequantized_by(node: gs.Node, index: int) -> gs.Node | None:
    """The DequantizeLinear that writes input ``index`` of ``node``, if one does."""
    if index >= len(node.inputs) or not node.inputs[index].inputs:
        return None
    producer: gs.Node = node.inputs[index].inputs[0]
    return producer if producer.op == "DequantizeLinear" else None


def _dequantizers(
    layer: IntegerLayer, node: gs.Node | None
) -> tuple[gs.Node, gs.Node | None] | None:
    """``layer``'s weight and bias DequantizeLinears in a graph where it is ``node``; None
    when the node is missing or its weight is not dequantized there (kept in float)."""
    inputs = list(layer.node.input)
    if node is None or node.op != layer.op or layer.weight.output not in inputs:
        return None
    weight_dq = _dequantized_by(node, inputs.index(layer.weight.output))
    if weight_dq is None:
        return None
    bias_dq = None
    if layer.bias is not None and layer.bias.output in inputs:
        bias_dq = _dequantized_by(node, inputs.index(layer.bias.output))
    elif layer.bias_add is not None:  # an Add of DQ(int32 constant) reading the output
        for add in (n for n in node.outputs[0].outputs if n.op == "Add"):
            for index, tensor in enumerate(add.inputs):
                dq = None if tensor is node.outputs[0] else _dequantized_by(add, index)
                if dq is not None and isinstance(dq.inputs[0], gs.Constant):
                    if dq.inputs[0].values.dtype == np.int32:
                        bias_dq = dq
    return weight_dq, bias_dq


def _replace(node: gs.Node, index: int, values: np.ndarray, names: set[str]) -> None:
    """Input ``index`` of ``node`` becomes a new constant (appended when it was omitted) with
    a name no other tensor has: constants shared between layers keep their old value."""
    base = f"{node.inputs[index].name if index < len(node.inputs) else node.name}_safe"
    name, n = base, 1
    while name in names:
        name, n = f"{base}_{n}", n + 1
    names.add(name)
    constant = gs.Constant(name, np.ascontiguousarray(values))
    if index < len(node.inputs):
        node.inputs[index] = constant
    else:  # an omitted zero point: the default (0 of the weight's type) comes before it
        node.inputs.append(constant)


def protect_from_saturation(
    graph: gs.Graph,
    ctx: PassContext,
    result: PassResult,
    policy: Policy,
    batches: list[Batch] | None,
) -> None:
    """Make the int8 layers of ``graph`` safe on ``ctx.targets``; record it in ``result``."""
    saturating = [t.name for t in ctx.targets if t.saturates]
    if policy.remedy == "off" or not saturating:
        why = "saturation=off" if policy.remedy == "off" else "no target saturates"
        result.details.append({"saturation": {"targets": saturating, "skipped": why}})
        return
    planned = plan(ctx.export(graph), batches, policy)
    applied = apply(graph, planned)
    if applied < len(planned):
        logger.warning(
            "qdq: %d of %d saturation remedies found no layer", len(planned) - applied, len(planned)
        )
    result.count("layers_saturation_safe", applied)
    result.count("layers_u8_weights", sum(r.chosen == "u8" for _, r, _ in planned))
    result.details.append(
        {
            "saturation": {
                "targets": saturating,
                "remedy": policy.remedy,
                "tolerance": policy.tolerance,
                "data": bool(batches),
                "layers": [r.to_json() for _, r, _ in planned],
            }
        }
    )
