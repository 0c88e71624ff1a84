"""Where a tensor's channels come from, and the graph of channel spaces.

A ``Layout`` is the channel axis of a tensor and the spaces laid end to end along it
(``Segment``: one space, each channel spread over ``block`` consecutive indices). A
``SpaceGraph`` holds every space the walk opened, the one-to-one identifications between
them (edges), the cuts that Split and Slice make, and the reasons a space is refused. The
tracer (trace.py), the rules (moves.py, rules.py) and the analysis (groups.py) build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import networkx as nx
import onnx_graphsurgeon as gs


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
