"""Shape values fold-constants can compute from inferred shapes, even partly symbolic ones.

  Shape(x) / Size(x)                  -> constant, when every dim (in start:end) is static;
  Gather(Shape(x), k), k constant     -> constant, when the dims k select are static;
  Slice(Shape(x), s, e, [0], [1])     -> constant, when the dims s:e select are static.

The last two are how exporters read one dim of a tensor whose batch is symbolic: torch's
``chunk(3, 1)`` on a [batch, 3H] tensor exports as Slice bounds computed from
Gather(Shape(gemm), 1). Folding them leaves the Shape without readers, for ``cleanup``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.core.context import TensorShapes

Dims = list[int | None]


def reads_variable_shape(node: gs.Node) -> bool:
    return node.op in ("Shape", "Size") and isinstance(node.inputs[0], gs.Variable)


def _dims(tensor: gs.Tensor, shapes: TensorShapes) -> Dims | None:
    dims = shapes.get(tensor.name)
    if dims is None and tensor.shape is not None:
        dims = [d if isinstance(d, int) and d >= 0 else None for d in tensor.shape]
    return dims


def _shape_dims(node: gs.Node, shapes: TensorShapes) -> Dims | None:
    """The dims a Shape node returns (its start:end slice), unknown ones as None."""
    dims = _dims(node.inputs[0], shapes)
    if dims is None:
        return None
    rank = len(dims)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
    return dims[slice(start, end)]


def _static(dims: Dims) -> list[int] | None:
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        return None
    return [int(d) for d in dims if d is not None]


def full_shape_value(node: gs.Node, shapes: TensorShapes) -> np.ndarray | None:
    """Shape/Size of a variable whose (sliced, for Shape) dims are all known, else None."""
    dims = _shape_dims(node, shapes) if node.op == "Shape" else _dims(node.inputs[0], shapes)
    static = None if dims is None else _static(dims)
    if static is None:
        return None
    return np.array(math.prod(static) if node.op == "Size" else static, dtype=np.int64)


def _literal(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        value = np.asarray(tensor.values)
        return value if value.dtype.kind in "iu" else None
    return None


def partial_shape_value(node: gs.Node, shapes: TensorShapes) -> np.ndarray | None:
    """Gather/Slice of a Shape output that picks only static dims, else None."""
    if node.op not in ("Gather", "Slice") or not node.inputs:
        return None
    source = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    if source is None or source.op != "Shape" or not reads_variable_shape(source):
        return None
    dims = _shape_dims(source, shapes)
    if dims is None:
        return None
    if node.op == "Gather":
        indices = _literal(node.inputs[1]) if len(node.inputs) > 1 else None
        if indices is None or node.attrs.get("axis", 0) not in (0, -1):
            return None
        if np.any(indices < -len(dims)) or np.any(indices >= len(dims)):
            return None
        picked = np.asarray(dims, dtype=object)[indices]
        flat = [picked] if indices.ndim == 0 else list(picked.ravel())
        if _static(flat) is None:
            return None
        return np.asarray(picked, dtype=np.int64).reshape(indices.shape)
    defaults = [None, None, np.array([0]), np.array([1])]  # starts, ends, axes, steps
    given = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
    bounds = [
        d if t is None or not t.name else _literal(t) for t, d in zip(given, defaults, strict=True)
    ]
    starts, ends, axes, steps = bounds
    if starts is None or ends is None or axes is None or steps is None or starts.size != 1:
        return None
    if list(axes.ravel()) not in ([0], [-1]):
        return None
    step = int(steps.ravel()[0])
    if step == 0:
        return None
    picked_dims = dims[slice(int(starts.ravel()[0]), int(ends.ravel()[0]), step)]
    static = _static(picked_dims)
    return None if static is None else np.array(static, dtype=np.int64)
