"""upcast-float16: a model that computes in float16 or bfloat16 computes in float32 inside,
its inputs and outputs unchanged: x(f16) -> Cast(float) -> ops in float32 -> Cast(f16) -> y.

Every float16 / bfloat16 weight and constant becomes float32 (exactly), every Cast to them
casts to float32, ops that make a tensor of a dtype attribute (EyeLike, RandomNormal and
the like) make float32, the value types of the graph and its subgraphs follow, a float16
graph input is cast to float32 where it enters and a float16 graph output is cast back
where it leaves. The model then rounds to float16 once, at its outputs, instead of after
every op.

For CPUs, which have no float16 arithmetic that TVM uses: its code for a float16 Conv sums
in float16 (resnet18 exported at float16 on the AVX-512 EPYC: 0.009 max-rel from its float32
model, where onnxruntime, summing in float32, stays at 0.0003), so ``onnxpress compile``
refused such models as differing from onnxruntime. compile's prepare pipeline runs this
pass for CPU targets. The result lies as close to onnxruntime's float16 run as that run
lies to the float32 model, its rounding: the pass manager holds it to the tolerance of a
model computing in float16 (``core.precision.compute_tolerance``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnxpress.core.context import PassContext
from onnxpress.core.ir import adopt
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.precision import LOW_PRECISION
from onnxpress.core.registry import register_pass

# ops whose output dtype is an attribute (Cast's is ``to``)
DTYPE_OPS = (
    "EyeLike",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Bernoulli",
    "SequenceEmpty",
)


@dataclass(frozen=True)
class UpcastFloat16Options:
    """No options: every float16 and bfloat16 tensor inside the model becomes float32."""


@register_pass("upcast-float16")
class UpcastFloat16(Pass[UpcastFloat16Options]):
    """Compute a float16 / bfloat16 model in float32 inside, its interface unchanged."""

    options_type = UpcastFloat16Options
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        model = ctx.export(graph)
        counts = upcast(model)
        for key, value in counts.items():
            result.count(key, value)
        if result.changed:
            adopt(graph, model)
        return result


def upcast(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite ``model`` in place (module docstring); return what changed, by kind."""
    counts = {"inputs": 0, "outputs": 0, "constants": 0, "casts": 0, "dtype_ops": 0}
    graph = model.graph
    taken = _names(graph)
    initializers = {t.name for t in graph.initializer}
    entry: list[onnx.NodeProto] = []
    for info in graph.input:
        dtype = info.type.tensor_type.elem_type
        if dtype not in LOW_PRECISION:
            continue
        if info.name in initializers:  # a weight listed as an input (IR < 4): upcast below
            info.type.tensor_type.elem_type = TensorProto.FLOAT
            continue
        inner = _fresh(f"{info.name}_float32", taken)
        _rename_uses(graph, info.name, inner, outputs_too=False)
        entry.append(helper.make_node("Cast", [info.name], [inner], to=TensorProto.FLOAT))
        counts["inputs"] += 1
    exits: list[onnx.NodeProto] = []
    inputs = {info.name for info in graph.input}
    for info in graph.output:
        dtype = info.type.tensor_type.elem_type
        if dtype not in LOW_PRECISION or info.name in inputs:
            continue
        inner = _fresh(f"{info.name}_float32", taken)
        _rename_uses(graph, info.name, inner, outputs_too=True)
        exits.append(helper.make_node("Cast", [inner], [info.name], to=dtype))
        counts["outputs"] += 1
    for sub in _graphs(graph):
        _upcast_body(sub, counts, interface=sub is not graph)
    nodes = [*entry, *graph.node, *exits]
    del graph.node[:]
    graph.node.extend(nodes)
    return {k: v for k, v in counts.items() if v}


def _upcast_body(graph: onnx.GraphProto, counts: dict[str, int], interface: bool) -> None:
    """Float32 weights, constants, Casts, dtype attributes and value types in ``graph`` (its
    own nodes only; subgraphs are visited by the caller). ``interface``: a subgraph's inputs
    and outputs too (they carry the outer graph's tensors, float32 now)."""
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in LOW_PRECISION:
            graph.initializer[index].CopyFrom(_float32(tensor))
            counts["constants"] += 1
    infos = [*graph.value_info, *((*graph.input, *graph.output) if interface else ())]
    for info in infos:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type in LOW_PRECISION:
            info.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in LOW_PRECISION:
                attr.t.CopyFrom(_float32(attr.t))
                counts["constants"] += 1
            elif attr.type == onnx.AttributeProto.INT and attr.i in LOW_PRECISION:
                if node.op_type in ("Cast",) and attr.name == "to":
                    attr.i = TensorProto.FLOAT
                    counts["casts"] += 1
                elif node.op_type in DTYPE_OPS and attr.name == "dtype":
                    attr.i = TensorProto.FLOAT
                    counts["dtype_ops"] += 1


def _float32(tensor: onnx.TensorProto) -> onnx.TensorProto:
    values = numpy_helper.to_array(tensor).astype(np.float32)
    made = numpy_helper.from_array(values, tensor.name)
    made.doc_string = tensor.doc_string
    return made


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph in it, outermost first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _graphs(sub)


def _names(graph: onnx.GraphProto) -> set[str]:
    taken: set[str] = set()
    for sub in _graphs(graph):
        taken.update(t.name for t in sub.initializer)
        taken.update(i.name for i in (*sub.input, *sub.output, *sub.value_info))
        for node in sub.node:
            taken.update(node.input)
            taken.update(node.output)
    return taken


def _fresh(base: str, taken: set[str]) -> str:
    name, index = base, 1
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def _rename_uses(graph: onnx.GraphProto, old: str, new: str, outputs_too: bool) -> None:
    """Every node input named ``old`` (subgraphs included, where they read it from the outer
    scope) reads ``new``; with ``outputs_too`` its producer writes ``new`` and its value type
    moves with it."""
    for sub in _graphs(graph):
        for node in sub.node:
            for index, name in enumerate(node.input):
                if name == old:
                    node.input[index] = new
            if outputs_too and sub is graph:
                for index, name in enumerate(node.output):
                    if name == old:
                        node.output[index] = new
    if outputs_too:
        for tensor in graph.initializer:  # a constant output
            if tensor.name == old:
                tensor.name = new
        for info in graph.value_info:
            if info.name == old:
                info.name = new
