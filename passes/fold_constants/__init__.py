"""Constant folding: a node whose inputs are all constants becomes the constants it computes.

Op(c1, c2, ...) -> initializer(s) holding its outputs, in topological order so chains fold;
Shape(x) / Size(x) -> initializer when x's shape is static (ONNX shape inference), which
unblocks Shape->Gather->Unsqueeze->Concat->Reshape chains (cheap ops run in numpy:
``numpy_ops.py``); Gather/Slice(Shape(x)) ->
initializer when the dims they pick are static though others (a batch) are symbolic
(``shape_dims.py``); Constant nodes -> initializers.
A folded graph output keeps its name, as an initializer (valid ONNX for IR >= 4).

Before evaluating a node the pass predicts the size of its outputs without allocating them:
from the values of the size inputs of ConstantOfShape, Expand, Tile and Range, from input
shapes for the cheap ops evaluated in numpy, and otherwise from shape inference of the node
alone. It refuses folds over ``max-bytes`` or that grow the model by more than
``max-growth-bytes``; random ops, ops with subgraphs, ops outside the default domain and
DequantizeLinear of a constant (the QDQ form of a quantized weight). Other nodes run on
``onnx.reference``. Producers left dead (e.g. of a folded Shape's input) are for ``cleanup``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnxpress.passes.fold_constants import numpy_ops
from onnxpress.passes.fold_constants.shape_dims import (
    full_shape_value,
    partial_shape_value,
    reads_variable_shape,
)

from onnxpress.core.context import PassContext, TensorShapes
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

logger = logging.getLogger(__name__)

MIB = 1 << 20
# Rounds of shape inference, each only while folding made a shape argument constant: a chain
# of shape computations that each read the shape the one before made static (shufflenet_v2's
# channel shuffles with a dynamic batch) makes one more link static a round.
_MAX_ROUNDS = 32
_SMALL_INT_INPUT = 1024  # integer inputs up to this size reach shape inference as values
_DEFAULT_DOMAINS = (None, "", "ai.onnx")  # graphsurgeon reads the default as None
_RANDOM = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}  # fmt: skip
# Ops whose output shape depends on the values of an input: a new constant there is the
# only way a fold can make more shapes static and another round of inference worthwhile.
_SHAPE_ARGS = {"Reshape", "Expand", "ConstantOfShape", "Tile", "Slice", "Pad", "Resize", "Upsample", "Squeeze", "Unsqueeze", "Split", "Range", "OneHot", "TopK", "CenterCropPad"}  # fmt: skip
_NOT_TENSORS = {"Optional", "OptionalGetElement", "OptionalHasElement", "SplitToSequence"}
_CONSTANT_ATTRS: dict[str, type] = {"value_float": np.float32, "value_floats": np.float32}
_CONSTANT_ATTRS |= {"value_int": np.int64, "value_ints": np.int64}
# (elem_type, static shape or None) of each named output of a node, from shape inference.
OutputTypes = list[tuple[int, "tuple[int, ...] | None"]]


@dataclass(frozen=True)
class FoldConstantsOptions:
    max_bytes: int = 64 * MIB  # largest output (all outputs of one node) a fold may create
    max_growth_bytes: int = 1 * MIB  # most one fold may add: output bytes minus input bytes
    fold_shapes: bool = True  # fold Shape/Size of tensors whose shape is static

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_growth_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                option = name.replace("_", "-")
                raise ValueError(f"{option} must be an integer >= 0, not {value!r}")


@register_pass("fold-constants")
class FoldConstants(Pass[FoldConstantsOptions]):
    """Evaluate nodes with constant inputs and static Shape/Size into initializers."""

    options_type = FoldConstantsOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        folder = _Folder(graph, ctx, self.options, result)
        for round_index in range(_MAX_ROUNDS):
            if round_index:
                # Folding may have made more shapes static; infer again only if it can help.
                if not (folder.progress and folder.dynamic_shape_nodes and folder.new_shape_args):
                    break
                ctx.invalidate()
            folder.fold_round(folder.static_shapes())
        logger.debug("fold-constants: %s, %d refused", result.counts, len(result.refusals))
        return result


class _Folder:
    """State of one run: nodes refused, and node removals to commit at the end of a round."""

    def __init__(
        self, graph: gs.Graph, ctx: PassContext, options: FoldConstantsOptions, result: PassResult
    ) -> None:
        self.graph, self.ctx, self.options, self.result = graph, ctx, options, result
        self.opset = ctx.opset_of(graph) or 1
        self.opsets = [
            helper.make_opsetid(o.domain, self.opset if o.domain in ("", "ai.onnx") else o.version)
            for o in ctx.template.opset_import
        ]
        self.refused: set[int] = set()
        self.removed: set[int] = set()
        self.touched: dict[int, gs.Tensor] = {}
        self.progress = False  # whether the last round folded anything
        self.dynamic_shape_nodes = 0  # Shape/Size nodes kept because their input is dynamic
        self.new_shape_args = False  # a fold fed a value-dependent-shape op (see _SHAPE_ARGS)

    def static_shapes(self) -> TensorShapes | None:
        """Inferred shapes, computed only when some Shape/Size still reads a variable."""
        if self.options.fold_shapes and any(reads_variable_shape(n) for n in self.graph.nodes):
            return self.ctx.analysis(TensorShapes, self.graph)
        return None

    def fold_round(self, shapes: TensorShapes | None) -> None:
        self.dynamic_shape_nodes, self.new_shape_args = 0, False
        if not _is_sorted(self.graph.nodes):
            self.graph.toposort(recurse_subgraphs=False, recurse_functions=False)
        for node in self.graph.nodes:
            if id(node) in self.refused:
                continue
            if node.domain not in _DEFAULT_DOMAINS:
                if _all_constant(node):
                    self.refuse(node, f"op {node.domain}.{node.op} is outside the ONNX domain")
            elif node.op == "Constant":
                self.fold_constant_node(node)
            elif reads_variable_shape(node):  # Shape/Size: folded when all its dims are static
                if shapes is not None and (value := full_shape_value(node, shapes)) is not None:
                    self.replace(node, [value])
                    self.result.count("shapes_folded")
                elif shapes is not None:
                    self.dynamic_shape_nodes += 1
            elif shapes is not None and (value := partial_shape_value(node, shapes)) is not None:
                self.replace(node, [value])  # Gather/Slice of static dims of a dynamic shape
                self.result.count("shape_dims_folded")
            elif _all_constant(node):
                outcome = self.evaluate(node)
                if isinstance(outcome, str):
                    self.refuse(node, outcome)
                else:
                    self.replace(node, outcome)
                    self.result.count("folded")
        self.progress = bool(self.removed)
        self.commit()

    def refuse(self, node: gs.Node, reason: str) -> None:
        self.refused.add(id(node))
        self.result.refuse(node.name or f"<{node.op}>", reason)

    def fold_constant_node(self, node: gs.Node) -> None:
        value = _constant_attr_value(node.attrs)
        if value is None:
            self.refuse(node, "a Constant with a sparse, string or non-numpy value is kept")
            return
        self.replace(node, [value])
        self.result.count("constant_nodes")

    def evaluate(self, node: gs.Node) -> list[np.ndarray] | str:
        """The node's output values, or why it is not folded; sizes are checked first."""
        reason = _unfoldable_reason(node)
        inputs = [] if reason else [None if _is_empty(t) else _array(t) for t in node.inputs]
        if reason or sum(a is None for a in inputs) > sum(map(_is_empty, node.inputs)):
            return reason or "an input's dtype has no exact numpy form (e.g. bfloat16, float8)"
        arrays = [a for a in inputs if a is not None]
        model, feeds, expected = None, dict[str, np.ndarray](), None
        try:
            fast = numpy_ops.applicable(node, arrays)
            elements = _predicted_elements(node, inputs, fast)
            if not fast:
                model, feeds = _one_node_model(node, inputs, self.opsets)
                expected = _infer_outputs(model)
                if elements is None and all(shape is not None for _, shape in expected):
                    elements = sum(math.prod(shape or ()) for _, shape in expected)
        except Exception as exc:  # an invalid node: the verifier names the problem
            return f"cannot predict the output size: {_first_line(exc)}"
        if elements is None:
            return "cannot predict the output size (no static output shape, e.g. NonZero)"
        itemsize, opts = _itemsize(node, arrays, expected), self.options
        out_bytes = elements * itemsize
        growth = out_bytes - sum({id(a): a.nbytes for a in arrays}.values())
        if out_bytes > opts.max_bytes:
            size = f"{_mib(out_bytes)} ({elements} elements of {itemsize} bytes)"
            return f"output would be {size} > max-bytes {_mib(opts.max_bytes)}"
        if growth > opts.max_growth_bytes:
            limit = _mib(opts.max_growth_bytes)
            return f"folding would grow the model by {_mib(growth)} > max-growth-bytes {limit}"
        try:
            with np.errstate(all="ignore"):
                if model is None:
                    values = numpy_ops.evaluate(node, inputs, self.opset)
                else:
                    values = [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]
            return _check_values(values, expected, self.options.max_bytes) or values
        except Exception as exc:
            return f"evaluation failed: {_first_line(exc)}"

    def replace(self, node: gs.Node, values: list[np.ndarray]) -> None:
        """Turn the node's outputs into constants and mark the node removed. Edges are cut
        on the node's side only; ``commit`` filters its inputs' consumer lists once per round,
        which keeps the pass linear when one constant feeds thousands of folded nodes."""
        named = [t for t in node.outputs if not _is_empty(t)]
        for tensor in node.outputs:
            list.clear(tensor.inputs)
        for tensor, value in zip(named, values, strict=True):
            tensor.to_constant(np.asarray(value))
            self.new_shape_args |= any(
                c.op in _SHAPE_ARGS or c.op.startswith("Reduce") for c in tensor.outputs
            )
        list.clear(node.outputs)
        for tensor in node.inputs:
            self.touched[id(tensor)] = tensor
        list.clear(node.inputs)
        self.removed.add(id(node))

    def commit(self) -> None:
        for tensor in self.touched.values():
            keep = [n for n in tensor.outputs if id(n) not in self.removed]
            if len(keep) != len(tensor.outputs):
                list.clear(tensor.outputs)
                list.extend(tensor.outputs, keep)
        if self.removed:
            self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self.removed]
        self.touched.clear()
        self.removed.clear()


def _is_sorted(nodes: list[gs.Node]) -> bool:
    """Whether every node follows its producers (graphsurgeon's toposort is slow)."""
    seen: set[int] = set()
    for node in nodes:
        if any(id(p) not in seen for t in node.inputs for p in t.inputs):
            return False
        seen.add(id(node))
    return True


def _is_empty(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Variable) and not tensor.name


def _all_constant(node: gs.Node) -> bool:
    return all(isinstance(t, gs.Constant) or _is_empty(t) for t in node.inputs)


def _array(tensor: gs.Constant) -> np.ndarray | None:
    """The tensor's values if numpy holds them in their ONNX dtype, else None."""
    value = np.asarray(tensor.values)
    export = tensor.export_dtype  # differs when exported as another type than numpy holds
    if value.dtype.kind not in "biuf" or not isinstance(export, np.dtype) or export != value.dtype:
        return None  # ml_dtypes' bfloat16 and float8 have kind "V"
    return value


def _constant_attr_value(attrs: dict[str, Any]) -> np.ndarray | None:
    if isinstance(attrs.get("value"), gs.Constant):
        value = _array(attrs["value"])
        return None if value is None else value.copy()
    for key, dtype in _CONSTANT_ATTRS.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None


def _unfoldable_reason(node: gs.Node) -> str | None:
    if node.op in _RANDOM:
        return f"{node.op} is non-deterministic"
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):  # If, Loop, Scan
        return f"{node.op} has a subgraph"
    if node.op.startswith("Sequence") or node.op in _NOT_TENSORS:
        return f"{node.op} produces a sequence or optional, not a tensor"
    if node.op == "DequantizeLinear":
        return "DequantizeLinear of a constant is the QDQ form of a quantized weight; kept"
    return None if node.outputs else "the node has no outputs"


def _predicted_elements(node: gs.Node, inputs: list[Any], fast: bool) -> int | None:
    """Exact output element count from input shapes and size inputs, without allocating."""
    op = node.op
    if op == "ConstantOfShape":
        return math.prod(int(d) for d in inputs[0].reshape(-1)) if inputs else 1
    if op == "Expand":
        target = tuple(int(d) for d in inputs[1].reshape(-1))
        return math.prod(np.broadcast_shapes(inputs[0].shape, target))
    if op == "Tile":
        repeats = [int(r) for r in inputs[1].reshape(-1)]
        return math.prod(d * r for d, r in zip(inputs[0].shape, repeats, strict=True))
    if op == "Range":
        start, limit, delta = (inputs[k].item() for k in range(3))
        return max(math.ceil((limit - start) / delta), 0)
    if not fast:
        return None
    return numpy_ops.fast_elements(node, inputs)


def _one_node_model(
    node: gs.Node, inputs: list[Any], opsets: list[onnx.OperatorSetIdProto]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The node alone and its feeds; small integer inputs are initializers, so that shape
    inference sees their values (e.g. the shape input of ConstantOfShape)."""
    graph_inputs, feeds, initializers = [], {}, {}
    for array, tensor in zip(inputs, node.inputs, strict=True):
        if array is None or tensor.name in feeds or tensor.name in initializers:
            continue
        if array.dtype.kind in "iu" and array.size <= _SMALL_INT_INPUT:
            initializers[tensor.name] = numpy_helper.from_array(array, tensor.name)
        else:
            feeds[tensor.name] = array
            elem = helper.np_dtype_to_tensor_dtype(array.dtype)
            graph_inputs.append(helper.make_tensor_value_info(tensor.name, elem, array.shape))
    outputs = [helper.make_empty_tensor_value_info(t.name) for t in node.outputs if t.name]
    exported = OnnxExporter.export_node(node)
    graph = helper.make_graph(
        [exported], "fold", graph_inputs, outputs, list(initializers.values())
    )
    return helper.make_model(graph, opset_imports=opsets), feeds


def _infer_outputs(model: onnx.ModelProto) -> OutputTypes:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    out: OutputTypes = []
    for vi in inferred.graph.output:
        tensor_type = vi.type.tensor_type
        dims = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        static = dims is not None and all(d.HasField("dim_value") for d in dims)
        shape = tuple(d.dim_value for d in dims or ()) if static else None
        out.append((tensor_type.elem_type, shape))
    return out


def _itemsize(node: gs.Node, arrays: list[np.ndarray], expected: OutputTypes | None) -> int:
    """Bytes per output element: as inferred, or what the op makes of its inputs."""
    if expected:
        return max(_np_dtype(elem or onnx.TensorProto.DOUBLE).itemsize for elem, _ in expected)
    if node.op == "Cast":
        return _np_dtype(node.attrs["to"]).itemsize
    if node.op == "ConstantOfShape" and isinstance(node.attrs.get("value"), gs.Constant):
        return int(node.attrs["value"].dtype.itemsize)
    return int(arrays[0].dtype.itemsize) if arrays else 8


def _check_values(
    values: list[np.ndarray], expected: OutputTypes | None, max_bytes: int
) -> str | None:
    """Why the evaluated outputs cannot be trusted as folded constants, or None."""
    if expected is not None and len(values) != len(expected):
        return f"the evaluator gave {len(values)} outputs for {len(expected)}"
    for k, value in enumerate(values):
        if value.dtype.kind not in "biuf" or value.nbytes > max_bytes:
            return f"output {k} ({value.dtype}, {_mib(value.nbytes)}) is not folded"
        elem, shape = expected[k] if expected is not None else (0, None)
        if (elem and _np_dtype(elem) != value.dtype) or shape not in (None, value.shape):
            return f"output {k}: evaluated {value.dtype}{list(value.shape)}, inferred {shape}"
    return None


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:,.1f} MiB"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]
