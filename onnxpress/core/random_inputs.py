"""Random verification inputs that the model accepts.

Float inputs are seeded standard normal values, booleans 0/1. An integer input is sampled in
the range its consumers accept, found by reading them (through Cast, Identity, Unsqueeze,
Squeeze, Flatten and Reshape's data input): Gather/GatherElements/ScatterElements indices in
[0, N) of the axis they index (an embedding table [N, d] gives [0, N)), GatherND/ScatterND
index columns per indexed axis, OneHot indices below its depth, Expand shapes of ones,
Reshape shapes [-1, 1, ...], positive Tile repeats, ConstantOfShape sizes and Range steps,
CumSum/Slice/Reduce/Unsqueeze axes within the rank, nonzero Div/Mod divisors. Other integer
inputs get [0, 4). Several consumers intersect their ranges.

String, sequence and other non-numeric inputs are never made up: ``NeedsRealDataError``
names the input and says how to give real data (``--calibration``), as it does for an
input whose consumers ask for an empty range or whose shape is too large to allocate.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.core.errors import OnnxpressError

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
RANDOM_BATCH_SIZES = (1, 3)
SYMBOLIC_DIM = 8
DEFAULT_INT_HIGH = 4
MAX_RANDOM_BYTES = 1 << 30  # one random input larger than this is refused, not allocated
HOW_TO_GIVE_DATA = "give real inputs with --calibration FILE.npz (keyed by input name)"
_PASS_THROUGH = {"Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten", "Reshape"}
_REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}  # fmt: skip


class NeedsRealDataError(OnnxpressError):
    """No valid random value can be made for an input: the user must give real data."""


@dataclass
class IntRange:
    """Values in [low, high) (per last-axis column when ``columns``); ``pattern`` overrides:
    "ones" (all 1), "reshape" ([-1, 1, ...]), "distinct" (distinct values, sorted) or
    "values" (exactly ``values``). Float inputs with a rule are uniform in [low, high)."""

    low: int = 0
    high: int = DEFAULT_INT_HIGH
    columns: tuple[int, ...] | None = None
    pattern: str = "sample"
    why: str = ""
    values: tuple[int, ...] = ()

    def meet(self, other: IntRange) -> IntRange:
        if self.pattern != "sample" or other.pattern != "sample":
            return other if other.pattern != "sample" else self
        columns = other.columns or self.columns
        why = ", ".join(w for w in (self.why, other.why) if w)
        return IntRange(max(self.low, other.low), min(self.high, other.high), columns, why=why)


class _Shapes:
    """Static dims of the model's tensors at given input shapes; inferred only when asked."""

    def __init__(self, model: onnx.ModelProto, input_dims: dict[str, list[int]]) -> None:
        self.model, self.dims = model, {k: list(v) for k, v in input_dims.items()}
        self.values: dict[str, np.ndarray] = {}
        for tensor in model.graph.initializer:
            self.dims[tensor.name] = list(tensor.dims)
            if tensor.data_type == onnx.TensorProto.INT64 and math.prod(tensor.dims) <= 64:
                self.values[tensor.name] = numpy_helper.to_array(tensor)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                tensor = node.attribute[0].t
                self.dims[node.output[0]] = list(tensor.dims)
                if math.prod(tensor.dims) <= 64:
                    self.values[node.output[0]] = numpy_helper.to_array(tensor)
        self._inferred = False

    def of(self, name: str) -> list[int | None] | None:
        if name not in self.dims and not self._inferred:
            self._infer()
        dims = self.dims.get(name)
        return None if dims is None else [d if d is not None and d >= 0 else None for d in dims]

    def _infer(self) -> None:
        self._inferred = True
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        del model.graph.value_info[:]
        for vi in model.graph.input:
            if vi.name in self.dims and vi.type.HasField("tensor_type"):
                shape = vi.type.tensor_type.shape
                shape.Clear()
                for d in self.dims[vi.name]:
                    shape.dim.add().dim_value = d
        try:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as exc:  # a model shape inference cannot follow keeps its unknowns
            logger.debug("random inputs: shape inference failed: %s", exc)
            return
        for vi in [*inferred.graph.value_info, *inferred.graph.output]:
            t = vi.type.tensor_type
            if t.HasField("shape") and vi.name not in self.dims:
                self.dims[vi.name] = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]  # fmt: skip


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attribute in node.attribute:
        if attribute.name == name:
            return int(attribute.i)
    return default


def _axis_size(shapes: _Shapes, name: str, axis: int) -> int | None:
    dims = shapes.of(name)
    if dims is None or not -len(dims) <= axis < len(dims):
        return None
    return dims[axis]


def _rule(node: onnx.NodeProto, index: int, shapes: _Shapes, length: int) -> IntRange | None:
    """The range that input ``index`` of ``node`` accepts; None: any small value."""
    op, where = node.op_type, f"{node.op_type} '{node.name or node.output[0]}'"
    if op in ("Gather", "GatherElements", "ScatterElements", "Scatter") and index == 1:
        size = _axis_size(shapes, node.input[0], _attr(node, "axis", 0))
        return IntRange(0, size if size is not None else 1, why=f"indices of {where}")
    if op in ("GatherND", "ScatterND") and index == 1:
        dims = shapes.of(node.input[0]) or []
        batch = _attr(node, "batch_dims", 0)
        columns = tuple(d if d is not None else 1 for d in dims[batch : batch + length])
        return IntRange(0, max(columns, default=1), columns or None, why=f"indices of {where}")
    if op == "OneHot" and index == 0:
        depth = shapes.values.get(node.input[1])
        high = int(depth.reshape(-1)[0]) if depth is not None and depth.size == 1 else 1
        return IntRange(0, high, why=f"indices of {where}")
    if op == "OneHot" and index == 1:
        return IntRange(1, 5, why=f"depth of {where}")
    if (op, index) in {("Dropout", 1), ("NonMaxSuppression", 3), ("NonMaxSuppression", 4)}:
        return IntRange(0, 1, why=f"ratio of {where}")
    if (op, index) in {("Resize", 2), ("Upsample", 1)}:
        return IntRange(pattern="ones", why=f"scales of {where}")
    if op == "Resize" and index == 3:
        return _values(shapes.of(node.input[0]), length, f"sizes of {where}")
    if op in ("LSTM", "GRU", "RNN") and index == 4:
        steps = _axis_size(shapes, node.input[0], _attr(node, "layout", 0))
        return IntRange(1, (steps or 1) + 1, why=f"sequence_lens of {where}")
    if op in ("Split", "SplitToSequence") and index == 1:
        size = _axis_size(shapes, node.input[0], _attr(node, "axis", 0))
        if size is None:
            return None
        if op == "SplitToSequence" and length == 1:
            return IntRange(1, size + 1, why=f"split of {where}")
        parts = [size // length] * (length - 1)
        return IntRange(pattern="values", values=(*parts, size - sum(parts)), why=f"split of {where}")  # fmt: skip
    if op == "Squeeze" and index == 1:
        data = shapes.of(node.input[0]) or []
        units = tuple(axis for axis, d in enumerate(data) if d == 1)[:length]
        return IntRange(pattern="values", values=units, why=f"axes of {where}")
    if op == "AffineGrid" and index == 1:
        batch = _axis_size(shapes, node.input[0], 0) or 1
        return IntRange(pattern="values", values=(batch, 1, *[3] * (length - 2)), why=f"size of {where}")  # fmt: skip
    if op == "DFT" and index == 2:
        signal = shapes.of(node.input[0])
        return None if signal is None else IntRange(1, max(len(signal) - 1, 1), why=f"axis of {where}")  # fmt: skip
    if op == "Expand" and index == 1:
        return IntRange(pattern="ones", why=f"shape of {where}")
    if op == "Reshape" and index == 1:
        return IntRange(pattern="reshape", why=f"shape of {where}")
    if (op, index) in {("Tile", 1), ("ConstantOfShape", 0), ("Resize", 3), ("TopK", 1)}:
        return IntRange(1, 2 if op == "TopK" else 3, why=f"sizes of {where}")
    if op == "Range":
        return IntRange(1, 3, why=f"step of {where}") if index == 2 else IntRange(0, 4)
    if op in ("Div", "Mod") and index == 1:
        return IntRange(1, 5, why=f"divisor of {where}")
    if op == "Slice" and index == 4:
        return IntRange(1, 3, why=f"steps of {where}")
    if op == "Pad" and index == 1:
        reflect = any(a.name == "mode" and a.s == b"reflect" for a in node.attribute)
        return IntRange(0, 1 if reflect else 3, why=f"pads of {where}")
    axes_of = {("CumSum", 1), ("CumProd", 1), ("Slice", 3), ("Pad", 3), ("Unsqueeze", 1)}
    if (op, index) in axes_of or (op in _REDUCE and index == 1):
        rank_of = shapes.of(node.input[0])
        if rank_of is None:
            return None
        rank = len(rank_of) + (length if op == "Unsqueeze" else 0)
        pattern = "sample" if op in ("CumSum", "CumProd") else "distinct"
        return IntRange(0, rank, pattern=pattern, why=f"axes of {where}")
    return None


def _values(dims: list[int | None] | None, length: int, why: str) -> IntRange | None:
    if dims is None or None in dims or len(dims) != length:
        return None
    return IntRange(pattern="values", values=tuple(d for d in dims if d is not None), why=why)


def _constraints(model: onnx.ModelProto, name: str, shapes: _Shapes, shape: list[int]) -> IntRange:
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, tensor in enumerate(node.input):
            consumers.setdefault(tensor, []).append((node, index))
    found = IntRange()
    stack, seen = [name], {name}
    length = shape[-1] if shape else 1
    while stack:
        tensor = stack.pop()
        for node, index in consumers.get(tensor, []):
            rule = _rule(node, index, shapes, length)
            if rule is not None:
                found = found.meet(rule)
            elif node.op_type in _PASS_THROUGH and index == 0 and node.output[0] not in seen:
                seen.add(node.output[0])
                stack.append(node.output[0])
    return found


def _sample_int(rng: np.random.Generator, dtype: np.dtype, shape: list[int], r: IntRange) -> np.ndarray:  # fmt: skip
    count = math.prod(shape)
    if r.pattern == "ones":
        return np.ones(shape, dtype)
    if r.pattern == "reshape":
        return np.array([-1] + [1] * (count - 1), dtype).reshape(shape)
    if r.pattern == "values":
        if len(r.values) != count:
            raise ValueError(f"needs {count} values, found {len(r.values)}")
        return np.array(r.values, dtype).reshape(shape)
    if r.pattern == "distinct":
        if count > r.high:
            raise ValueError(f"{count} distinct axes in [0, {r.high})")
        return np.sort(rng.permutation(r.high)[:count]).astype(dtype).reshape(shape)
    if r.columns and shape and len(r.columns) == shape[-1]:
        return np.stack([rng.integers(0, high, shape[:-1]) for high in r.columns], -1).astype(dtype)
    if r.low >= r.high:
        raise ValueError(f"no value in [{r.low}, {r.high})")
    if np.issubdtype(dtype, np.floating):
        return rng.uniform(r.low, r.high, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(r.low, info.min), min(r.high, info.max + 1), shape).astype(dtype)


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    # ml_dtypes (bfloat16, float8, int4): through float32, which they all convert from
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def _input_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        raise NeedsRealDataError(
            f"input '{vi.name}' is of type {kind or 'none'}, not a tensor: random "
            f"verification data cannot be made for it; {HOW_TO_GIVE_DATA}"
        )
    elem = vi.type.tensor_type.elem_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem))
    except (KeyError, ValueError, TypeError):
        raise NeedsRealDataError(
            f"input '{vi.name}' has element type {elem}, which has no random data; "
            f"{HOW_TO_GIVE_DATA}"
        ) from None
    if dtype.kind in "OUS":
        raise NeedsRealDataError(
            f"input '{vi.name}' is a string tensor: random verification data cannot be made "
            f"for it; {HOW_TO_GIVE_DATA}"
        )
    return dtype


def random_inputs(model: onnx.ModelProto, seed: int) -> list[Batch]:
    """Seeded inputs the model accepts; two batch sizes when the first axis is symbolic.

    A symbolic dimension gets one size per name across all inputs, so that inputs sharing
    a dimension (``x[T, batch, I]`` and ``h0[1, batch, H]``) stay consistent: names that
    head an input's shape are batch-like and take the varying batch size, other names and
    unnamed dimensions take a fixed size.
    """
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    dtypes = {vi.name: _input_dtype(vi) for vi in inputs}
    batch_names: set[str] = set()
    dynamic_batch = False
    for vi in inputs:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dynamic_batch = True
            if dims[0].dim_param:
                batch_names.add(dims[0].dim_param)
    sizes = RANDOM_BATCH_SIZES if dynamic_batch else RANDOM_BATCH_SIZES[:1]
    rng = np.random.default_rng(seed)
    feeds: list[Batch] = []
    for batch_size in sizes:
        shapes: dict[str, list[int]] = {}
        for vi in inputs:
            shape: list[int] = []
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                if d.HasField("dim_value") and d.dim_value > 0:
                    shape.append(d.dim_value)
                elif d.HasField("dim_value") and d.dim_value == 0:
                    shape.append(0)
                elif d.dim_param in batch_names or (axis == 0 and not d.dim_param):
                    shape.append(batch_size)
                else:
                    shape.append(SYMBOLIC_DIM)
            size = math.prod(shape) * dtypes[vi.name].itemsize
            if size > MAX_RANDOM_BYTES:
                raise NeedsRealDataError(
                    f"input '{vi.name}' of shape {shape} would take {size:,} bytes of random "
                    f"verification data (limit {MAX_RANDOM_BYTES:,}); {HOW_TO_GIVE_DATA}"
                )
            shapes[vi.name] = shape
        known = _Shapes(model, shapes)
        feed: Batch = {}
        for vi in inputs:
            dtype, shape = dtypes[vi.name], shapes[vi.name]
            if np.issubdtype(dtype, np.integer) or (
                np.issubdtype(dtype, np.floating) and _constraints(model, vi.name, known, shape).why
            ):
                feed[vi.name] = _constrained_input(model, vi.name, dtype, shape, known, rng)
            else:
                feed[vi.name] = _random_array(rng, dtype, shape)
        feeds.append(feed)
    return feeds


def _constrained_input(
    model: onnx.ModelProto,
    name: str,
    dtype: np.dtype,
    shape: list[int],
    shapes: _Shapes,
    rng: np.random.Generator,
) -> np.ndarray:
    accepted = _constraints(model, name, shapes, shape)
    try:
        return _sample_int(rng, dtype, shape, accepted)
    except ValueError as exc:
        raise NeedsRealDataError(
            f"input '{name}' ({accepted.why}) accepts no random value of shape {shape}: "
            f"{exc}; {HOW_TO_GIVE_DATA}"
        ) from None


def unconstrained_integer_inputs(model: onnx.ModelProto) -> list[str]:
    """Integer inputs whose consumers set no range: the likely cause when random inputs fail."""
    initializers = {t.name for t in model.graph.initializer}
    shapes = _Shapes(model, {})
    names = []
    for vi in model.graph.input:
        if vi.name not in initializers and vi.type.tensor_type.elem_type in _INT_TYPES:
            shape = [d.dim_value or SYMBOLIC_DIM for d in vi.type.tensor_type.shape.dim]
            if not _constraints(model, vi.name, shapes, shape).why:
                names.append(vi.name)
    return names


_INT_TYPES = {
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
}  # fmt: skip
