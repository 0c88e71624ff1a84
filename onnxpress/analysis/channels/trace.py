"""The walk behind the channel-group analysis: its state and the helpers the rules use.

``Tracer`` holds the layout of every tensor met so far, the channel spaces (``SpaceGraph``)
and the layers that open, consume or normalize channels. The rules of
``onnxpress.analysis.channels.rules`` read and extend it node by node in topological order;
``ChannelGroups.compute`` (groups.py) then refuses channels that reach a graph output and
turns the connected components of the space graph into ``ChannelGroup`` records.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.layout import Layout, Segment, SpaceGraph, node_key
from onnxpress.core.context import TensorShapes

logger = logging.getLogger(__name__)


def topological_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes in a topological order, without reordering the graph itself."""
    index = {id(node): i for i, node in enumerate(graph.nodes)}
    order = nx.DiGraph()
    order.add_nodes_from(range(len(graph.nodes)))
    for i, node in enumerate(graph.nodes):
        for tensor in node.inputs:
            for producer in tensor.inputs:
                if id(producer) in index:
                    order.add_edge(index[id(producer)], i)
    return [graph.nodes[i] for i in nx.lexicographical_topological_sort(order)]


def constant_array(tensor: gs.Tensor | None) -> np.ndarray | None:
    """The value of a gs.Constant or of a Constant node's output, else None."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


class Tracer:
    """State of the walk: layouts so far, spaces, and the layers met. Rules call its helpers."""

    def __init__(self, graph: gs.Graph, shapes: TensorShapes) -> None:
        self.graph = graph
        self.shapes = shapes
        self.opset = int(graph.opset or 0)
        self.spaces = SpaceGraph()
        self.layouts: dict[str, Layout] = {}
        self.producers: dict[str, Layout] = {}
        self.consumers: dict[str, str] = {}
        self.norms: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.depthwise: set[str] = set()
        # multi-head attention (attention.py): split heads, head Reshapes, sites, and the
        # nodes whose MACs scale with kept channels they neither produce nor consume
        self.heads: dict[str, Any] = {}
        self.head_shapes: dict[str, Any] = {}
        self.sites: list[Any] = []
        self.scaled: dict[str, list[tuple[float, list[Layout]]]] = {}

    # tensors ---------------------------------------------------------------------------
    def layout(self, tensor: gs.Tensor | None) -> Layout | None:
        if tensor is None or not tensor.name or tensor.name not in self.layouts:
            return None
        return self.spaces.expand(self.layouts[tensor.name])

    def set(self, tensor: gs.Tensor, layout: Layout | None) -> None:
        if layout is not None and tensor.name:
            self.layouts[tensor.name] = layout

    def dims(self, tensor: gs.Tensor) -> list[int | None] | None:
        value = constant_array(tensor)
        if value is not None:
            return list(value.shape)
        dims = self.shapes.get(tensor.name)
        if dims is None and tensor.shape is not None:
            dims = [d if isinstance(d, int) and d >= 0 else None for d in tensor.shape]
        return dims

    def rank(self, tensor: gs.Tensor) -> int | None:
        dims = self.dims(tensor)
        return None if dims is None else len(dims)

    def length(self, layout: Layout) -> int:
        return self.spaces.length(layout)

    # records ---------------------------------------------------------------------------
    def where(self, node: gs.Node) -> str:
        return f"{node.op} '{node.name or node_key(node)}'"

    def refuse(self, layout: Layout | None, node: gs.Node, reason: str) -> None:
        if layout is not None:
            self.spaces.refuse(layout, f"{self.where(node)}: {reason}")

    def refuse_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            self.refuse(self.layout(tensor), node, reason)

    def refuse_captures(self, node: gs.Node) -> None:
        """Refuse channels that a subgraph (If/Loop/Scan body) reads from the outer graph."""
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                for inner in value.nodes:
                    for tensor in inner.inputs:
                        self.refuse(self.layout(tensor), node, "a subgraph reads the channels")
                    self.refuse_captures(inner)

    def consume(self, node: gs.Node, tensor: gs.Tensor, axis: int, reason: str) -> None:
        """``node`` contracts the channels of ``tensor`` on ``axis``; elsewhere: refused."""
        layout = self.layout(tensor)
        if layout is not None and layout.axis != axis:
            self.refuse(layout, node, reason)
        elif layout is not None:
            self.consumers[node_key(node)] = tensor.name

    def new_producer(self, node: gs.Node, size: int, axis: int) -> Layout:
        key = node_key(node)
        layout = Layout(axis, (Segment(self.spaces.new(size)),))
        self.producers[key] = layout
        self.names[key] = node.name or key
        return layout

    def opaque(self, node: gs.Node, tensor: gs.Tensor, size: int, axis: int) -> Layout:
        """Channels that no prunable layer produced: a space that is refused from the start."""
        reason = f"{self.where(node)}: channels of '{tensor.name}' come from no prunable layer"
        return Layout(axis, (Segment(self.spaces.new(size, reason)),))

    def identify(self, node: gs.Node, layouts: list[Layout]) -> None:
        for other in layouts[1:]:
            reason = self.spaces.identify(layouts[0], other)
            if reason:
                self.refuse(layouts[0], node, reason)
                self.refuse(other, node, reason)

    # result ----------------------------------------------------------------------------
    def group_name(self, key: str, group: int, group_of: dict[int, int]) -> str:
        """The producer's name, with the channel range when the group is a piece of it."""
        layout = self.spaces.expand(self.producers[key])
        if len({group_of[seg.space] for seg in layout.segments}) == 1:
            return self.names[key]
        offset = 0
        for seg in layout.segments:
            size = self.spaces.sizes[seg.space]
            if group_of[seg.space] == group:
                return f"{self.names[key]}[{offset}:{offset + size}]"
            offset += size
        return self.names[key]


def attr(node: gs.Node, name: str, default: Any) -> Any:
    """An attribute of ``node``, or ``default``."""
    return node.attrs.get(name, default)


def int_list(node: gs.Node, name: str, input_index: int) -> list[int] | None:
    """An integer list given as an attribute (older opsets) or a constant input."""
    if name in node.attrs:
        return [int(v) for v in node.attrs[name]]
    if len(node.inputs) > input_index and node.inputs[input_index].name:
        value = constant_array(node.inputs[input_index])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    return None


def is_used(tensor: gs.Tensor, tracer: Tracer) -> bool:
    """Whether a node or a graph output reads ``tensor``."""
    return bool(tensor.name) and (
        bool(tensor.outputs) or any(t is tensor for t in tracer.graph.outputs)
    )


def static_prod(dims: list[int | None]) -> int | None:
    """The product of the dimensions, None if one is unknown."""
    return None if any(d is None for d in dims) else math.prod(d for d in dims if d is not None)
