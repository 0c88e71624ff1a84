"""Topological sort: reorder graph.nodes so that every node follows the producers of its inputs.

The rewrite changes node order only, never nodes or tensors. Ties keep the original
relative order, so an already-sorted graph is left exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxpress.context import PassContext, TensorShapes
from onnxpress.ir import toposort
from onnxpress.pass_base import Pass, PassResult
from onnxpress.registry import register_pass


@dataclass(frozen=True)
class ToposortOptions:
    """No options: the order is fully determined by the graph and its current order."""


@register_pass("toposort")
class Toposort(Pass[ToposortOptions]):
    """Sort nodes topologically, keeping the existing order among independent nodes."""

    options_type = ToposortOptions
    lossless = True
    preserves = (TensorShapes,)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        before = [id(n) for n in graph.nodes]
        toposort(graph)
        moved = sum(1 for a, b in zip(before, (id(n) for n in graph.nodes), strict=True) if a != b)
        result.count("moved", moved)
        return result
