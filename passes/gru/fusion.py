"""What fuse-gru and fuse-lstm share around their rules: the chain options and the run.

A rule's pattern removes dead nodes first when it has anchors (``without_dead_readers``); a
run applies the rule, pairs forward and reverse ops over the
same input into bidirectional ones (pair.py), then removes the cells' nodes. Counters:
``dead_nodes_removed``, ``bidirectional``, ``<op>_fused``, ``cells_fused``, ``nodes_removed``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import onnx_graphsurgeon as gs
from onnxpress.passes.gru.emit import remove_dead
from onnxpress.passes.gru.pair import FusedRnn, pair_directions, record_pairs

from onnxpress.core.context import PassContext
from onnxpress.core.ir import remove_dead_nodes
from onnxpress.core.pass_base import PassResult, Refusal
from onnxpress.core.rewrite import Rule, apply_rule

CellT = TypeVar("CellT")
CandidateT = TypeVar("CandidateT")


@dataclass(frozen=True)
class ChainOptions:
    min_steps: int = 1  # shortest chain of cells to fuse; 1 fuses single cells too
    tolerance: float = 1e-4  # self-check: max |cell - op| on random inputs (states in [-1, 1])

    def __post_init__(self) -> None:
        if isinstance(self.min_steps, bool) or self.min_steps < 1:
            raise ValueError(f"min-steps must be an integer >= 1, not {self.min_steps!r}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, not {self.tolerance!r}")


class FusionState(Protocol):
    fused: list[FusedRnn]  # the ops made, for pairing
    replaced: list[gs.Node]  # nodes the rewrites made dead (with their inputs)
    refusals: list[Refusal]  # refusals found outside check(), e.g. heads left out
    dead_removed: int  # dead nodes removed before matching (see without_dead_readers)


def without_dead_readers(
    graph: gs.Graph, anchors: Callable[[], list[gs.Node]]
) -> tuple[list[gs.Node], int]:
    """The anchor nodes, after removing the graph's dead nodes when there are any anchors:
    a dead reader (a Shape that fold-constants left without readers) would otherwise pin a
    cell's tensors. Returns the anchors and how many nodes were removed."""
    found = anchors()
    if not found:
        return found, 0
    removed = remove_dead_nodes(graph)
    return (anchors() if removed else found), removed


def run_fusion(rule: Any, graph: gs.Graph, ctx: PassContext, op: str) -> PassResult:
    """Run a fusion ``rule`` (a Rule that is also a FusionState) over the graph."""
    assert isinstance(rule, Rule)
    state: FusionState = rule  # type: ignore[assignment]
    result = PassResult()
    nodes_before = len(graph.nodes)
    fused = apply_rule(rule, graph, ctx, result)
    result.count("dead_nodes_removed", state.dead_removed)
    result.refusals.extend(state.refusals)
    if fused:
        pairs, dead = pair_directions(graph, state.fused)
        record_pairs(result.details, pairs)
        remove_dead(graph, state.replaced + dead)
        graph.toposort()
        result.count("bidirectional", len(pairs))
    result.count(f"{op}_fused", fused)
    result.count("cells_fused", sum(d["cell_count"] for d in result.details))
    result.count("nodes_removed", nodes_before - len(graph.nodes))
    return result


def match_anchors(
    anchors: list[gs.Node],
    match: Callable[[gs.Node], CellT | str],
    refused: Callable[[str, str], CandidateT],
) -> tuple[list[CellT], list[CandidateT]]:
    """The cells matched around each anchor node, and a refused candidate for the others."""
    cells: list[CellT] = []
    refusals: list[CandidateT] = []
    for node in anchors:
        cell = match(node)
        if isinstance(cell, str):
            refusals.append(refused(node.name or node.outputs[0].name, cell))
        else:
            cells.append(cell)
    return cells, refusals


def link_chains(
    cells: list[CellT],
    state_in: Callable[[CellT], Hashable],
    state_out: Callable[[CellT], Hashable],
) -> list[list[CellT]]:
    """Cells linked where one's outgoing state is the only reader cell's incoming state, in
    the order of ``cells`` (topological)."""
    by_state: dict[Hashable, list[CellT]] = {}
    for cell in cells:
        by_state.setdefault(state_in(cell), []).append(cell)
    successor: dict[int, CellT] = {}
    for cell in cells:
        following = by_state.get(state_out(cell), [])
        if len(following) == 1:
            successor[id(cell)] = following[0]
    has_predecessor = {id(c) for c in successor.values()}
    chains = []
    for cell in cells:
        if id(cell) in has_predecessor:
            continue
        chain = [cell]
        while id(chain[-1]) in successor:
            chain.append(successor[id(chain[-1])])
        chains.append(chain)
    return chains


def signature_runs(signatures: list[str]) -> list[list[int]]:
    """Steps grouped into runs of consecutive equal signatures (shared weights)."""
    runs: list[list[int]] = []
    for t, signature in enumerate(signatures):
        if runs and signatures[runs[-1][0]] == signature:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs
