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

Border tensors beyond ``spill_bytes`` per capture (a transformer's 1536-wide FFN activations
over 16 batches are 200 MB) are written to a temporary folder on disk, one uncompressed
.npz per batch, and read back one tensor at a time when a region needs them: the store
then costs disk and page cache, not the process's memory.

Each region's sub-model holds its small initializers; the large ones (``FEED_BYTES`` and
up: the weights) become inputs of the session, fed as arrays read from the model. A region
then costs one copy of its weights, not three (a sub-model proto, its serialization and
onnxruntime's own), and a caller may feed other values for them: ``rest`` gives a runner
of everything after the border that the probes of a layer-wise analysis feed altered
weights (one session per border, one run per probe, each only from that layer on).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.core.calibration_data import Batch
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)

DEFAULT_LIMIT_BYTES = 512 * 2**20
FEED_BYTES = 256 * 2**10  # initializers at least this large are fed to a region's session
SPILL_BYTES = 64 * 2**20  # border tensors kept in memory per capture; the rest go to disk


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


class WeightArrays:
    """Initializers as arrays, one array per distinct content while any region uses it: the
    regions of a student and of its teacher that read the same (unchanged) weight share it."""

    def __init__(self) -> None:
        self._arrays: weakref.WeakValueDictionary[tuple[str, bytes], np.ndarray] = (
            weakref.WeakValueDictionary()
        )

    def get(self, tensor: onnx.TensorProto) -> np.ndarray:
        key = (tensor.name, hashlib.blake2b(tensor.SerializeToString(), digest_size=20).digest())
        array = self._arrays.get(key)
        if array is None:
            array = numpy_helper.to_array(tensor)
            self._arrays[key] = array
        return array


class _Spilled(Mapping[str, np.ndarray]):
    """One batch's border tensors in an uncompressed .npz on disk, each read on access."""

    def __init__(self, path: Path, state: Mapping[str, np.ndarray]) -> None:
        self.path = path
        self.names = list(state)
        np.savez(path, *(state[name] for name in self.names))  # arr_0, ...: names hold '/'

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        with np.load(self.path, allow_pickle=False) as archive:
            return archive[f"arr_{self.names.index(name)}"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _drop(state: Mapping[str, np.ndarray]) -> None:
    if isinstance(state, _Spilled):
        state.path.unlink(missing_ok=True)


@dataclass
class _Border:
    """What one region's stream reads, yields and stores."""

    wanted: list[str]
    used: list[str]  # stored tensors the region reads
    outputs: list[str]  # the region session's outputs
    produced: list[str]  # outputs stored for later regions
    keep: list[str]  # stored tensors still read later
    region_names: set[str]
    store: bool


class SegmentCapture:
    """Per calibration batch, tensors of a model computed segment by segment."""

    def __init__(
        self,
        batches: Callable[[], Iterable[Batch]],
        limit_bytes: int = DEFAULT_LIMIT_BYTES,
        arrays: WeightArrays | None = None,
        spill_bytes: int = SPILL_BYTES,
    ) -> None:
        self.batches = batches
        self.limit_bytes = limit_bytes
        self.spill_bytes = spill_bytes
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._files = 0
        # fed initializers, shared with other captures (a student's and its teacher's)
        self.arrays = arrays if arrays is not None else WeightArrays()
        self.stored: list[Mapping[str, np.ndarray]] = []  # per batch, in memory or spilled
        self.covered: set[str] = set()  # names of the nodes already computed
        self.streaming = True

    def _keep(self, state: dict[str, np.ndarray], in_memory: int) -> Mapping[str, np.ndarray]:
        """``state`` as it is, or written to disk once this wave's memory share is used."""
        size = sum(a.nbytes for a in state.values())
        if in_memory + size <= self.spill_bytes or any(a.dtype.hasobject for a in state.values()):
            return state
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="onnxpress-border-")
        self._files += 1
        return _Spilled(Path(self._folder.name) / f"border{self._files}.npz", state)

    def _reset(self) -> None:
        for state in self.stored:
            _drop(state)
        self.streaming, self.stored, self.covered = False, [], set()

    def run(self, model: onnx.ModelProto, wanted: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
        """Per batch (in the order of ``batches``), the values of ``wanted``.

        The region's session is built here, at once: the iterator keeps no reference to
        ``model``, which a caller may drop (an exported student) while it streams."""
        wanted = list(dict.fromkeys(wanted))
        region: list[onnx.NodeProto] | None = None
        if self.streaming and _streamable(model):
            region = self._region(model, wanted, set(self.stored[0]) if self.stored else set())
        if region is None:
            self._reset()
            return self._run_region(model, list(model.graph.node), wanted, store=False)
        return self._run_region(model, region, wanted, store=True)

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
        runner: Runner | None = None
        weights: dict[str, np.ndarray] = {}
        if outputs:
            sub, weights = self._sub_model(model, region, used, outputs)
            runner = Runner(sub)
        border = _Border(wanted, used, outputs, produced, keep, region_names, store)
        return self._stream(runner, weights, border)

    def _stream(
        self, runner: Runner | None, weights: dict[str, np.ndarray], border: _Border
    ) -> Iterator[dict[str, np.ndarray]]:
        wanted, used, outputs, produced, keep, store = (
            border.wanted,
            border.used,
            border.outputs,
            border.produced,
            border.keep,
            border.store,
        )
        fed = {i.name for i in runner.session.get_inputs()} if runner else set()
        total, in_memory, complete, stored = 0, 0, False, self.stored  # kept on a reset
        orphans: list[Mapping[str, np.ndarray]] = []
        try:
            for index, batch in enumerate(self.batches()):
                previous = stored[index] if index < len(stored) else {}
                feed = {**batch, **{t: previous[t] for t in used}}
                values = {t: feed[t] for t in wanted if t in feed}
                if runner is not None:
                    run = runner({k: v for k, v in {**feed, **weights}.items() if k in fed})
                    values.update(zip(outputs, run, strict=True))
                yield {t: values[t] for t in wanted}
                if not store:
                    continue
                # Each batch's border replaces its previous one at once: one store in memory.
                # Copied: onnxruntime's outputs live in its session's arena and would keep
                # all of it (hundreds of MB per region) alive as long as they are stored.
                state = {t: previous[t] for t in keep} | {t: np.array(values[t]) for t in produced}
                size = sum(a.nbytes for a in state.values())
                total += size
                if total > self.limit_bytes:
                    logger.info(
                        "segment capture: over %d MB of border tensors (the limit); "
                        "running from the inputs from now on",
                        self.limit_bytes >> 20,
                    )
                    store, orphans = False, stored  # still read by the rest of this wave
                    self.streaming, self.stored, self.covered = False, [], set()
                    continue
                kept = self._keep(state, in_memory)
                in_memory += 0 if isinstance(kept, _Spilled) else size
                if index < len(stored):
                    _drop(stored[index])
                    stored[index] = kept
                else:
                    stored.append(kept)
            complete = True
        finally:
            if store and not complete:  # a caller stopped early: the store is half-moved
                self._reset()
            for orphan in orphans:
                _drop(orphan)
        if store:
            self.covered |= border.region_names

    def rest(
        self, model: onnx.ModelProto, replaceable: Collection[str] = ()
    ) -> tuple[Callable[[dict[str, np.ndarray]], list[np.ndarray]], set[str]]:
        """A runner of the graph outputs on the first batch, from the stored border (from the
        inputs when not streaming), and the initializers it takes as inputs (the large ones
        and those in ``replaceable`` that it reads): a feed ``{name: array}`` replaces
        those weights for one run."""
        outputs = [o.name for o in model.graph.output]
        available = set(self.stored[0]) if self.streaming and self.stored else set()
        region = self._region(model, outputs, available) if self.streaming else None
        if region is None:
            region, available = list(model.graph.node), set()
        used = sorted(available & {t for n in region for t in n.input})
        sub, weights = self._sub_model(model, region, used, outputs, set(replaceable))
        runner = Runner(sub)
        del sub
        fed = {i.name for i in runner.session.get_inputs()}
        batch = next(iter(self.batches()))
        feed = {**batch, **{t: self.stored[0][t] for t in used}, **weights}

        def run(replaced: dict[str, np.ndarray]) -> list[np.ndarray]:
            return runner({k: v for k, v in {**feed, **replaced}.items() if k in fed})

        return run, set(weights)

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
        replaceable: set[str] | None = None,
    ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """The region as a model; its large initializers are inputs, returned as arrays."""
        graph = model.graph
        read = _reads(nodes) | set(outputs)
        inits, weights = [], {}
        inputs = [i for i in graph.input if i.name in read]
        declared = {i.name for i in inputs}
        for tensor in graph.initializer:
            if tensor.name not in read:
                continue
            if _nbytes(tensor) < FEED_BYTES and tensor.name not in (replaceable or ()):
                inits.append(tensor)
                continue
            weights[tensor.name] = self.arrays.get(tensor)
            if tensor.name not in declared:  # an initializer may be a graph input already
                inputs.append(
                    helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
                )
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
        return out, weights


def _nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer's values (0 for external data, which stays in the model)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if not np.issubdtype(dtype, np.number):
        return 0
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * dtype.itemsize


def _reads(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Names the nodes read, including those read from inside their subgraphs."""
    names: set[str] = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                names |= _reads(sub.node)
    return names
