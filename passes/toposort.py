"""Topological sort: reorder graph.nodes so that every node follows the producers of its inputs.

The rewrite changes node order only, never nodes or tensors. Nodes are ordered by depth
(distance from the graph inputs), ties in their existing order: the same order as
onnx-graphsurgeon's sort, computed in linear time (onnxpress.core.ir.toposort). Every export
sorts the same way, so in a pipeline this pass mostly documents the order it leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxpress.core.context import PassContext, TensorShapes
from onnxpress.core.ir import toposort
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass


@dataclass(frozen=True)
class ToposortOptions:
    """No options: the order is fully determined by the graph and its current order."""


@register_pass("toposort")
class Toposort(Pass[ToposortOptions]):
    """Sort nodes topologically by depth, ties in their existing order."""

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
