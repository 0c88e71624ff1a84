"""Channel dependency groups: the output channels that must be pruned together.

Every prunable layer opens a *channel space*: the output channels of a Conv, of a Gemm or a
MatMul with a constant weight, or the hidden units of a GRU. A walk over the nodes in
topological order gives each tensor that carries channels a ``Layout``: the axis they lie on
and the spaces laid end to end along it (Concat), each channel spread over ``block``
consecutive indices (Flatten/Reshape into features, a depthwise Conv's channel multiplier).
How each op moves, joins or consumes channels is a rule in ``onnxpress.analysis.channels.rules``.

Ops that combine feature maps (Add, Mul, ..., the equal partitions of a grouped Conv)
identify channels one to one: an edge between two spaces of a networkx graph. Split and
Slice on the channel axis cut a space, and every space identified with it, into pieces. The
connected components over the pieces are the channel groups: removing channel i of a group
removes channel i of every member, from every tensor that carries it.

A group is refused, with its reasons, when a member reaches a graph output, a shape-dependent
consumer (Shape, Size), an op without a rule, an op that mixes channels in a way the rewrite
cannot follow, or channels that no prunable layer produced (graph inputs, computed weights).
A refused group keeps all its channels, so a refusal never changes the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.core.context import TensorShapes

if TYPE_CHECKING:
    from onnxpress.core.context import PassContext

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """One space laid along a channel axis; each of its channels covers ``block`` indices."""

    space: int
    block: int = 1


@dataclass(frozen=True)
class Layout:
    """Where the channels of a tensor come from: spaces laid end to end along ``axis``."""

    axis: int
    segments: tuple[Segment, ...]

    def moved(self, axis: int) -> Layout:
        return replace(self, axis=axis)

    def spread(self, factor: int) -> Layout:
        """Each channel now covers ``factor`` times as many consecutive indices."""
        return replace(
            self, segments=tuple(Segment(s.space, s.block * factor) for s in self.segments)
        )


def node_key(node: gs.Node) -> str:
    """A stable key for a node: its first output's name (tensor names are unique)."""
    return node.outputs[0].name if node.outputs else node.name


@dataclass(frozen=True)
class ChannelGroup:
    """Channels identified one to one across the member spaces; ``size`` channels each."""

    index: int
    name: str  # the first producer's node name, for reports and include/exclude patterns
    size: int
    members: tuple[int, ...]
    producers: tuple[str, ...]  # node keys, topological order
    consumers: tuple[str, ...]  # node keys of layers whose input features are these channels
    norms: tuple[str, ...]  # BatchNormalization / InstanceNormalization node keys
    refusals: tuple[str, ...]

    @property
    def prunable(self) -> bool:
        return not self.refusals and self.size > 1


@dataclass
class ChannelGroups:
    """The result of the analysis; see the module docstring. Cached by ``ctx.analysis``."""

    layouts: dict[str, Layout]  # tensor name -> where its channels come from
    ranks: dict[str, int]  # tensor name -> rank, for every tensor with a layout
    producers: dict[str, Layout]  # producer key -> layout of its own channels
    consumers: dict[str, str]  # consumer key -> the tensor whose channels it contracts
    norms: dict[str, str]  # normalization key -> its input tensor
    groups: list[ChannelGroup]
    group_of: dict[int, int]  # space -> group index
    space_sizes: dict[int, int]
    depthwise: set[str]  # depthwise Conv keys: channels pass through, MACs scale once

    @classmethod
    def compute(cls, graph: gs.Graph, ctx: PassContext) -> ChannelGroups:
        from onnxpress.analysis.channels.rules import RULES, unknown_op
        from onnxpress.analysis.channels.trace import Tracer, topological_nodes

        tracer = Tracer(graph, ctx.analysis(TensorShapes, graph))
        for node in topological_nodes(graph):
            tracer.refuse_captures(node)
            default_domain = node.domain in (None, "", "ai.onnx")
            rule = RULES.get(node.op, unknown_op) if default_domain else unknown_op
            rule(tracer, node)
        return tracer.finish()

    def spans(self, layout: Layout) -> list[tuple[int, int, int]]:
        """(tensor offset, group index, block) of each segment of ``layout``."""
        out, offset = [], 0
        for seg in layout.segments:
            out.append((offset, self.group_of[seg.space], seg.block))
            offset += self.space_sizes[seg.space] * seg.block
        return out

    def length(self, layout: Layout) -> int:
        return sum(self.space_sizes[s.space] * s.block for s in layout.segments)

    def kept_indices(self, layout: Layout, kept: Mapping[int, np.ndarray]) -> np.ndarray | None:
        """Indices along the channel axis that survive, or None if no channel is removed."""
        if not any(self.group_of[s.space] in kept for s in layout.segments):
            return None
        parts = []
        for (offset, group, block), seg in zip(self.spans(layout), layout.segments, strict=True):
            size = self.space_sizes[seg.space]
            channels = kept.get(group, np.arange(size))
            parts.append((offset + channels[:, None] * block + np.arange(block)).reshape(-1))
        return np.concatenate(parts).astype(np.int64)

    def tensor_indices(self, name: str, kept: Mapping[int, np.ndarray]) -> np.ndarray | None:
        layout = self.layouts.get(name)
        return None if layout is None else self.kept_indices(layout, kept)

    def fractions(self, layout: Layout, kept_counts: Mapping[int, int]) -> float:
        """The fraction of the channel axis that survives, for MAC estimates."""
        total = self.length(layout)
        remaining = 0.0
        for (_, group, block), seg in zip(self.spans(layout), layout.segments, strict=True):
            size = self.space_sizes[seg.space]
            remaining += kept_counts.get(group, size) * block
        return remaining / max(total, 1)


class SpaceGraph:
    """Channel spaces, the one-to-one identifications between them, and their cuts."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.parent: list[int] = []
        self.children: dict[int, tuple[int, int]] = {}
        self.links = nx.Graph()
        self.reasons: dict[int, list[str]] = {}

    def new(self, size: int, reason: str | None = None, parent: int = -1) -> int:
        space = len(self.sizes)
        self.sizes.append(size)
        self.parent.append(parent)
        self.links.add_node(space)
        if reason:
            self.reasons.setdefault(space, []).append(reason)
        return space

    def expand(self, layout: Layout) -> Layout:
        """The same layout in terms of the current (uncut) spaces."""
        if not any(s.space in self.children for s in layout.segments):
            return layout
        segments: list[Segment] = []
        stack = list(reversed(layout.segments))
        while stack:
            seg = stack.pop()
            if seg.space in self.children:
                low, high = self.children[seg.space]
                stack.extend([Segment(high, seg.block), Segment(low, seg.block)])
            else:
                segments.append(seg)
        return Layout(layout.axis, tuple(segments))

    def refuse(self, layout: Layout, reason: str) -> None:
        for seg in self.expand(layout).segments:
            reasons = self.reasons.setdefault(seg.space, [])
            if reason not in reasons:
                reasons.append(reason)

    def _cut_space(self, space: int, at: int) -> None:
        """Cut ``space`` and every space identified with it after channel ``at``."""
        component = nx.node_connected_component(self.links, space)
        edges = list(self.links.subgraph(component).edges())
        pieces: dict[int, tuple[int, int]] = {}
        for member in component:
            size = self.sizes[member]
            pieces[member] = (self.new(at, parent=member), self.new(size - at, parent=member))
            self.children[member] = pieces[member]
        for a, b in edges:
            self.links.add_edge(pieces[a][0], pieces[b][0])
            self.links.add_edge(pieces[a][1], pieces[b][1])
        self.links.remove_nodes_from(component)

    def cut(self, layout: Layout, offset: int) -> bool:
        """Make ``offset`` (along the axis) a segment boundary; False if inside a block."""
        start = 0
        for seg in self.expand(layout).segments:
            stop = start + self.sizes[seg.space] * seg.block
            if start < offset < stop:
                if (offset - start) % seg.block:
                    return False
                self._cut_space(seg.space, (offset - start) // seg.block)
                return True
            start = stop
        return True

    def part(self, layout: Layout, start: int, stop: int) -> Layout | None:
        """The segments between two offsets (cut there first), or None if a block is split."""
        if not (self.cut(layout, start) and self.cut(layout, stop)):
            return None
        segments, offset = [], 0
        for seg in self.expand(layout).segments:
            if start <= offset < stop:
                segments.append(seg)
            offset += self.sizes[seg.space] * seg.block
        return Layout(layout.axis, tuple(segments))

    def length(self, layout: Layout) -> int:
        return sum(self.sizes[s.space] * s.block for s in self.expand(layout).segments)

    def identify(self, first: Layout, second: Layout) -> str | None:
        """Identify the channels of two layouts one to one; the reason if impossible."""
        if self.length(first) != self.length(second):
            return "channel counts differ"
        changed = True
        while changed:  # a cut can add boundaries elsewhere (a space identified with itself)
            changed = False
            own = [_boundaries(self, self.expand(first)), _boundaries(self, self.expand(second))]
            for layout, mine in zip((first, second), own, strict=True):
                for offset in sorted((own[0] | own[1]) - mine):
                    if not self.cut(layout, offset):
                        return "channel blocks do not line up"
                    changed = True
        a, b = self.expand(first).segments, self.expand(second).segments
        if len(a) != len(b) or any(x.block != y.block for x, y in zip(a, b, strict=True)):
            return "channel blocks do not line up"
        for x, y in zip(a, b, strict=True):
            self.links.add_edge(x.space, y.space)
        return None

    def all_reasons(self, space: int) -> list[str]:
        out: list[str] = []
        while space >= 0:
            out.extend(r for r in self.reasons.get(space, []) if r not in out)
            space = self.parent[space]
        return out

    def components(self) -> list[list[int]]:
        leaves = [s for s in self.links.nodes if s not in self.children]
        return [sorted(c) for c in nx.connected_components(self.links.subgraph(leaves))]


def _boundaries(spaces: SpaceGraph, layout: Layout) -> set[int]:
    offsets, offset = set(), 0
    for seg in layout.segments:
        offsets.add(offset)
        offset += spaces.sizes[seg.space] * seg.block
    offsets.add(offset)
    return offsets
