"""Which int8 layers of a QDQ model saturate on targets that sum u8 x s8 pairs in int16.

A weight pair (w0, w1) adjacent along a layer's reduction axis (``int8_layers``) can pass the
int16 limit when both have the same sign and a0|w0| + a1|w1| > 32767, with a0, a1 the largest
raw u8 activation bytes that meet them. Pairs of opposite sign never can (255 * 127 < 32767).
Without data every activation byte may reach 255; with data ``a`` is the largest byte seen
per input channel. On data the layer is also run both ways (``int8_emulation``): the share of
pair sums that clipped and the relative L2 error of its output against exact int32 sums.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxpress.core.int8_emulation import INT16_MAX, Batch, layer_output, pair_saturates
from onnxpress.core.int8_layers import IntegerLayer, integer_layers, reduction_matrix
from onnxpress.core.targets import EXACT, PAIR_SATURATING

logger = logging.getLogger(__name__)

U8_MAX = 255


@dataclass
class LayerRisk:
    layer: str
    op: str
    pairs_at_risk: int  # weight pairs whose sum can pass int16 for the activation bound
    pairs: int
    error: float | None = None  # rel-L2 of the output, pair-saturating vs exact, on the data

    @property
    def at_risk(self) -> bool:
        return self.pairs_at_risk > 0 and (self.error is None or self.error > 0)

    def to_json(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "op": self.op,
            "pairs_at_risk": self.pairs_at_risk,
            "pairs": self.pairs,
            "error": self.error,
        }


def operand_values(
    model: onnx.ModelProto, layers: list[IntegerLayer], batches: list[Batch]
) -> list[dict[str, np.ndarray]]:
    """The 8-bit activation operands of ``layers`` on each batch (QDQ float semantics)."""
    names = sorted({layer.activation.tensor for layer in layers})
    inputs = {i.name for i in model.graph.input}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in names:
        if name not in have and name not in inputs:
            probe.graph.output.append(helper.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = min(4, os.cpu_count() or 1)
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    outputs = [o.name for o in session.get_outputs()]
    values = []
    for batch in batches:
        run = dict(zip(outputs, session.run(None, batch), strict=True))
        values.append({name: run[name] if name in run else batch[name] for name in names})
    return values


def activation_bound(layer: IntegerLayer, operands: list[np.ndarray] | None) -> np.ndarray:
    """The largest raw u8 byte per reduction index K that the kernels may see."""
    matrices = reduction_matrix(layer)
    k = matrices.shape[1]
    if not operands:
        return np.full(k, float(U8_MAX))
    shift = 128 if layer.activation.dtype == np.dtype(np.int8) else 0
    channel_axis = 1 if layer.op == "Conv" else -1
    per_channel = np.max(
        [
            np.moveaxis(x.astype(np.int64) + shift, channel_axis, 0)
            .reshape(x.shape[channel_axis], -1)
            .max(axis=1)
            for x in operands
        ],
        axis=0,
    ).astype(np.float64)
    if layer.op == "Conv":
        zero = float(int(layer.activation.zero_point) + shift)  # padding reads the zero point
        channels = per_channel.reshape(layer.groups, -1)[0] if layer.groups > 1 else per_channel
        channels = np.maximum(channels, zero)
        return np.tile(channels, k // channels.size)
    return per_channel


def pairs_at_risk(matrix: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """[pairs, N] mask of same-sign weight pairs whose sum can pass int16 for ``bound``."""
    w = matrix.astype(np.float64)
    a = bound.astype(np.float64)
    if w.shape[0] % 2:
        w, a = np.pad(w, ((0, 1), (0, 0))), np.pad(a, (0, 1))
    w2, a2 = w.reshape(-1, 2, w.shape[1]), a.reshape(-1, 2, 1)
    same_sign = np.sign(w2[:, 0]) * np.sign(w2[:, 1]) > 0
    return same_sign & ((a2 * np.abs(w2)).sum(axis=1) > INT16_MAX)


def saturating_layers(
    model: onnx.ModelProto, batches: list[Batch] | None
) -> list[tuple[IntegerLayer, list[np.ndarray]]]:
    """The integer layers with constant weights that sum in int16 pairs on AVX2, each with
    its 8-bit activation operand on every batch (none without data)."""
    layers = [
        layer
        for layer in integer_layers(model)
        if pair_saturates(layer, PAIR_SATURATING) and layer.weight.value is not None
    ]
    values = operand_values(model, layers, batches) if batches and layers else []
    return [(layer, [v[layer.activation.tensor] for v in values]) for layer in layers]


def assess(model: onnx.ModelProto, batches: list[Batch] | None = None) -> list[LayerRisk]:
    """Every integer layer that can saturate, with its measured error where data is given."""
    risks = []
    for layer, operands in saturating_layers(model, batches):
        bound = activation_bound(layer, operands)
        mask = np.concatenate([pairs_at_risk(m, bound) for m in reduction_matrix(layer)], axis=1)
        risk = LayerRisk(layer.name, layer.op, int(mask.sum()), int(mask.size))
        if operands and risk.pairs_at_risk:
            reference = [layer_output(layer, x, None, EXACT) for x in operands]
            risk.error = layer_error(layer, operands, reference)
        risks.append(risk)
    return risks


def layer_error(
    layer: IntegerLayer, operands: list[np.ndarray], reference: list[np.ndarray]
) -> float:
    """rel-L2 of the layer's pair-saturating output against ``reference`` over the operands."""
    num = den = 0.0
    for x, exact in zip(operands, reference, strict=True):
        got = layer_output(layer, x, None, PAIR_SATURATING).astype(np.float64)
        num += float(np.sum((got - exact) ** 2))
        den += float(np.sum(exact.astype(np.float64) ** 2))
    return float(np.sqrt(num / max(den, 1e-30)))
