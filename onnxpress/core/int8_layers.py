"""The layers of a QDQ model that onnxruntime runs on integer kernels, read from the graph.

A layer is a Conv, MatMul or Gemm whose activation input is ``DequantizeLinear`` of an 8-bit
tensor and whose weight is ``DequantizeLinear`` of an 8-bit tensor (a constant, or for an
activation x activation MatMul another quantized tensor). onnxruntime fuses such a Conv into
QLinearConv when a ``QuantizeLinear`` reads its output (directly or through the Relu/Clip
it folds), a MatMul into QLinearMatMul or MatMulIntegerToFloat, and a Gemm into QGemm.
Layers made by onnxpress, onnxruntime's quantizer and NNCF all have this form.

``reduction_matrix`` lays a constant weight out as the [K, N] matrix the kernels multiply,
with the reduction axis K in the order onnxruntime packs it: (kernel taps, then input
channels) for a convolution (its integer conv runs channels-last), the natural order for
MatMul and Gemm. Adjacent pairs along K are what AVX2's ``vpmaddubsw`` sums into int16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

LINEAR_OPS = ("Conv", "MatMul", "Gemm")
_FOLDED_ACTIVATIONS = ("Relu", "Clip")


@dataclass
class Quantized:
    """One DequantizeLinear input: the 8-bit tensor and its parameters."""

    tensor: str  # the 8-bit tensor DequantizeLinear reads
    scale: np.ndarray  # float32, scalar or per-channel
    zero_point: np.ndarray  # same shape as scale, the 8-bit dtype
    axis: int | None  # per-channel axis, None per tensor
    dtype: np.dtype
    value: np.ndarray | None = None  # the 8-bit values when constant
    scale_name: str = ""  # the scale tensor DequantizeLinear reads
    output: str = ""  # the DequantizeLinear's output


@dataclass
class IntegerLayer:
    node: onnx.NodeProto
    activation: Quantized
    weight: Quantized
    bias_int32: np.ndarray | None = None  # a DequantizeLinear'd int32 bias (scale sx*sw)
    bias_float: np.ndarray | None = None  # a float bias (Gemm C, or a float Conv bias)
    bias: Quantized | None = None  # the int32 bias's DequantizeLinear input, if any
    # a MatMul's bias as an Add of DQ(int32) that alone reads its output (onnxruntime fuses
    # it into the integer kernel assuming its scale is s_x * s_w)
    bias_add: Quantized | None = None
    attributes: dict[str, object] = field(default_factory=dict)
    # derived constant arrays (weight matrices) computed once per layer by the emulation;
    # not an init field, so dataclasses.replace (another weight) starts an empty one
    cache: dict[str, np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def op(self) -> str:
        return str(self.node.op_type)

    @property
    def depthwise(self) -> bool:
        """One input channel per group: onnxruntime's depthwise kernel sums in int32."""
        w = self.weight.value
        return self.op == "Conv" and w is not None and w.shape[1] == 1 and self.groups > 1

    @property
    def groups(self) -> int:
        return int(self.attributes.get("group", 1))  # type: ignore[call-overload]


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _quantized(
    dq: onnx.NodeProto, constants: dict[str, np.ndarray], dtypes: dict[str, int]
) -> Quantized | None:
    if len(dq.input) < 2 or dq.input[1] not in constants:
        return None
    scale = np.asarray(constants[dq.input[1]], np.float32)
    value = constants.get(dq.input[0])
    if value is not None:
        dtype = value.dtype
    elif dq.input[0] in dtypes:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtypes[dq.input[0]]))
    elif len(dq.input) > 2 and dq.input[2] in constants:
        dtype = constants[dq.input[2]].dtype
    else:
        return None
    if dtype not in (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int32)):
        return None
    if len(dq.input) > 2 and dq.input[2]:
        if dq.input[2] not in constants:
            return None
        zero = np.asarray(constants[dq.input[2]])
    else:
        zero = np.zeros(scale.shape, dtype)
    axis = next((int(a.i) for a in dq.attribute if a.name == "axis"), 1)
    return Quantized(
        dq.input[0],
        scale,
        zero,
        axis if scale.ndim else None,
        dtype,
        value,
        dq.input[1],
        dq.output[0],
    )


def integer_layers(model: onnx.ModelProto) -> list[IntegerLayer]:
    """The Conv/MatMul/Gemm nodes onnxruntime runs as integer kernels, in graph order."""
    constants = _constants(model)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    dtypes = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*graph.input, *graph.value_info, *graph.output]
    }
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            zp = constants.get(node.input[2]) if len(node.input) > 2 else None
            dtypes[node.output[0]] = (
                onnx.TensorProto.UINT8
                if zp is None
                else onnx.helper.np_dtype_to_tensor_dtype(zp.dtype)
            )
    layers: list[IntegerLayer] = []
    for node in graph.node:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2:
            continue
        dqs = [producer.get(name) for name in node.input[:2]]
        if any(dq is None or dq.op_type != "DequantizeLinear" for dq in dqs):
            continue
        activation = _quantized(dqs[0], constants, dtypes)  # type: ignore[arg-type]
        weight = _quantized(dqs[1], constants, dtypes)  # type: ignore[arg-type]
        if activation is None or weight is None or activation.value is not None:
            continue
        if activation.scale.ndim or weight.dtype == np.dtype(np.int32):
            continue
        if node.op_type == "Conv" and (
            weight.value is None or not _quantized_output(node, readers)
        ):
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layer = IntegerLayer(node, activation, weight, attributes=attributes)
        if len(node.input) > 2 and node.input[2]:
            bias_node = producer.get(node.input[2])
            if bias_node is not None and bias_node.op_type == "DequantizeLinear":
                bias = _quantized(bias_node, constants, dtypes)
                if bias is None or bias.value is None:
                    continue
                layer.bias_int32 = bias.value.astype(np.int64)
                layer.bias = bias
            elif node.input[2] in constants:
                layer.bias_float = constants[node.input[2]].astype(np.float32)
            else:
                continue
        if layer.op == "MatMul":
            layer.bias_add = _bias_add(node, readers, producer, constants, dtypes)
        layers.append(layer)
    return layers


def _bias_add(
    node: onnx.NodeProto,
    readers: dict[str, list[onnx.NodeProto]],
    producer: dict[str, onnx.NodeProto],
    constants: dict[str, np.ndarray],
    dtypes: dict[str, int],
) -> Quantized | None:
    consumers = readers.get(node.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type != "Add":
        return None
    other = [name for name in consumers[0].input if name != node.output[0]]
    dq = producer.get(other[0]) if len(other) == 1 else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    bias = _quantized(dq, constants, dtypes)
    return bias if bias is not None and bias.dtype == np.dtype(np.int32) else None


def _quantized_output(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """The Conv's output is read by one QuantizeLinear, or by a Relu/Clip that one reads."""
    consumers = readers.get(node.output[0], [])
    if len(consumers) != 1:
        return False
    if consumers[0].op_type in _FOLDED_ACTIVATIONS:
        consumers = readers.get(consumers[0].output[0], [])
        if len(consumers) != 1:
            return False
    return consumers[0].op_type == "QuantizeLinear"


def reduction_matrix(layer: IntegerLayer, weights: np.ndarray | None = None) -> np.ndarray:
    """The constant weights as [groups, K, N/groups] in onnxruntime's K order (see module doc)."""
    w = layer.weight.value if weights is None else weights
    assert w is not None
    if layer.op == "Conv":
        groups = layer.groups
        out_channels = w.shape[0]
        per_group = w.reshape(groups, out_channels // groups, *w.shape[1:])
        # [g, n, c, *k] -> [g, *k, c, n] -> [g, K, n]
        order = (0, *range(3, per_group.ndim), 2, 1)
        return np.transpose(per_group, order).reshape(groups, -1, out_channels // groups)
    if layer.op == "Gemm" and layer.attributes.get("transB", 0):
        return w.T[None]
    if w.ndim >= 3:  # a batched MatMul B [..., K, N]: one matrix per batch index
        return w.reshape(-1, *w.shape[-2:])
    return w.reshape(-1, w.shape[-1])[None]


def from_reduction_matrix(layer: IntegerLayer, matrix: np.ndarray) -> np.ndarray:
    """The inverse of ``reduction_matrix``: weights in the node's own layout."""
    w = layer.weight.value
    assert w is not None
    if layer.op == "Conv":
        groups, _, per_group_out = matrix.shape
        kernel = w.shape[2:]
        channels = w.shape[1]
        m = matrix.reshape(groups, *kernel, channels, per_group_out)
        order = (0, m.ndim - 1, m.ndim - 2, *range(1, m.ndim - 2))
        return np.transpose(m, order).reshape(w.shape)
    if layer.op == "Gemm" and layer.attributes.get("transB", 0):
        return matrix[0].T
    return matrix.reshape(w.shape) if w.ndim >= 3 else matrix[0].reshape(w.shape)
