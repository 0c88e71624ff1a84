"""Cells masked by sequence length, for fuse-gru and fuse-lstm: matching the masks.

The usual export of a padded batch keeps each state where the step is past the length and
zeroes the output there (torch ``where``, Keras arithmetic, any operand order):
  kept = Where(m_t, h', h)   or  m_t*h' + (1-m_t)*h       (for an LSTM, c too)
  out  = Where(m_t, h', 0)   or  m_t*h'                   (optional: the step output)
  m_t  = t < L  for a rank-1 integer tensor L of lengths, a boolean in any form (Greater,
         Less, a precomputed [B, T] mask sliced per step, Unsqueeze ...), used as it is
         or through Cast to float and Not (a float gate is never taken for a mask)
which is ONNX's GRU/LSTM with sequence_lens = L (clipped to [0, T]): Y zero past the
length, Y_h the last valid state; a reverse loop starts at step L-1. ``find_mask`` matches
kept and out around one cell by evaluating the expressions on random values;
lengths.py finds L and checks numerically that every step's mask is ``t < L``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnxpress.passes.gru.emit import is_zero
from onnxpress.passes.gru.graph import GraphIndex, TensorTypes, producer

CellT = TypeVar("CellT")
MASK_OPS = frozenset({"Where", "Mul", "Add", "Sub", "Neg", "Not", "Cast"})
MAX_DEPTH = 4


@dataclass
class Mask:
    """How one cell's results are masked: the mask, the kept states, the zeroed output."""

    mask: gs.Tensor  # m_t, [batch, 1] or [batch, hidden], bool or 0/1
    kept: dict[str, gs.Tensor]  # state ('h', 'c') -> the state the next step reads
    out: gs.Tensor | None  # the zeroed step output, if the loop has one
    nodes: dict[int, gs.Node] = field(default_factory=dict)


@dataclass
class StepView:
    """A masked cell as StepOutputs sees it: its step output is the zeroed one."""

    x: gs.Tensor
    h: gs.Tensor
    h_new: gs.Tensor
    nodes: dict[int, gs.Node]
    name: str


def _expression(
    index: GraphIndex,
    t: gs.Tensor,
    new: gs.Tensor,
    old: gs.Tensor,
    depth: int,
    leaves: dict[int, gs.Tensor],
    nodes: list[gs.Node],
) -> tuple:
    if t is new:
        return ("new",)
    if t is old:
        return ("old",)
    value = index.literal(t)
    if value is not None and value.size == 1:
        return ("c", float(value.ravel()[0]))
    if is_zero(index, t):
        return ("c", 0.0)
    node = producer(t)
    if node is None or node.op not in MASK_OPS or depth >= MAX_DEPTH or index.is_const(t):
        leaves[id(t)] = t
        return ("m",)
    nodes.append(node)
    return (
        node.op,
        *(_expression(index, i, new, old, depth + 1, leaves, nodes) for i in node.inputs),
    )


def _evaluate(expr: tuple, env: dict[str, np.ndarray]) -> np.ndarray:
    tag = expr[0]
    if tag == "c":
        return np.asarray(expr[1])
    if tag in env:
        return env[tag]
    args = [_evaluate(a, env) for a in expr[1:]]
    if tag == "Where":
        return np.where(args[0] != 0, args[1], args[2])
    if tag == "Cast":
        return args[0].astype(np.float64)
    if tag == "Neg":
        return -args[0]
    if tag == "Not":
        return 1.0 - (args[0] != 0)
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[tag](args[0], args[1])


def _classify(
    index: GraphIndex, types: TensorTypes, t: gs.Tensor, new: gs.Tensor, old: gs.Tensor
) -> tuple[str, gs.Tensor, list[gs.Node]] | None:
    """('kept' | 'out', mask, nodes) when ``t`` is Where(m, new, old) or Where(m, new, 0)
    for a boolean m (used through Cast and Not too; a float gate is no mask)."""
    leaves: dict[int, gs.Tensor] = {}
    nodes: list[gs.Node] = []
    expr = _expression(index, t, new, old, 0, leaves, nodes)
    if len(leaves) != 1 or not nodes:
        return None
    if types.get(next(iter(leaves.values())).name, (0, []))[0] != TensorProto.BOOL:
        return None
    rng = np.random.default_rng(0)
    env = {
        "new": rng.uniform(-1, 1, (6, 5)),
        "old": rng.uniform(-1, 1, (6, 5)),
        "m": np.array([[1.0], [0.0], [1.0], [0.0], [0.0], [1.0]]),
    }
    try:
        value = np.broadcast_to(_evaluate(expr, env), env["new"].shape)
    except (ValueError, KeyError, IndexError):
        return None
    mask = next(iter(leaves.values()))
    for kind, other in (("kept", env["old"]), ("out", 0.0)):
        if np.allclose(value, np.where(env["m"] != 0, env["new"], other), rtol=0, atol=1e-12):
            return kind, mask, nodes
    return None


def _candidates(
    index: GraphIndex,
    types: TensorTypes,
    new: gs.Tensor,
    old: gs.Tensor,
    cell_nodes: dict[int, gs.Node],
) -> list[tuple[str, gs.Tensor, gs.Tensor, list[gs.Node]]]:
    """(kind, tensor, mask, nodes) for each masking expression a few nodes after ``new``."""
    found: list[tuple[str, gs.Tensor, gs.Tensor, list[gs.Node]]] = []
    level, seen = [new], set()
    for _ in range(MAX_DEPTH):
        following = []
        for t in level:
            for node in t.outputs:
                if node.op not in MASK_OPS or id(node) in seen or id(node) in cell_nodes:
                    continue
                seen.add(id(node))
                following.extend(node.outputs)
                match = _classify(index, types, node.outputs[0], new, old)
                if match is None:
                    continue
                # From a zero state (an exporter may write each zero as its own constant)
                # the kept state and the zeroed output are the same expression.
                kinds = ("kept", "out") if is_zero(index, old) else (match[0],)
                found.extend((kind, node.outputs[0], match[1], match[2]) for kind in kinds)
        level = following
    return found


def find_mask(
    index: GraphIndex,
    types: TensorTypes,
    states: dict[str, tuple[gs.Tensor, gs.Tensor]],
    cell_nodes: dict[int, gs.Node],
    next_states: set[int],
) -> Mask | str | None:
    """How the cell's new states (name -> (new, old)) are masked; None when they are not,
    a reason when they are masked in a way the ONNX op cannot express. A kept state that
    is some cell's state (``next_states``, by id) is preferred."""
    found: Mask | None = None
    for name, (new, old) in states.items():
        candidates = _candidates(index, types, new, old, cell_nodes)
        keeps = [c for c in candidates if c[0] == "kept"]
        kept = next((c for c in keeps if id(c[1]) in next_states), keeps[0] if keeps else None)
        inner = {id(n) for n in kept[3]} if kept is not None else set()
        outs = [
            c
            for c in candidates
            if c[0] == "out" and name == "h" and any(id(r) not in inner for r in c[1].outputs)
        ]
        outs.sort(key=lambda c: kept is not None and c[1] is kept[1])  # its own tensor last
        for kind, tensor, mask, nodes in [c for c in (kept, *outs[:1]) if c is not None]:
            if found is not None and mask is not found.mask:
                return "the cell's states are masked by different tensors"
            found = found or Mask(mask, {}, None)
            found.nodes.update((id(n), n) for n in nodes)
            if kind == "kept":
                found.kept[name] = tensor
            else:
                found.out = tensor
        inside = cell_nodes.keys() | (found.nodes.keys() if found is not None else set())
        read = [r for r in new.outputs if id(r) not in inside and r.op not in ("Shape", "Size")]
        if found is not None and name not in found.kept and read:  # unread: a last step's c
            return f"the {name} state is not kept where the mask is off"
    return found


def outside_readers(
    mask: Mask, states: dict[str, tuple[gs.Tensor, gs.Tensor]], cell_nodes: dict[int, gs.Node]
) -> str | None:
    """Why an unmasked new state is also read outside the mask (a step output the op's
    zeroed Y cannot give)."""
    for name, (new, _) in states.items():
        for reader in new.outputs:
            if id(reader) in mask.nodes or id(reader) in cell_nodes:
                continue
            if reader.op in ("Shape", "Size"):
                continue
            return (
                f"the unmasked state '{new.name}' is read by '{reader.name}': past the length "
                f"the {name} output is neither zero nor kept"
            )
    return None


def attach_masks(
    index: GraphIndex,
    types: TensorTypes,
    cells: list[CellT],
    states: Callable[[CellT], dict[str, tuple[gs.Tensor, gs.Tensor]]],
) -> tuple[list[CellT], list[tuple[str, str]]]:
    """Each cell with its mask (``cell.mask``, its nodes added to ``cell.nodes``); cells
    masked in a way the op cannot express are left out, as (cell name, reason)."""
    kept: list[CellT] = []
    refused: list[tuple[str, str]] = []
    olds = {id(old) for cell in cells for _, old in states(cell).values()}
    for cell in cells:
        pairs = states(cell)
        nodes: dict[int, gs.Node] = cell.nodes  # type: ignore[attr-defined]
        mask = find_mask(index, types, pairs, nodes, olds)
        if isinstance(mask, Mask):
            reason = outside_readers(mask, pairs, nodes)
            mask = reason if reason is not None else mask
        if isinstance(mask, str):
            refused.append((cell.name, mask))  # type: ignore[attr-defined]
            continue
        if mask is not None:
            nodes.update(mask.nodes)
        cell.mask = mask  # type: ignore[attr-defined]
        kept.append(cell)
    return kept, refused


def state_out(cell: Any, name: str, new: gs.Tensor) -> gs.Tensor:
    """The state the next step reads: the kept one when the cell is masked."""
    mask: Mask | None = cell.mask
    return new if mask is None else mask.kept.get(name, new)


def step_views(cells: Sequence[Any]) -> list[StepView]:
    """Masked cells as StepOutputs sees them (their zeroed outputs as step outputs)."""
    return [
        StepView(
            c.x, c.h, c.mask.out if c.mask.out is not None else gs.Variable(""), c.nodes, c.name
        )
        for c in cells
    ]
