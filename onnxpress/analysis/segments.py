"""Layer-wise calibration in linear time: each wave runs only the graph since the last one.

A layer-wise pass (``svd``, for instance) asks, wave after wave, for tensors further and
further down a model whose upstream part it no longer changes: the inputs of the layers it
is about to rewrite. Running the whole model from its inputs for every wave costs
waves × model (quadratic in depth); onnxruntime computes every node of a session whatever
outputs are fetched. ``SegmentCapture`` keeps, per calibration batch, the tensors that
cross the border of the part already computed (a transformer's residual stream and the
current layer inputs, a few MB per batch), and runs each request as a sub-model from those
tensors: the region of nodes upstream of what is asked that were not computed before.

This is exact as long as the nodes already computed are never rewritten later, which
holds for layer waves in topological order (a wave rewrites only nodes downstream of the
tensors it asked for); a request that would run a node again, a model with unnamed or
duplicate node names or with subgraphs (If, Loop, Scan: outer-scope reads), and a store
over ``limit_bytes`` turn streaming off: from then on requests run from the inputs. Stored
tensors that no node outside the computed region reads any more are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from onnxpress.core.calibration_data import Batch
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)

DEFAULT_LIMIT_BYTES = 512 * 2**20


def _streamable(model: onnx.ModelProto) -> bool:
    """Unique node names and no subgraphs (whose outer-scope reads a region would miss)."""
    names = [node.name for node in model.graph.node]
    if not all(names) or len(set(names)) != len(names):
        return False
    return not any(
        attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for node in model.graph.node
        for attr in node.attribute
    )


class SegmentCapture:
    """Per calibration batch, tensors of a model computed segment by segment."""

    def __init__(
        self, batches: Callable[[], Iterable[Batch]], limit_bytes: int = DEFAULT_LIMIT_BYTES
    ) -> None:
        self.batches = batches
        self.limit_bytes = limit_bytes
        self.stored: list[dict[str, np.ndarray]] = []  # per batch
        self.covered: set[str] = set()  # names of the nodes already computed
        self.streaming = True

    @property
    def stored_bytes(self) -> int:
        return sum(a.nbytes for batch in self.stored for a in batch.values())

    def run(self, model: onnx.ModelProto, wanted: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """Per batch (in the order of ``batches``), the values of ``wanted``."""
        wanted = list(dict.fromkeys(wanted))
        region: list[onnx.NodeProto] | None = None
        if self.streaming and _streamable(model):
            region = self._region(model, wanted, set(self.stored[0]) if self.stored else set())
        if region is None:
            self.streaming, self.stored, self.covered = False, [], set()
            yield from self._run_region(model, list(model.graph.node), wanted, store=False)
        else:
            yield from self._run_region(model, region, wanted, store=True)

    def _run_region(
        self, model: onnx.ModelProto, region: list[onnx.NodeProto], wanted: list[str], store: bool
    ) -> Iterator[dict[str, np.ndarray]]:
        graph_inputs = {i.name for i in model.graph.input}
        available = set(self.stored[0]) if self.stored else set()
        region_names = {n.name for n in region}
        outside = [n for n in model.graph.node if n.name not in self.covered | region_names]
        read_outside = {t for n in outside for t in n.input} | {o.name for o in model.graph.output}
        produced = [t for n in region for t in n.output if t in read_outside] if store else []
        keep = [t for t in available if t in read_outside]
        used = sorted(available & ({t for n in region for t in n.input} | set(wanted)))
        computed = [t for t in wanted if t not in available and t not in graph_inputs]
        outputs = list(dict.fromkeys([*computed, *produced]))
        runner = Runner(self._sub_model(model, region, used, outputs)) if outputs else None
        fed = {i.name for i in runner.session.get_inputs()} if runner else set()
        new_store: list[dict[str, np.ndarray]] = []
        total = 0
        for index, batch in enumerate(self.batches()):
            previous = self.stored[index] if index < len(self.stored) else {}
            feed = {**batch, **{t: previous[t] for t in used}}
            values = {t: feed[t] for t in wanted if t in feed}
            if runner is not None:
                run = runner({k: v for k, v in feed.items() if k in fed})
                values.update(zip(outputs, run, strict=True))
            yield {t: values[t] for t in wanted}
            if store:
                state = {t: previous[t] for t in keep} | {t: values[t] for t in produced}
                total += sum(a.nbytes for a in state.values())
                new_store.append(state)
        if not store:
            return
        if total > self.limit_bytes:
            logger.info(
                "segment capture: %d MB of border tensors over the %d MB limit; "
                "running from the inputs from now on",
                total >> 20,
                self.limit_bytes >> 20,
            )
            self.streaming, self.stored, self.covered = False, [], set()
            return
        self.stored = new_store
        self.covered |= region_names

    def _region(
        self, model: onnx.ModelProto, wanted: Sequence[str], available: set[str]
    ) -> list[onnx.NodeProto] | None:
        """Nodes upstream of ``wanted`` not behind ``available``; None if one was run before."""
        producer = {t: i for i, n in enumerate(model.graph.node) for t in n.output}
        stack = [t for t in wanted if t not in available]
        needed: set[int] = set()
        seen: set[str] = set()
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in available or tensor not in producer:
                continue
            seen.add(tensor)
            index = producer[tensor]
            if index not in needed:
                needed.add(index)
                stack.extend(model.graph.node[index].input)
        nodes = [n for i, n in enumerate(model.graph.node) if i in needed]
        if any(n.name in self.covered for n in nodes):
            return None
        return nodes

    def _sub_model(
        self,
        model: onnx.ModelProto,
        nodes: list[onnx.NodeProto],
        stored_inputs: list[str],
        outputs: list[str],
    ) -> onnx.ModelProto:
        graph = model.graph
        read = {t for n in nodes for t in n.input} | set(outputs)
        inits = [t for t in graph.initializer if t.name in read]
        inputs = [i for i in graph.input if i.name in read]
        sample = self.stored[0] if self.stored else {}
        for name in stored_inputs:
            dtype = helper.np_dtype_to_tensor_dtype(sample[name].dtype)
            inputs.append(helper.make_tensor_value_info(name, dtype, None))
        sub = helper.make_graph(
            nodes,
            graph.name,
            inputs,
            [helper.make_empty_tensor_value_info(t) for t in outputs],
            inits,
        )
        out = helper.make_model(sub, opset_imports=list(model.opset_import))
        out.ir_version = model.ir_version
        out.functions.extend(model.functions)
        return out
