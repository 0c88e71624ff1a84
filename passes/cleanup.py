"""Dead-node, Identity and duplicate-constant clean-up.

Identity(x) -> x: every consumer of an Identity's output reads its input instead. When the
Identity output is a graph output, the producer's output tensor is renamed to it so that
the graph's interface keeps its names. Then nodes whose outputs reach no graph output, and
unused initializers, are removed. Graph inputs are kept (the interface never changes).
Constants equal in dtype, shape and bytes (exporters' copies of one weight, constant folding's
copies of an Identity-shared one) become one: their consumers read the first of them.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.core.context import PassContext
from onnxpress.core.ir import remove_dead_nodes
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass


@dataclass(frozen=True)
class CleanupOptions:
    identity: bool = True  # remove Identity nodes
    dead_nodes: bool = True  # remove nodes that no graph output depends on
    dedupe: bool = True  # one constant for each set of equal ones


@register_pass("cleanup")
class Cleanup(Pass[CleanupOptions]):
    """Remove Identity nodes, dead nodes, duplicate constants and unused initializers."""

    options_type = CleanupOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        nodes_before = len(graph.nodes)
        consts_before = _count_constants(graph)
        if self.options.dead_nodes:
            # Dead consumers first, so that an Identity feeding a graph output is often the
            # only consumer of its input and can be removed.
            remove_dead_nodes(graph)
        if self.options.identity:
            result.count("identity_removed", self._remove_identities(graph, result))
        if self.options.dedupe:
            result.count("constants_merged", _merge_equal_constants(graph))
        if self.options.dead_nodes:
            remove_dead_nodes(graph)
            removed = nodes_before - len(graph.nodes) - result.counts.get("identity_removed", 0)
            result.count("dead_nodes_removed", removed)
            result.count("initializers_removed", consts_before - _count_constants(graph))
        return result

    @staticmethod
    def _remove_identities(graph: gs.Graph, result: PassResult) -> int:
        outputs = {id(t) for t in graph.outputs}
        inputs = {id(t) for t in graph.inputs}
        removed: set[int] = set()
        for node in graph.nodes:
            if node.op != "Identity" or len(node.inputs) != 1 or len(node.outputs) != 1:
                continue
            src, dst = node.inputs[0], node.outputs[0]
            if id(dst) in outputs:
                # Keep the graph output's name: the producer now writes the output tensor.
                if (
                    isinstance(src, gs.Constant)
                    or id(src) in inputs
                    or id(src) in outputs
                    or len(src.outputs) != 1
                    or len(src.inputs) != 1
                ):
                    result.refuse(
                        node.name,
                        "output is a graph output fed by an input, a constant or a shared tensor",
                    )
                    continue
                producer = src.inputs[0]
                node.inputs.clear()
                node.outputs.clear()
                producer.outputs[producer.outputs.index(src)] = dst
            else:
                for consumer in list(dst.outputs):
                    for i, tensor in enumerate(consumer.inputs):
                        if tensor is dst:
                            consumer.inputs[i] = src
                node.inputs.clear()
                node.outputs.clear()
            removed.add(id(node))
        if removed:
            graph.nodes = [n for n in graph.nodes if id(n) not in removed]
        return len(removed)


def _count_constants(graph: gs.Graph) -> int:
    return sum(1 for t in graph.tensors().values() if isinstance(t, gs.Constant))


def _merge_equal_constants(graph: gs.Graph) -> int:
    """Point the main graph's readers of a constant at the first constant equal to it (same
    dtype, shape and bytes); return how many constants lost all their readers that way.
    Graph outputs keep their own constant; readers inside subgraphs are left as they are."""
    outputs = {id(t) for t in graph.outputs}
    main = {id(n) for n in graph.nodes}
    by_layout: dict[tuple[str, tuple[int, ...]], list[gs.Constant]] = defaultdict(list)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and id(tensor) not in outputs:
            by_layout[(str(tensor.dtype), tuple(tensor.shape))].append(tensor)
    merged = 0
    for group in by_layout.values():
        if len(group) < 2:
            continue
        first: dict[bytes, gs.Constant] = {}
        for constant in sorted(group, key=lambda c: c.name):
            data = _bytes(constant)
            kept = first.setdefault(hashlib.blake2b(data, digest_size=16).digest(), constant)
            if kept is constant or _bytes(kept) != data:
                continue
            readers = [n for n in constant.outputs if id(n) in main]
            merged += bool(readers) and len(readers) == len(constant.outputs)
            for node in readers:
                for index, tensor in enumerate(node.inputs):
                    if tensor is constant:
                        node.inputs[index] = kept
    return merged


def _bytes(constant: gs.Constant) -> bytes:
    values = constant.values
    return bytes(np.ascontiguousarray(values.load() if hasattr(values, "load") else values).data)
