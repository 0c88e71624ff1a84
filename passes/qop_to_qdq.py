"""qop-to-qdq: quantized operators (QOperator format) rewritten as QDQ: each
``QLinearX(x, x_scale, x_zero, ..., y_scale, y_zero)`` becomes DequantizeLinear of its
quantized inputs, the float ``X`` with the same attributes, and a QuantizeLinear that writes
the op's own output tensor.

Int8 models from onnxruntime's ``quantize_static(quant_format=QOperator)`` and the int8
models of the ONNX model zoo are in this format; TVM's Relax importer converts none of its
ops, and ``onnxpress compile`` refused them ("cannot convert these ops: QLinearConv ...",
docs/BENCHMARKS.md, run 26). In QDQ form, compile's integer lowering (int8.py) takes them
like any model onnxpress quantized itself. onnxruntime fuses the QDQ groups back into the
integer kernels the QOperator ops ran: at its default optimization level the result is
bit-identical (resnet18 and mobilenet_v2 from quantize_static), so the pass is lossless and
verified that way (``runs_optimized``; without those fusions QDQ runs as float fake-quant,
one quantization step away in places).

com.microsoft QuantizeLinear / DequantizeLinear (onnxruntime's quantizer writes them for 16-bit
activations below opset 21, ``UseQDQContribOps``) become ONNX's own, the same operators from
opset 21 for 16-bit and 4-bit types (the model is upgraded first where it is older).

Converted: QLinearConv (a bias is int32 at scale x_scale * w_scale), QLinearMatMul, and the
com.microsoft QLinearAdd, QLinearMul, QLinearSigmoid, QLinearLeakyRelu,
QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, QLinearSoftmax and QGemm.
Per-channel scales dequantize along the weight's output axis (DequantizeLinear's ``axis``, opset 13: an older
model is upgraded first, as the qdq pass does, before any node is rewritten). Refused, with a
reason: channels-last pools, scales that are not constants, a QLinearSoftmax whose axis
means something else at the graph's opset.

The format also runs MaxPool, GlobalMaxPool and nearest Resize on the quantized bytes
themselves (they only select values). Each such op that reads a QuantizeLinear's output gets
the same DequantizeLinear / QuantizeLinear pair at that scale, as the QDQ format writes it:
compile's integer lowering keeps the channels-last layout through a QDQ pool, where an
integer one sent resnet18's stem back to NCHW (0.35 ms of transposes and a scalar pool).
A float max pool of a DequantizeLinear's output that feeds anything but a QuantizeLinear at
the same scale (googlenet's pool feeding another pool) gets that Q / DQ pair after it, exactly,
so that compile runs every pool on the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.upgrade_opset import upgrade_opset

from onnxpress.core.context import PassContext
from onnxpress.core.ir import replace_node
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

MS = "com.microsoft"
# op: (domain, float op, indices of (x, scale, zero) triples, output (scale, zero) or None)
SIMPLE: dict[str, tuple[str, str, tuple[int, ...], tuple[int, int] | None]] = {
    "QLinearMatMul": ("", "MatMul", (0, 3), (6, 7)),
    "QLinearAdd": (MS, "Add", (0, 3), (6, 7)),
    "QLinearMul": (MS, "Mul", (0, 3), (6, 7)),
    "QLinearSigmoid": (MS, "Sigmoid", (0,), (3, 4)),
    "QLinearLeakyRelu": (MS, "LeakyRelu", (0,), (3, 4)),
    "QLinearGlobalAveragePool": (MS, "GlobalAveragePool", (0,), (3, 4)),
    "QLinearAveragePool": (MS, "AveragePool", (0,), (3, 4)),
    "QLinearSoftmax": (MS, "Softmax", (0,), (3, 4)),
}
HANDLED = {*SIMPLE, "QLinearConv", "QLinearConcat", "QGemm"}
SOFTMAX_PER_AXIS = 13  # Softmax before opset 13 flattens the input to 2-D at its axis
SELECTING = {"MaxPool", "GlobalMaxPool", "Resize"}  # run on the bytes in QOperator models
POOLS = {"MaxPool", "GlobalMaxPool"}
PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis
QUANTIZERS = {"QuantizeLinear", "DequantizeLinear"}
WIDE_TYPES_OPSET = 21  # int16 / uint16 / int4 / uint4 in ONNX's QuantizeLinear
NARROW = (np.int8, np.uint8)


@dataclass(frozen=True)
class QopToQdqOptions:
    """No options: every quantized operator that passes the checks is converted."""


class Refused(Exception):
    """Why one node stays as it is."""


def _constant(tensor: gs.Tensor, what: str) -> np.ndarray:
    if not isinstance(tensor, gs.Constant):
        raise Refused(f"{what} {tensor.name!r} is not a constant")
    return np.asarray(tensor.values)


def _scales(node: gs.Node) -> list[gs.Tensor]:
    """The scale inputs of a quantized operator (inputs and output)."""
    ins = node.inputs
    if node.op in SIMPLE:
        _, _, triples, out = SIMPLE[node.op]
        return [ins[i + 1] for i in triples] + ([ins[out[0]]] if out else [])
    if node.op == "QLinearConcat":
        return [ins[0]] + [ins[i + 1] for i in range(2, len(ins), 3)]
    return [t for i, t in enumerate(ins) if i in (1, 4, 7 if node.op == "QGemm" else 6)]


def _per_channel(node: gs.Node) -> bool:
    """Whether any of the node's scales is a vector (DequantizeLinear then needs ``axis``)."""
    return any(isinstance(t, gs.Constant) and np.size(t.values) > 1 for t in _scales(node))


class Converter:
    """The QDQ form of one node: ``new_nodes``, which the pass puts in the node's place;
    ``prefix`` names them (unique in the graph: unnamed nodes are numbered)."""

    def __init__(self, node: gs.Node, prefix: str | None = None) -> None:
        self.node = node
        self.new_nodes: list[gs.Node] = []
        self.prefix = prefix or node.name or node.op

    def _var(self, suffix: str) -> gs.Variable:
        return gs.Variable(f"{self.prefix}/{suffix}", dtype=np.float32)

    def dequantize(self, x: gs.Tensor, scale: gs.Tensor, zero: gs.Tensor, axis: int) -> gs.Tensor:
        values = _constant(scale, "scale")
        name = f"{x.name}_dq{len(self.new_nodes)}"  # unique where one tensor comes in twice
        out = self._var(name)
        attrs = {"axis": axis} if values.size > 1 else {}
        self.new_nodes.append(
            gs.Node("DequantizeLinear", f"{self.prefix}/{name}", attrs, [x, scale, zero], [out])
        )
        return out

    def quantize(self, y: gs.Tensor, scale: gs.Tensor, zero: gs.Tensor) -> None:
        _constant(scale, "output scale")
        out = self.node.outputs[0]
        self.new_nodes.append(
            gs.Node("QuantizeLinear", f"{self.prefix}/q", {}, [y, scale, zero], [out])
        )

    def float_op(self, op: str, inputs: list[gs.Tensor], attrs: dict[str, object]) -> gs.Tensor:
        out = self._var("float")
        self.new_nodes.append(gs.Node(op, f"{self.prefix}/float", attrs, inputs, [out]))
        return out

    def bias(
        self, b: gs.Tensor, x_scale: gs.Tensor, w_scale: gs.Tensor, factor: float
    ) -> gs.Tensor:
        """An int32 bias at scale x_scale * w_scale (* factor), zero point 0, dequantized."""
        # asarray: the product of two 0-d arrays is a numpy scalar, which gs.Constant refuses
        scale = np.asarray(
            _constant(x_scale, "scale") * _constant(w_scale, "scale") * factor, np.float32
        )
        scale = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
        zero = np.zeros(scale.shape, np.int32)
        s = gs.Constant(f"{self.prefix}/bias_scale", scale)
        z = gs.Constant(f"{self.prefix}/bias_zero", zero)
        return self.dequantize(b, s, z, 0)

    def softmax(self, x: gs.Tensor, attrs: dict[str, object], opset: int) -> gs.Tensor:
        """The float Softmax at the graph's ``opset``. QLinearSoftmax's ``opset`` says which
        Softmax it replaced; before opset 13 that one flattened the input to 2-D at its axis,
        which a later Softmax does only over the last axis: elsewhere it becomes Flatten ->
        Softmax -> Reshape back (the input's rank may not be known here)."""
        replaced = int(str(attrs.pop("opset", opset)))
        axis = int(str(attrs.get("axis", -1 if replaced >= SOFTMAX_PER_AXIS else 1)))
        rank = len(x.shape) if x.shape is not None else len(self.node.inputs[0].shape or [])
        last = axis == -1 or (rank > 0 and axis == rank - 1)
        if last or (replaced >= SOFTMAX_PER_AXIS) == (opset >= SOFTMAX_PER_AXIS):
            return self.float_op("Softmax", [x], {"axis": axis})
        if replaced >= SOFTMAX_PER_AXIS:
            raise Refused(
                f"a Softmax of opset {replaced} over axis {axis} in an opset {opset} model"
            )
        shape = gs.Variable(f"{self.prefix}/shape", dtype=np.int64)
        flat = self._var("flat")
        rows = self._var("rows")
        self.new_nodes += [
            gs.Node("Shape", f"{self.prefix}/shape", {}, [x], [shape]),
            gs.Node("Flatten", f"{self.prefix}/flatten", {"axis": axis}, [x], [flat]),
            gs.Node("Softmax", f"{self.prefix}/rows", {"axis": -1}, [flat], [rows]),
        ]
        return self.float_op("Reshape", [rows, shape], {})

    def convert(self, opset: int) -> None:
        """Emit the QDQ form, its float op at the graph's ``opset``."""
        node, ins = self.node, self.node.inputs
        attrs = dict(node.attrs)
        if attrs.get("channels_last"):
            raise Refused("channels_last=1 (a channels-last pool)")
        attrs.pop("channels_last", None)
        if node.op == "QLinearSoftmax":
            x = self.dequantize(ins[0], ins[1], ins[2], 1)
            self.quantize(self.softmax(x, attrs, opset), ins[3], ins[4])
        elif node.op in SIMPLE:
            _, op, triples, out = SIMPLE[node.op]
            floats = []
            for i in triples:
                axis = len(ins[i].shape or [0, 0]) - 1 if node.op == "QLinearMatMul" else 1
                floats.append(self.dequantize(ins[i], ins[i + 1], ins[i + 2], axis))
            y = self.float_op(op, floats, attrs)
            if out is not None:
                self.quantize(y, ins[out[0]], ins[out[1]])
        elif node.op == "QLinearConv":
            x = self.dequantize(ins[0], ins[1], ins[2], 1)
            w = self.dequantize(ins[3], ins[4], ins[5], 0)
            floats = [x, w]
            if len(ins) > 8 and ins[8].name:
                floats.append(self.bias(ins[8], ins[1], ins[4], 1.0))
            self.quantize(self.float_op("Conv", floats, attrs), ins[6], ins[7])
        elif node.op == "QLinearConcat":
            floats = [
                self.dequantize(ins[i], ins[i + 1], ins[i + 2], 1) for i in range(2, len(ins), 3)
            ]
            self.quantize(self.float_op("Concat", floats, attrs), ins[0], ins[1])
        else:  # QGemm: A, a_scale, a_zero, B, b_scale, b_zero, C?, y_scale?, y_zero?
            alpha = float(attrs.get("alpha", 1.0))
            a = self.dequantize(ins[0], ins[1], ins[2], 1)
            b = self.dequantize(ins[3], ins[4], ins[5], 0 if attrs.get("transB") else 1)
            floats = [a, b]
            if len(ins) > 6 and ins[6].name:
                floats.append(self.bias(ins[6], ins[1], ins[4], alpha))
            attrs["beta"] = 1.0
            y = self.float_op("Gemm", floats, attrs)
            if len(ins) > 7 and ins[7].name:
                self.quantize(y, ins[7], ins[8])
            else:  # a float output: the Gemm writes it
                self.new_nodes[-1].outputs = [node.outputs[0]]


@register_pass("qop-to-qdq")
class QopToQdq(Pass[QopToQdqOptions]):
    """QLinearConv, QLinearMatMul and com.microsoft's quantized ops as QDQ."""

    options_type = QopToQdqOptions
    lossless = True
    runs_optimized = True  # exact once onnxruntime fuses the QDQ groups (module docstring)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        found = [n for n in graph.nodes if n.op in HANDLED and _domain(n) == _expected(n.op)]
        contrib = [n for n in graph.nodes if n.op in QUANTIZERS and _domain(n) == MS]
        opset = ctx.opset_of(graph)
        need = max(
            PER_CHANNEL_OPSET if any(_per_channel(n) for n in found) else 0,
            max((_standard_opset(n) for n in contrib), default=0),
        )
        if opset < need:
            failure = upgrade_opset(graph, ctx.export, need)  # before new nodes
            if failure is not None:
                what = (
                    "16-bit or 4-bit quantizers"
                    if need > PER_CHANNEL_OPSET
                    else "per-channel scales"
                )
                result.refuse("<model>", f"opset {opset}: {what} need opset {need} ({failure})")
                return result
            return self.run(graph, ctx)  # the upgraded graph holds new node objects
        for node in contrib:  # the same operator as ONNX's at this opset
            node.domain = None
            result.count(f"{MS} {node.op}")
        converted: list[tuple[gs.Node, list[gs.Node]]] = []
        prefixes = _Prefixes(graph)
        for node in found:
            converter = Converter(node, prefixes.take(node))
            try:
                converter.convert(opset)
            except Refused as refused:
                for new in converter.new_nodes:  # unhook the half-built nodes
                    new.outputs.clear()
                    new.inputs.clear()
                result.refuse(node.name, str(refused))
                continue
            converted.append((node, converter.new_nodes))
        for node, new_nodes in converted:
            replace_node(graph, node, new_nodes)
            result.count(node.op)
        for node in [n for n in graph.nodes if n.op in SELECTING and not _domain(n)]:
            try:
                new_nodes = _selecting(node, prefixes.take(node))
            except Refused as refused:
                result.refuse(node.name, str(refused))
                continue
            if new_nodes:
                replace_node(graph, node, new_nodes)
                result.count(f"{node.op} on bytes")
        for node in [n for n in graph.nodes if n.op in POOLS and not _domain(n)]:
            if _requantize_pool(graph, node, prefixes.take(node)):
                result.count(f"{node.op} requantized")
        if result.changed:
            graph.cleanup(remove_unused_node_outputs=False, remove_unused_graph_inputs=False)
        return result


class _Prefixes:
    """Unique name prefixes for the new nodes: a node's name, or its op numbered where it has
    none (exporters leave ops unnamed; two unnamed QLinearMul gave one tensor two writers)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.used = {n.name for n in graph.nodes if n.name}
        self.counts: dict[str, int] = {}

    def take(self, node: gs.Node) -> str:
        base = node.name or node.op
        if node.name and self.counts.get(base) is None:
            self.counts[base] = 0
            return base
        while True:
            self.counts[base] = self.counts.get(base, 0) + 1
            name = f"{base}_{self.counts[base]}"
            if name not in self.used:
                self.used.add(name)
                return name


def _quantizer(node: gs.Node | None, op: str) -> tuple[gs.Constant, gs.Constant] | None:
    """(scale, zero point) of a per-tensor ``op`` (QuantizeLinear / DequantizeLinear) with
    constant parameters, else None."""
    if node is None or node.op != op or len(node.inputs) < 3:
        return None
    scale, zero = node.inputs[1], node.inputs[2]
    if not (isinstance(scale, gs.Constant) and isinstance(zero, gs.Constant)):
        return None
    if np.size(scale.values) != 1 or not float(np.asarray(scale.values).reshape(-1)[0]) > 0:
        return None
    return scale, zero


def _same(a: tuple[gs.Constant, gs.Constant], b: tuple[gs.Constant, gs.Constant]) -> bool:
    return all(
        np.asarray(x.values).dtype == np.asarray(y.values).dtype
        and np.array_equal(np.asarray(x.values).reshape(-1), np.asarray(y.values).reshape(-1))
        for x, y in zip(a, b, strict=True)
    )


def _requantize_pool(graph: gs.Graph, node: gs.Node, prefix: str) -> bool:
    """A float max pool of a DequantizeLinear's output whose result goes anywhere but to a
    QuantizeLinear with the same parameters (onnxruntime's QOperator googlenet: a pool
    feeding another pool and a requantize) gets that QuantizeLinear / DequantizeLinear pair
    after it. Exact: the max of dequantized bytes is one of them. compile's integer
    lowering then runs each pool on the bytes (int8_unary.pooled_integers)."""
    x, y = node.inputs[0], node.outputs[0]
    params = _quantizer(x.inputs[0] if x.inputs else None, "DequantizeLinear")
    if params is None or y in graph.outputs:
        return False
    readers = list(y.outputs)
    if readers and all(
        (q := _quantizer(r, "QuantizeLinear")) is not None and _same(q, params) for r in readers
    ):
        return False
    bytes_ = gs.Variable(f"{prefix}/requantized", dtype=np.asarray(params[1].values).dtype)
    pooled = gs.Variable(f"{prefix}/pooled", dtype=np.float32)
    node.outputs[0] = pooled  # y is now written by the DequantizeLinear
    quantize = gs.Node("QuantizeLinear", f"{prefix}/q", {}, [pooled, *params], [bytes_])
    dequantize = gs.Node("DequantizeLinear", f"{prefix}/dq", {}, [bytes_, *params], [y])
    position = graph.nodes.index(node) + 1
    graph.nodes[position:position] = [quantize, dequantize]
    return True


def _selecting(node: gs.Node, prefix: str) -> list[gs.Node]:
    """A pool or nearest Resize on a QuantizeLinear's bytes as DQ -> op -> Q at that scale;
    [] where the op reads floats."""
    x = node.inputs[0]
    producer = x.inputs[0] if x.inputs else None
    if producer is None or producer.op != "QuantizeLinear":
        return []
    if node.op == "Resize" and node.attrs.get("mode", "nearest") != "nearest":
        raise Refused("a Resize on quantized bytes that is not nearest")
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        raise Refused("MaxPool's Indices output is used")
    scale, zero = producer.inputs[1], producer.inputs[2] if len(producer.inputs) > 2 else None
    if zero is None or _constant(scale, "scale").size != 1:
        return []  # per-axis or zero-less quantizers: left to onnxruntime's own handling
    converter = Converter(node, prefix)
    floats = [converter.dequantize(x, scale, zero, 1), *node.inputs[1:]]
    y = converter.float_op(node.op, floats, dict(node.attrs))
    converter.quantize(y, scale, zero)
    return converter.new_nodes


def _standard_opset(node: gs.Node) -> int:
    """The opset from which ONNX's own QuantizeLinear / DequantizeLinear compute what this
    com.microsoft one does: 21 for 16-bit and 4-bit types, 13 for a per-axis scale, else 10."""
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    dtype = zero.dtype if isinstance(zero, gs.Tensor) and zero.dtype is not None else np.uint8
    if not _numpy(dtype) or np.dtype(dtype) not in [np.dtype(t) for t in NARROW]:
        return WIDE_TYPES_OPSET
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    shape = getattr(scale, "shape", None) or ()
    return PER_CHANNEL_OPSET if int(np.prod([int(d) for d in shape])) > 1 else 10


def _numpy(dtype: object) -> bool:
    try:
        np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:  # an onnx type graphsurgeon has no numpy dtype for (int4)
        return False
    return True


def _domain(node: gs.Node) -> str:
    return "" if node.domain in (None, "", "ai.onnx") else str(node.domain)


def _expected(op: str) -> str:
    return "" if op in ("QLinearConv", "QLinearMatMul") else MS
