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
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.attention import (
    AttentionSite,
    HeadShape,
    attention_sites,
    head_rule,
)
from onnxpress.analysis.channels.layout import Layout
from onnxpress.analysis.channels.rules import RULES, unknown_op
from onnxpress.analysis.channels.trace import Tracer, topological_nodes
from onnxpress.core.context import TensorShapes

if TYPE_CHECKING:
    from onnxpress.core.context import PassContext

logger = logging.getLogger(__name__)


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
    sites: list[AttentionSite] = field(default_factory=list)  # multi-head attention
    head_shapes: dict[str, HeadShape] = field(default_factory=dict)  # Reshape key -> heads
    head_tensors: dict[str, Layout] = field(default_factory=dict)  # split tensor -> channels
    scaled: dict[str, list[tuple[float, list[Layout]]]] = field(default_factory=dict)

    @classmethod
    def compute(cls, graph: gs.Graph, ctx: PassContext) -> ChannelGroups:
        tracer = Tracer(graph, ctx.analysis(TensorShapes, graph))
        for node in topological_nodes(graph):
            tracer.refuse_captures(node)
            default_domain = node.domain in (None, "", "ai.onnx")
            rule = RULES.get(node.op, unknown_op) if default_domain else unknown_op
            head_rule(tracer, node, rule)(tracer, node)
        return _groups(tracer)

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


def _groups(tracer: Tracer) -> ChannelGroups:
    """Refuse channels that reach a graph output, then one group per connected component."""
    for tensor in tracer.graph.outputs:
        layout = tracer.layout(tensor)
        heads = tracer.heads.get(tensor.name)
        for found in (layout, heads.layout if heads is not None else None):
            if found is not None:
                tracer.spaces.refuse(found, f"reaches graph output '{tensor.name}'")
    expand = tracer.spaces.expand
    layouts = {name: expand(layout) for name, layout in tracer.layouts.items()}
    producers = {key: expand(layout) for key, layout in tracer.producers.items()}
    order = {seg.space: i for i, lay in enumerate(producers.values()) for seg in lay.segments}
    components = sorted(
        tracer.spaces.components(), key=lambda c: min(order.get(s, len(order)) for s in c)
    )
    group_of = {space: index for index, comp in enumerate(components) for space in comp}
    sites = attention_sites(tracer, group_of)

    def keys_by_group(records: dict[str, Layout]) -> dict[int, list[str]]:
        found: dict[int, list[str]] = {}
        for key, layout in records.items():
            for seg in layout.segments:
                keys = found.setdefault(group_of[seg.space], [])
                if key not in keys:
                    keys.append(key)
        return found

    by_producer = keys_by_group(producers)
    by_consumer = keys_by_group({k: layouts[t] for k, t in tracer.consumers.items()})
    by_norm = keys_by_group({k: layouts[t] for k, t in tracer.norms.items()})
    groups = []
    for index, comp in enumerate(components):
        makers = by_producer.get(index, [])
        reasons: list[str] = []
        for space in comp:
            reasons.extend(r for r in tracer.spaces.all_reasons(space) if r not in reasons)
        groups.append(
            ChannelGroup(
                index=index,
                name=tracer.group_name(makers[0], index, group_of)
                if makers
                else f"untraced#{index}",
                size=tracer.spaces.sizes[comp[0]],
                members=tuple(comp),
                producers=tuple(makers),
                consumers=tuple(by_consumer.get(index, [])),
                norms=tuple(by_norm.get(index, [])),
                refusals=tuple(reasons),
            )
        )
    sizes = {space: tracer.spaces.sizes[space] for space in group_of}
    logger.debug("channel groups: %d", len(groups))
    tensors = tracer.graph.tensors()
    ranks = {name: tracer.rank(tensors[name]) for name in layouts if name in tensors}
    return ChannelGroups(
        layouts=layouts,
        ranks={name: rank for name, rank in ranks.items() if rank is not None},
        producers=producers,
        consumers=dict(tracer.consumers),
        norms=dict(tracer.norms),
        groups=groups,
        group_of=group_of,
        space_sizes=sizes,
        depthwise=set(tracer.depthwise),
        sites=sites,
        head_shapes={k: replace(v, layout=expand(v.layout)) for k, v in tracer.head_shapes.items()},
        head_tensors={name: expand(h.layout) for name, h in tracer.heads.items()},
        scaled={
            key: [(share, [expand(lay) for lay in lays]) for share, lays in terms]
            for key, terms in tracer.scaled.items()
        },
    )
