"""The lengths of masked recurrent cells (mask.py) and the op's ``sequence_lens`` input.

``check_masks`` accepts a chain of masked cells when every step is masked, the loop starts
from zeros (onnxruntime gives a zero final state for length 0, a loop from a given state
keeps it) and only the last kept state is read outside. ``lengths_of`` then finds the
lengths tensor L among the rank-1 integer tensors the masks are computed from (the
farthest first, so both directions of a bidirectional loop share it) and checks on
onnxruntime that every step's mask is ``t < L`` for L = -1..T+1. ``sequence_lens`` emits
Clip(Cast(L, int32), 0, T), which equals the masks for any L.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnxpress.passes.gru.emit import Emitter, sequence_source
from onnxpress.passes.gru.graph import GraphIndex, TensorTypes, producer
from onnxpress.passes.gru.mask import Mask
from onnxpress.passes.gru.probe import submodel

from onnxpress.core.verify import Runner

INTEGER_TYPES = frozenset(
    {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64}
    | {TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32}
)


def check_masks(
    model: onnx.ModelProto,
    index: GraphIndex,
    types: TensorTypes,
    cells: Sequence[Any],
    zero_start: bool,
) -> gs.Tensor | str | None:
    """The lengths tensor of a chain of masked cells (None: not masked), or a reason."""
    masks: list[Mask | None] = [c.mask for c in cells]
    if all(m is None for m in masks):
        return None
    if any(m is None for m in masks):
        return "some steps of the chain are masked by a length and others are not"
    if not zero_start:
        return (
            "a masked loop from a given initial state: onnxruntime's op gives a zero final "
            "state for length 0, the loop keeps the initial one"
        )
    for k, cell in enumerate(cells[:-1]):
        for name, kept in cell.mask.kept.items():
            if kept is cell.mask.out:  # from a zero state the kept h is the step output too
                continue
            readers = [r for r in kept.outputs if id(r) not in cells[k + 1].nodes]
            if any(r.op not in ("Shape", "Size") for r in readers) or id(kept) in index.outputs:
                return (
                    f"the kept {name} state '{kept.name}' of step {k} is read outside the loop "
                    "(the op gives only the last one)"
                )
    source = sequence_source(index, cells, types)
    reverse = source is not None and source.reverse
    if source is not None and source.start != 0:
        return f"a masked chain over steps {source.start}.. of its input, not from step 0"
    count = len(cells)
    times = [count - 1 - k if reverse else k for k in range(count)]
    batch = types.get(cells[0].x.name, (0, [None]))[1][0]
    return lengths_of(
        model,
        index,
        types,
        [c.mask.mask for c in cells],
        times,
        batch if isinstance(batch, int) else None,
    )


def lengths_of(
    model: onnx.ModelProto,
    index: GraphIndex,
    types: TensorTypes,
    masks: list[gs.Tensor],
    times: list[int],
    batch: int | None,
) -> gs.Tensor | str:
    """The lengths tensor L with masks[k] == (times[k] < L) for every k, or a reason. The
    farthest such tensor is taken (the graph input rather than a Cast of it), so that the
    two directions of a bidirectional loop share it."""
    candidates = _integer_ancestors(index, types, masks[0])
    for mask in masks[1:]:
        common = {id(t) for t in _integer_ancestors(index, types, mask)}
        candidates = [t for t in candidates if id(t) in common]
    if not candidates:
        return "the mask is not computed from one rank-1 integer tensor of lengths"
    reason = ""
    for lengths in reversed(candidates):
        reason = _check_lengths(model, types, masks, times, batch, lengths)
        if not reason:
            return lengths
    return reason


def _check_lengths(
    model: onnx.ModelProto,
    types: TensorTypes,
    masks: list[gs.Tensor],
    times: list[int],
    batch: int | None,
    lengths: gs.Tensor,
) -> str:
    """Why the masks are not ``times[k] < lengths`` for lengths -1..T+1 ("" when they are)."""
    elem = types[lengths.name][0]
    values = np.arange(-1, len(masks) + 2)
    try:
        sub = submodel(model, {lengths.name: 1}, [m.name for m in masks], None)
        vi = sub.graph.input[0].type.tensor_type
        vi.elem_type = elem
        del vi.shape.dim[1:]
        for out in sub.graph.output:
            out.type.tensor_type.elem_type = types.get(out.name, (TensorProto.BOOL, []))[0]
        runner = Runner(sub)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
        rows = batch or len(values)
        results = []
        for start in range(0, len(values), rows):
            part = values[start : start + rows]
            padded = np.concatenate([part, np.repeat(part[-1:], rows - len(part))])
            outs = runner({lengths.name: padded.astype(dtype)})
            results.append([np.asarray(o).reshape(rows, -1)[: len(part)] for o in outs])
    except Exception as exc:
        return (
            f"the mask cannot be computed from '{lengths.name}' alone: {str(exc).splitlines()[0]}"
        )
    for k, t in enumerate(times):
        got = np.concatenate([r[k] for r in results]).astype(np.float64)
        wanted = (t < values).astype(np.float64)[:, None]
        if got.shape[0] != len(values) or not np.array_equal(got, wanted + 0 * got):
            return f"the mask '{masks[k].name}' of step {k} is not 'step < {lengths.name}'"
    return ""


def _integer_ancestors(index: GraphIndex, types: TensorTypes, mask: gs.Tensor) -> list[gs.Tensor]:
    """Non-constant rank-1 integer tensors the mask is computed from, nearest first."""
    found: list[gs.Tensor] = []
    stack, seen = [mask], set()
    while stack:
        t = stack.pop(0)
        if id(t) in seen or index.is_const(t):
            continue
        seen.add(id(t))
        elem, dims = types.get(t.name, (0, []))
        if elem in INTEGER_TYPES and len(dims) == 1:
            found.append(t)
        node = producer(t)
        if node is not None and len(seen) < 64:
            stack.extend(node.inputs)
    return found


def sequence_lens(emit: Emitter, lengths: gs.Tensor, elem: int, steps: int) -> gs.Tensor:
    """Clip(Cast(L, int32), 0, T): the op's sequence_lens, equal to the masks for any L."""
    value = lengths
    if elem != TensorProto.INT32:
        cast = gs.Variable(emit.name("lengths_int32"), dtype=np.int32)
        value = emit.one("Cast", [value], {"to": TensorProto.INT32}, output=cast)
    bounds = [
        gs.Constant(emit.name(n), np.array(v, np.int32)) for n, v in (("min", 0), ("max", steps))
    ]
    clipped = gs.Variable(emit.name("sequence_lens"), dtype=np.int32)
    return emit.one("Clip", [value, *bounds], output=clipped)
