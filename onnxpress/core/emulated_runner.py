"""``EmulatedRunner``: a QDQ model run with its integer layers computed as a target computes.

The integer layers (``int8_layers``) are cut out of the graph and computed by
``int8_emulation.layer_output`` from their 8-bit operands. A layer's level is one more than
the deepest integer layer upstream of it; every other node's level is the deepest integer
layer upstream of it. The float nodes of one level form a segment, a model of its own that
onnxruntime (optimizations off) runs once: segment L reads the graph inputs, the outputs of
the layers of levels <= L and the tensors of earlier segments, and returns what later
segments, layers and the graph's outputs read. So each node runs once per call, however
deep the model (a whole-graph run per level made a 50-layer chain 50 times slower).
Segments are built on the first call, with the dtypes of the values they receive.

``exact_int8_runner``: onnxruntime itself on exact int8 kernels, where this CPU's default
ones sum u8 x s8 pairs in int16 with saturation (x86 without VNNI): what VNNI, ARM and
compiled TVM code compute for its integer-kernel ops (``INTEGER_KERNEL_OPS``), which run on
those kernels whatever the optimization level, unlike QDQ groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxpress.core.int8_emulation import Batch, layer_output
from onnxpress.core.int8_layers import IntegerLayer, integer_layers
from onnxpress.core.partition import PartitionedRunner
from onnxpress.core.targets import EXACT, Arithmetic
from onnxpress.core.task_metric import as_array
from onnxpress.core.verify import Runner, max_rel_error, session_threads, verification_runner

logger = logging.getLogger(__name__)

INTEGER_KERNEL_OPS = frozenset(
    (
        *("MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm"),
        *("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "DynamicQuantizeLSTM", "QAttention"),
    )
)


def exact_int8_runner(model: onnx.ModelProto) -> Runner | PartitionedRunner:
    """The model as users run it, on onnxruntime's exact u8 x u8 kernels where this CPU's
    default u8 x s8 ones saturate (``session.x64quantprecision``: applied by a graph rewrite,
    so only with the optimizations on). That rewrite fails on an 8-bit initializer two
    integer ops share (a zero point deduplicated by cleanup), so each gets its own copy. A
    model that still cannot load that way (u8 weights leave QGemm with no kernel) runs on the
    default kernels."""
    try:
        return verification_runner(_unshared_bytes(model), True, exact_int8=True)
    except Exception as exc:
        logger.info("exact int8 kernels refused (%s): default kernels", str(exc).split("\n")[0])
        return verification_runner(model, True)


def exact_spread(
    model: onnx.ModelProto, feeds: list[Batch], outputs: list[list[np.ndarray]]
) -> float:
    """The largest max-rel distance, over feeds and float outputs, between ``outputs``
    (onnxruntime's run of a model) and the exact integer result of the QDQ ``model``
    (``EmulatedRunner``, exact int32 sums); 0 where it has no integer layers or the emulation
    cannot run it. A format conversion (qop-to-qdq) that its tolerance alone refuses is held
    within this beyond it (computed only then): two integer implementations of one model
    round requantization ties apart (onnxruntime's QOperator and QDQ runs of a per-tensor
    int8 resnet18 stem differ by one level in 3 of 802,816 values, and the exact result is a
    level from both)."""
    try:
        runner = EmulatedRunner(model, EXACT)
        if not runner.layers:
            return 0.0
        exact = [runner(feed) for feed in feeds]
    except Exception as exc:  # an emulation gap keeps the strict tolerance
        logger.info("no exact integer result for the spread (%s)", str(exc).split("\n")[0])
        return 0.0
    distances = [
        max_rel_error(want, got)
        for ran, wanted in zip(outputs, exact, strict=True)
        for got, want in zip(ran, wanted, strict=False)
        if got.shape == want.shape and got.size and np.issubdtype(got.dtype, np.floating)
    ]
    return max(distances, default=0.0)


def _unshared_bytes(model: onnx.ModelProto) -> onnx.ModelProto:
    eight_bit = {
        t.name
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    }
    seen: dict[str, int] = {}
    copies: list[tuple[int, int, str]] = []  # node index, input index, shared initializer
    for index, node in enumerate(model.graph.node):
        for slot, name in enumerate(node.input):
            if name in eight_bit and node.op_type in INTEGER_KERNEL_OPS:
                seen[name] = seen.get(name, 0) + 1
                if seen[name] > 1:
                    copies.append((index, slot, name))
    if not copies:
        return model
    result = onnx.ModelProto()
    result.CopyFrom(model)
    inits = {t.name: t for t in model.graph.initializer}
    for k, (index, slot, name) in enumerate(copies):
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = f"{name}_onnxpress_exact_{k}"
        result.graph.initializer.append(copy)
        result.graph.node[index].input[slot] = copy.name
    return result


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = session_threads()
    # numpy computes the layers between runs: idle pool threads must not spin over it
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _reads(node: onnx.NodeProto) -> list[str]:
    """The outer-scope tensors ``node`` reads: its inputs and those its subgraphs capture."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        graphs = [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs
        for graph in graphs:
            inner = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            for inner_node in graph.node:
                names.extend(name for name in _reads(inner_node) if name not in inner)
                inner.update(inner_node.output)
    return names


@dataclass
class _Segment:
    level: int
    nodes: list[onnx.NodeProto]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    session: ort.InferenceSession | None = None


class EmulatedRunner:
    """Runs ``model`` with its integer layers computed in ``arithmetic``."""

    def __init__(self, model: onnx.ModelProto, arithmetic: Arithmetic) -> None:
        self.arithmetic = arithmetic
        self.layers = integer_layers(model)
        self.output_names = [o.name for o in model.graph.output]
        self._model = model
        inputs = {i.name for i in model.graph.input}
        # an initializer that is also a graph input is a default the feed may override
        self._constants = {t.name: t for t in model.graph.initializer if t.name not in inputs}
        self._defaults = {
            t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in inputs
        }
        cut = {layer.node.output[0]: layer for layer in self.layers}
        self.levels, self._segments = _plan(model, cut, self._constants)
        self._by_level: dict[int, list[IntegerLayer]] = {}
        for layer in self.layers:
            self._by_level.setdefault(self.levels[layer.node.output[0]], []).append(layer)

    def _build(self, segment: _Segment, values: dict[str, np.ndarray]) -> ort.InferenceSession:
        graph = helper.make_graph(
            segment.nodes,
            f"level{segment.level}",
            [
                helper.make_tensor_value_info(
                    name, helper.np_dtype_to_tensor_dtype(np.asarray(values[name]).dtype), None
                )
                for name in segment.inputs
            ],
            [helper.ValueInfoProto(name=name) for name in segment.outputs],
            [self._constants[name] for name in _used_constants(segment.nodes, self._constants)],
        )
        model = helper.make_model(
            graph, opset_imports=list(self._model.opset_import), ir_version=self._model.ir_version
        )
        model.functions.extend(self._model.functions)
        return _session(model)

    def __call__(self, feed: Batch) -> list[np.ndarray]:
        values: dict[str, np.ndarray] = {**self._defaults, **feed}
        for segment in self._segments:
            for layer in self._by_level.get(segment.level, []):
                values[layer.node.output[0]] = layer_output(
                    layer,
                    values[layer.activation.tensor],
                    None if layer.weight.value is not None else values[layer.weight.tensor],
                    self.arithmetic,
                )
            if not segment.outputs:
                continue
            if segment.session is None:
                segment.session = self._build(segment, values)
            run = segment.session.run(None, {name: values[name] for name in segment.inputs})
            values.update(zip(segment.outputs, run, strict=True))
        for name in self.output_names:
            if name not in values and name in self._constants:
                values[name] = numpy_helper.to_array(self._constants[name])
        return [as_array(values[name]) for name in self.output_names]


def _used_constants(
    nodes: list[onnx.NodeProto], constants: dict[str, onnx.TensorProto]
) -> list[str]:
    return sorted({name for node in nodes for name in _reads(node) if name in constants})


def _plan(
    model: onnx.ModelProto, cut: dict[str, IntegerLayer], constants: dict[str, onnx.TensorProto]
) -> tuple[dict[str, int], list[_Segment]]:
    """Each layer's level, and the float nodes grouped by level with what each group reads
    from outside itself and returns. The layers of level L run just before segment L."""
    depth: dict[str, int] = {}
    levels: dict[str, int] = {}
    by_level: dict[int, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        level = max((depth.get(name, 0) for name in _reads(node)), default=0)
        if node.output and node.output[0] in cut:
            level += 1
            levels[node.output[0]] = level
        else:
            by_level.setdefault(level, []).append(node)
        for name in node.output:
            depth[name] = level
    top = max([*by_level, *levels.values()], default=0)
    segments = [_Segment(level, by_level.get(level, [])) for level in range(top + 1)]
    wanted = {o.name for o in model.graph.output}
    for layer in cut.values():
        wanted.add(layer.activation.tensor)
        if layer.weight.value is None:
            wanted.add(layer.weight.tensor)
    readers: dict[str, set[int]] = {}
    for segment in segments:
        for node in segment.nodes:
            for name in _reads(node):
                readers.setdefault(name, set()).add(segment.level)
    for segment in segments:
        made = {name for node in segment.nodes for name in node.output if name}
        outside = {name for node in segment.nodes for name in _reads(node)} - made
        segment.inputs = sorted(outside - set(constants))
        segment.outputs = sorted(
            name
            for name in made
            if name in wanted or readers.get(name, {segment.level}) - {segment.level}
        )
    return levels, segments
