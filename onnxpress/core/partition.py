"""Run a very large model on onnxruntime as a sequence of smaller sessions.

onnxruntime's session creation grows faster than linearly with the number of nodes and
initializers (measured in docs/BENCHMARKS.md: 20x the time for 4x an initializer-heavy
graph). The verifier creates a session after every pass, so for graphs above a size
threshold it splits the topologically sorted node list into chunks; each chunk becomes a
model whose inputs are the tensors it reads from earlier chunks and whose outputs are the
tensors read later. Running the chunks in order with the same kernels gives the same
outputs as one session, and the cost of creating sessions stays linear.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

CHUNK_NODES = 1000


class NotPartitionable(Exception):
    """The model cannot be split safely (subgraphs, unknown tensor types)."""


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


class PartitionedRunner:
    """Callable like verify.Runner: ``runner(feed) -> list of graph outputs``."""

    def __init__(
        self,
        model: onnx.ModelProto,
        make_session: Callable[
            [onnx.ModelProto], Callable[[dict[str, np.ndarray]], list[np.ndarray]]
        ],
        chunk_nodes: int = CHUNK_NODES,
    ) -> None:
        g = model.graph
        nodes = list(g.node)
        if any(_has_subgraph(n) for n in nodes):
            raise NotPartitionable("a node holds a subgraph")
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        types: dict[str, onnx.TypeProto] = {}
        for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type
        initializers = {t.name: t for t in g.initializer}
        self.output_names = [o.name for o in g.output]
        self._constant_outputs = {
            name: numpy_helper.to_array(initializers[name])
            for name in self.output_names
            if name in initializers
        }
        last_use: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for name in node.input:
                last_use[name] = i
        for name in self.output_names:
            last_use[name] = len(nodes)
        self._chunks: list[tuple[list[str], list[str], Callable[..., list[np.ndarray]]]] = []
        self._release: list[list[str]] = []
        for start in range(0, len(nodes), chunk_nodes):
            chunk = nodes[start : start + chunk_nodes]
            end = start + len(chunk)
            produced = {o for n in chunk for o in n.output if o}
            reads = list(dict.fromkeys(i for n in chunk for i in n.input if i))
            inputs = [name for name in reads if name not in produced and name not in initializers]
            inits = [
                initializers[name]
                for name in reads
                if name in initializers and name not in produced
            ]
            outputs = [o for n in chunk for o in n.output if o and last_use.get(o, -1) >= end]
            missing = [name for name in inputs + outputs if name not in types]
            if missing:
                raise NotPartitionable(f"no inferred type for tensor '{missing[0]}'")
            sub = helper.make_graph(
                chunk,
                f"{g.name}_part{start // chunk_nodes}",
                [helper.make_value_info(name, types[name]) for name in inputs],
                [helper.make_value_info(name, types[name]) for name in outputs],
                inits,
            )
            part = helper.make_model(
                sub, opset_imports=list(model.opset_import), functions=list(model.functions)
            )
            part.ir_version = model.ir_version
            self._chunks.append((inputs, outputs, make_session(part)))
            self._release.append([name for name in reads if last_use.get(name, -1) < end])
        logger.debug("partitioned %d nodes into %d sessions", len(nodes), len(self._chunks))

    def __call__(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        env: dict[str, np.ndarray] = dict(feed)
        env.update(self._constant_outputs)
        for (inputs, outputs, session), release in zip(self._chunks, self._release, strict=True):
            values = session({name: env[name] for name in inputs})
            env.update(zip(outputs, values, strict=True))
            for name in release:
                if name not in feed:
                    env.pop(name, None)
        return [env[name] for name in self.output_names]
