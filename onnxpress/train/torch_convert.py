"""ONNX graph -> torch.nn.Module that interprets the nodes in topological order.

Float initializers become ``nn.Parameter``s keyed by initializer name (``OnnxModule.param``),
so gradients reach exactly the tensors that ``write_back`` puts back into the same graph;
integer constants (shapes, axes, zero points), BatchNormalization statistics and scalars
stay buffers. QuantizeLinear/DequantizeLinear become fake-quant with a straight-through
estimator for round(): a DequantizeLinear of an int8 weight trains a float latent weight
(re-quantized on write-back) and, with ``learn_scales``, the scales are parameters too.
Op semantics live in ``onnxpress.train.torch_ops``, ``torch_ops_qdq``, ``torch_ops_rnn`` and
``torch_ops_resize``; an op without a handler is an error listing
every unsupported op of the graph. torch is imported only by callers that need it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from onnxpress.core.errors import InvalidModelError
from onnxpress.train import (
    torch_ops,
    torch_ops_mobile,
    torch_ops_qdq,
    torch_ops_resize,
    torch_ops_rnn,
)
from onnxpress.train.torch_ops import NodeArgs
from onnxpress.train.torch_ops_qdq import qrange

logger = logging.getLogger(__name__)

HANDLERS = {
    **torch_ops.HANDLERS,
    **torch_ops_qdq.HANDLERS,
    **torch_ops_mobile.HANDLERS,
    **torch_ops_rnn.HANDLERS,
    **torch_ops_resize.HANDLERS,
}

# (op type, input index) pairs whose float constants are statistics, not weights.
FROZEN_INPUTS = {
    ("BatchNormalization", 3),
    ("BatchNormalization", 4),
} | torch_ops_resize.SIZE_INPUTS
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class UnsupportedOpsError(InvalidModelError):
    """The graph holds ops the torch converter cannot run."""


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types of the graph that the converter has no handler for (sorted)."""
    return sorted({n.op_type for n in model.graph.node if n.op_type not in HANDLERS})


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class OnnxModule(torch.nn.Module):
    """Runs one ONNX graph in torch; ``forward(feeds)`` returns the graph outputs in order."""

    def __init__(self, model: onnx.ModelProto, learn_scales: bool = True) -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise UnsupportedOpsError(
                f"the torch converter does not support op(s) {', '.join(missing)}"
            )
        graph = model.graph
        self.nodes = [(n, _attrs(n)) for n in graph.node]
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.input_names = [n for n in self.input_names if n not in inits]
        self.weights = torch.nn.ParameterList()
        self.scales = torch.nn.ParameterList()
        self.param_index: dict[str, int] = {}  # initializer name -> index in weights
        self.scale_index: dict[str, int] = {}  # scale initializer name -> index in scales
        self.latent: dict[str, tuple[str, str, int]] = {}  # int weight -> (scale, zp, axis)
        self.latent_bound: dict[str, int] = {}  # int weight -> largest |q - zp| it may reach
        self.const_names: list[str] = []
        frozen, scale_names, latent = self._classify(inits)
        # A tied bias scale follows its input and weight scales (see tied_bias_scales).
        self.tied = tied_bias_scales(model, inits)
        scale_names.difference_update(b for b, _, _ in self.tied.values())
        frozen.update(b for b, _, _ in self.tied.values())
        for name, array in inits.items():
            if name in latent:
                scale_name, zp_name, axis = latent[name]
                value = _dequantize(array, inits[scale_name], inits.get(zp_name), axis)
                self._add_weight(name, value)
                self.latent[name] = latent[name]
                # training keeps the integers within the span they had (7-bit weights made
                # safe from int16 pair saturation stay 7-bit)
                zp = inits.get(zp_name)
                offset = array.astype(np.int64) - (
                    0 if zp is None else _axis_shaped(zp, array, axis)
                )
                self.latent_bound[name] = int(np.max(np.abs(offset))) if offset.size else 0
            elif name in scale_names and learn_scales:
                self.scale_index[name] = len(self.scales)
                self.scales.append(torch.nn.Parameter(torch.from_numpy(array.copy())))
            elif np.issubdtype(array.dtype, np.floating) and array.size > 1 and name not in frozen:
                self._add_weight(name, array)
            else:
                self.register_buffer(
                    f"const_{len(self.const_names)}", torch.from_numpy(array.copy())
                )
                self.const_names.append(name)

    def _add_weight(self, name: str, array: np.ndarray) -> None:
        self.param_index[name] = len(self.weights)
        self.weights.append(torch.nn.Parameter(torch.from_numpy(np.array(array, np.float32))))

    def _classify(
        self, inits: Mapping[str, np.ndarray]
    ) -> tuple[set[str], set[str], dict[str, tuple[str, str, int]]]:
        frozen: set[str] = set()
        scales: set[str] = set()
        latent: dict[str, tuple[str, str, int]] = {}
        for node, attrs in self.nodes:
            for index, name in enumerate(node.input):
                if (node.op_type, index) in FROZEN_INPUTS:
                    frozen.add(name)
            if node.op_type in QDQ_OPS and len(node.input) > 1:
                if inits.get(node.input[1]) is not None:
                    scales.add(node.input[1])
                source = inits.get(node.input[0])
                if (
                    node.op_type == "DequantizeLinear"
                    and source is not None
                    and np.issubdtype(source.dtype, np.integer)
                    and len(node.input) > 2
                    and node.input[1] in inits
                    and node.input[2] in inits
                ):
                    latent[node.input[0]] = (
                        node.input[1],
                        node.input[2],
                        int(attrs.get("axis", 1)),
                    )
        # Scales shared with something other than Q/DQ stay fixed.
        for node, _ in self.nodes:
            if node.op_type not in QDQ_OPS:
                scales.difference_update(node.input)
        return frozen, scales, latent

    def tensor(self, name: str) -> torch.Tensor:
        """The current value of an initializer (float latent weights as floats)."""
        if name in self.param_index:
            return self.weights[self.param_index[name]]
        if name in self.scale_index:
            return self.scales[self.scale_index[name]]
        return dict(self.named_buffers())[f"const_{self.const_names.index(name)}"]

    def initial_env(self) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        for name, index in self.param_index.items():
            env[name] = self.weights[index]
        for name, index in self.scale_index.items():
            env[name] = self.scales[index]
        buffers = dict(self.named_buffers())
        for index, name in enumerate(self.const_names):
            env[name] = buffers[f"const_{index}"]
        return env

    def forward(
        self, feeds: Mapping[str, torch.Tensor], extra: Sequence[str] = ()
    ) -> list[torch.Tensor]:
        env = self.initial_env()
        env.update(feeds)
        for node, attrs in self.nodes:
            inputs = [env[name] if name else None for name in node.input]
            if node.output[0] in self.tied:
                _, x_scale, w_scale = self.tied[node.output[0]]
                inputs[1] = env[x_scale] * env[w_scale]
            args = NodeArgs(node.op_type, inputs, attrs, self._latent_bound(node))
            outputs = HANDLERS[node.op_type](args)
            for name, value in zip(node.output, outputs, strict=False):
                if name:
                    env[name] = value
        return [env[name] for name in [*self.output_names, *extra]]

    def _latent_bound(self, node: onnx.NodeProto) -> int | None:
        """For a DequantizeLinear of a latent weight, how far its integers may leave zp."""
        if node.op_type == "DequantizeLinear" and node.input[0] in self.latent:
            return self.latent_bound[node.input[0]]
        return None


def _dequantize(
    q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int
) -> np.ndarray:
    zp = np.zeros_like(scale) if zero_point is None else zero_point
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q.astype(np.float64) - zp.astype(np.float64)) * scale).astype(np.float32)


def _quantize(
    value: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int, bound: int
) -> np.ndarray:
    lo, hi = qrange(zero_point.dtype)
    s, zp = scale.astype(np.float64), zero_point.astype(np.float64)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * value.ndim
        shape[axis % value.ndim] = scale.size
        s, zp = s.reshape(shape), zp.reshape(shape)
    q = np.clip(np.rint(value / s) + zp, np.maximum(lo, zp - bound), np.minimum(hi, zp + bound))
    return q.astype(zero_point.dtype)


def _axis_shaped(values: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel ``values`` shaped to broadcast along ``axis`` of ``like``."""
    if values.ndim == 1 and values.size > 1:
        shape = [1] * like.ndim
        shape[axis % like.ndim] = values.size
        return values.astype(np.int64).reshape(shape)
    return values.astype(np.int64)


def convert(model: onnx.ModelProto, learn_scales: bool = True) -> OnnxModule:
    """The torch module of ``model`` (raises UnsupportedOpsError listing missing ops)."""
    return OnnxModule(model, learn_scales)


def write_back(model: onnx.ModelProto, module: OnnxModule) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers hold the module's values; nodes are untouched.

    Latent float weights are re-quantized with their (possibly learned) scales; int32
    biases whose scale was input_scale·weight_scale get that product recomputed.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    values = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    original = dict(values)
    for name in module.scale_index:
        values[name] = module.tensor(name).detach().numpy().astype(values[name].dtype)
    _retie_bias_scales(model, values, original)
    for name in module.param_index:
        current = module.tensor(name).detach().numpy()
        if name in module.latent:
            scale_name, zp_name, axis = module.latent[name]
            values[name] = _quantize(
                current, values[scale_name], values[zp_name], axis, module.latent_bound[name]
            )
        else:
            values[name] = current.astype(values[name].dtype)
    for tensor in out.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    return out


def tied_bias_scales(
    model: onnx.ModelProto, values: Mapping[str, np.ndarray]
) -> dict[str, tuple[str, str, str]]:
    """Int32 bias DQs of Conv/Gemm whose scale is input_scale·weight_scale.

    Keyed by the bias DQ's output name: (bias scale, input scale, weight scale) names.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    tied: dict[str, tuple[str, str, str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        dqs = [producers.get(name) for name in node.input[:3]]
        if any(d is None or d.op_type != "DequantizeLinear" or len(d.input) < 2 for d in dqs):
            continue
        x_scale, w_scale, b_scale = (d.input[1] for d in dqs if d is not None)
        bias = values.get(dqs[2].input[0])  # type: ignore[union-attr]
        if bias is None or bias.dtype != np.int32:
            continue
        if not all(name in values for name in (x_scale, w_scale, b_scale)):
            continue
        product = values[x_scale] * values[w_scale]
        if product.shape == values[b_scale].shape and np.allclose(
            product, values[b_scale], rtol=1e-5, atol=0
        ):
            tied[node.input[2]] = (b_scale, x_scale, w_scale)
    return tied


def _retie_bias_scales(
    model: onnx.ModelProto, values: dict[str, np.ndarray], original: Mapping[str, np.ndarray]
) -> None:
    for b_scale, x_scale, w_scale in tied_bias_scales(model, original).values():
        values[b_scale] = (values[x_scale] * values[w_scale]).astype(np.float32)
