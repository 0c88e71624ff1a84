"""Checks of a loaded model that onnx's checker does not make, run before anything executes it.

The graph must declare outputs, each once; the default-domain opset must be one this onnx
knows; every declared element type must be a TensorProto data type; and no tensor may be
too large to allocate: static dims of inputs, outputs and value_info, and the outputs of
the shape-producing ops (ConstantOfShape, Expand, Tile, Range, Pad, OneHot, Resize) whose
size inputs are constants are multiplied out without allocating anything.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.core.errors import InvalidModelError

logger = logging.getLogger(__name__)

MAX_ELEMENTS = 1 << 32  # one tensor with more elements than this is refused
_SMALL = 1 << 16  # constants larger than this are not read as sizes
_KNOWN_TYPES = set(onnx.TensorProto.DataType.values())


def check_model(model: onnx.ModelProto, source: str) -> None:
    """Raise InvalidModelError (one line, naming the file and the node or value) if the
    model has no outputs, a repeated output, an unknown opset or dtype, or a huge tensor."""
    graph = model.graph
    if not graph.output:
        raise InvalidModelError(f"{source}: the graph declares no outputs")
    seen: set[str] = set()
    for info in graph.output:
        if info.name in seen:
            raise InvalidModelError(f"{source}: output '{info.name}' is listed twice")
        seen.add(info.name)
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise InvalidModelError(
                f"{source}: opset {opset.version} of the ONNX domain is not one this onnx "
                f"knows (1 to {newest})"
            )
    for info, kind in _value_infos(graph):
        _check_value_info(info, kind, source)
    for tensor in graph.initializer:
        if tensor.data_type not in _KNOWN_TYPES or tensor.data_type == 0:
            raise InvalidModelError(
                f"{source}: initializer '{tensor.name}' has unknown element type {tensor.data_type}"
            )
    _check_generated_sizes(graph, source)


def _value_infos(graph: onnx.GraphProto) -> Iterator[tuple[onnx.ValueInfoProto, str]]:
    for info in graph.input:
        yield info, "input"
    for info in graph.output:
        yield info, "output"
    for info in graph.value_info:
        yield info, "value"


def _check_value_info(info: onnx.ValueInfoProto, kind: str, source: str) -> None:
    if info.type.WhichOneof("value") != "tensor_type":
        return
    tensor_type = info.type.tensor_type
    if tensor_type.elem_type not in _KNOWN_TYPES or (kind == "input" and not tensor_type.elem_type):
        raise InvalidModelError(
            f"{source}: {kind} '{info.name}' has unknown element type {tensor_type.elem_type}"
        )
    dims = [d.dim_value for d in tensor_type.shape.dim if d.HasField("dim_value")]
    if kind != "value" and any(d < 0 for d in dims):
        raise InvalidModelError(f"{source}: {kind} '{info.name}' has a negative dimension {dims}")
    if dims and math.prod(dims) > MAX_ELEMENTS:
        raise InvalidModelError(
            f"{source}: {kind} '{info.name}' has static shape {dims} "
            f"({math.prod(dims):,} elements; limit {MAX_ELEMENTS:,})"
        )


def _static_dims(graph: onnx.GraphProto) -> dict[str, list[int]]:
    dims: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        shape = info.type.tensor_type.shape
        if info.type.HasField("tensor_type") and shape.dim:
            if all(d.HasField("dim_value") for d in shape.dim):
                dims.setdefault(info.name, [d.dim_value for d in shape.dim])
    return dims


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if math.prod(tensor.dims) <= _SMALL and not tensor.external_data:
            values[tensor.name] = numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.output:
            attribute = node.attribute[0]
            if attribute.name == "value" and math.prod(attribute.t.dims) <= _SMALL:
                values[node.output[0]] = numpy_helper.to_array(attribute.t)
            elif attribute.name in ("value_ints", "value_int"):
                values[node.output[0]] = np.array(onnx.helper.get_attribute_value(attribute))
    return values


def _predicted_elements(
    node: onnx.NodeProto, values: dict[str, np.ndarray], dims: dict[str, list[int]]
) -> int | None:
    """Elements of the node's (first) output from its constant size inputs; None: unknown."""

    def value(index: int) -> np.ndarray | None:
        name = node.input[index] if len(node.input) > index else ""
        array = values.get(name) if name else None
        return None if array is None else np.asarray(array, dtype=np.float64).reshape(-1)

    data = dims.get(node.input[0]) if node.input else None
    data_elements = math.prod(data) if data is not None else 1
    op = node.op_type
    if op == "ConstantOfShape" and (shape := value(0)) is not None:
        return int(np.prod(np.maximum(shape, 0)))
    if op == "Expand" and (shape := value(1)) is not None:
        return max(int(np.prod(np.maximum(shape, 1))), data_elements)
    if op == "Tile" and (repeats := value(1)) is not None:
        return data_elements * int(np.prod(np.maximum(repeats, 0)))
    if op == "Range":
        start, limit, delta = value(0), value(1), value(2)
        if start is not None and limit is not None and delta is not None and delta[0] != 0:
            return max(0, math.ceil((limit[0] - start[0]) / delta[0]))
    if op == "Pad" and (pads := value(1)) is not None and data is not None and len(pads) == 2 * len(data):  # fmt: skip
        half = len(data)
        return math.prod(max(0, int(d + pads[i] + pads[i + half])) for i, d in enumerate(data))
    if op == "OneHot" and (depth := value(1)) is not None and depth.size:
        return data_elements * max(0, int(depth[0]))
    if op == "Resize":
        sizes = value(3)
        if sizes is not None and sizes.size:
            return int(np.prod(np.maximum(sizes, 0)))
        scales = value(2)
        if scales is not None and data is not None and scales.size == len(data):
            return int(np.prod(np.floor(np.array(data) * scales)))
    return None


def _check_generated_sizes(graph: onnx.GraphProto, source: str) -> None:
    values, dims = _constants(graph), _static_dims(graph)
    for index, node in enumerate(graph.node):
        try:
            elements = _predicted_elements(node, values, dims)
        except (ValueError, OverflowError, TypeError):
            elements = None
        if elements is not None and elements > MAX_ELEMENTS:
            name = node.name or f"#{index}"
            raise InvalidModelError(
                f"{source}: node '{name}' ({node.op_type}) would produce {elements:,} elements "
                f"(limit {MAX_ELEMENTS:,})"
            )
