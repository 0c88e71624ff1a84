"""Calibration statistics reused across models that compute a tensor the same way.

A search builds dozens of models from one original; each ``qdq`` trial streams the
calibration data through its float graph to observe the same activations again, although
above the layers a trial changed, the graph is the one an earlier trial observed. Here each
tensor is named by a structural key of its ancestor cone (``cone_keys``): the ops, their
attributes and output slots, the bytes of every initializer and constant, and the graph
inputs it reads, but no intermediate tensor or node name. Two models give a tensor the same
key exactly when they compute it by the same graph from the same inputs, so its statistics
on the same calibration batches (``CalibrationData.fingerprint``) are the same, whatever the
graph below it does.

``StatisticsCache`` keeps observer states under ``statistics_key(cone, data, kind)`` in
memory and, given a folder, as one ``.npz`` per entry (written to a temporary name, then
renamed: processes sharing the folder never read a partial file), so a resumed search and
several workers share what any of them observed. ``observer_state`` / ``observer_from_state``
turn the observers of ``onnxpress.calibration.observers`` into arrays and back (no pickle).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.calibration.observers import HistogramObserver, MeanObserver, MinMaxObserver

logger = logging.getLogger(__name__)

Observer = HistogramObserver | MinMaxObserver | MeanObserver
KINDS: dict[str, type[Observer]] = {
    "histogram": HistogramObserver,
    "minmax": MinMaxObserver,
    "mean": MeanObserver,
}
UNCACHEABLE_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}
UNCACHEABLE_OPS |= {"Multinomial", "Bernoulli", "Dropout"}  # Dropout: its mask output


def _digest(*parts: bytes | str | memoryview) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        h.update(size.to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _tensor_digest(tensor: onnx.TensorProto) -> str:
    array = numpy_helper.to_array(tensor)
    return _digest("tensor", str(array.dtype), str(array.shape), np.ascontiguousarray(array).data)


def _attribute_digest(attr: onnx.AttributeProto) -> str | None:
    """Digest of an attribute by value (tensor names left out); None for a subgraph, whose
    outer-scope reads the cone does not follow."""
    if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        return None
    if attr.type == onnx.AttributeProto.TENSOR:
        return _digest(attr.name, _tensor_digest(attr.t))
    if attr.type == onnx.AttributeProto.TENSORS:
        return _digest(attr.name, *(_tensor_digest(t) for t in attr.tensors))
    return _digest(attr.SerializeToString(deterministic=True))


def cone_keys(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str | None]:
    """Tensor name -> the key of its ancestor cone in ``model`` (None where the cone holds a
    subgraph, a random op or a tensor that nothing defines)."""
    graph = model.graph
    keys: dict[str, str | None] = {"": "absent"}
    for tensor in graph.initializer:
        keys[tensor.name] = _tensor_digest(tensor)
    for value in graph.input:
        if value.name not in keys:  # an input shadowed by an initializer keeps its value
            keys[value.name] = _digest("input", value.name, value.type.SerializeToString())
    producers = {out: node for node in graph.node for out in node.output if out}
    node_keys: dict[int, list[str | None]] = {}

    def node_key(node: onnx.NodeProto) -> list[str | None]:
        attrs = [_attribute_digest(a) for a in sorted(node.attribute, key=lambda a: a.name)]
        inputs = [keys.get(name) for name in node.input]
        if node.op_type in UNCACHEABLE_OPS or None in attrs or None in inputs:
            return [None] * len(node.output)
        base = _digest(
            node.domain, node.op_type, *[a or "" for a in attrs], *[i or "" for i in inputs]
        )
        return [_digest(base, str(i)) for i in range(len(node.output))]

    for name in names:
        stack = [name]
        while stack:  # depth first, without recursion (deep graphs)
            current = stack[-1]
            if current in keys:
                stack.pop()
                continue
            node = producers.get(current)
            if node is None:
                keys[current] = None
                stack.pop()
                continue
            missing = [i for i in node.input if i not in keys]
            if missing:
                stack.extend(missing)
                continue
            outputs = node_keys.setdefault(id(node), node_key(node))
            for out, key in zip(node.output, outputs, strict=True):
                keys[out] = key
            stack.pop()
    return {name: keys.get(name) for name in names}


def statistics_key(cone: str, data: str, kind: str) -> str:
    """The cache key of one tensor's statistics of ``kind`` on the data ``data``."""
    return _digest("statistics", cone, data, kind)[:40]


def observer_state(observer: Observer, batches: int) -> dict[str, np.ndarray]:
    """An observer (and the number of batches it saw) as named arrays."""
    kind = next(k for k, cls in KINDS.items() if type(observer) is cls)
    state = {"kind": np.array(kind), "batches": np.array(batches)}
    for name, value in vars(observer).items():
        if value is None:
            state[f"none:{name}"] = np.array(0)
        elif isinstance(value, np.ndarray):
            state[f"array:{name}"] = value
        else:
            state[f"scalar:{name}"] = np.array(value)
    return state


def observer_from_state(state: dict[str, np.ndarray]) -> tuple[Observer, int]:
    """The observer ``observer_state`` saved, and its batch count."""
    cls = KINDS[str(state["kind"])]
    observer: Observer = object.__new__(cls)
    for key, value in state.items():
        tag, _, name = key.partition(":")
        if tag == "none":
            setattr(observer, name, None)
        elif tag == "array":
            setattr(observer, name, np.array(value))
        elif tag == "scalar":
            setattr(observer, name, value.item())
    return observer, int(state["batches"])


class StatisticsCache:
    """Observer states by key: in memory, and in ``folder`` when one is given."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.npz"

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        state = self._memory.get(key)
        file = self._file(key)
        if state is None and file is not None and file.is_file():
            try:
                with np.load(file, allow_pickle=False) as data:
                    state = {name: data[name] for name in data.files}
            except (OSError, ValueError) as exc:  # a damaged entry is measured again
                logger.warning("calibration cache entry %s unreadable: %s", file, exc)
                state = None
            if state is not None:
                self._memory[key] = state
        if state is None:
            self.misses += 1
        else:
            self.hits += 1
        return state

    def store(self, key: str, state: dict[str, np.ndarray]) -> None:
        self._memory[key] = state
        file = self._file(key)
        if file is None:
            return
        file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".", suffix=".npz", dir=file.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                np.savez(stream, **state)  # type: ignore[arg-type]
            os.replace(temporary, file)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
