"""``search --measure tvm`` and ``--measure rpc://HOST:PORT/KEY``: latency of TVM libraries.

The baseline and each candidate are compiled with ``onnxpress compile``'s backend for the
first ``--target`` (static shapes: the timed batch) and timed with TVM's time evaluator, here
(``tvm``) or uploaded to the device a TVM RPC tracker hands out under KEY (``rpc://``), in
alternating rounds; the ratio is the median of the per-round ratios. This lives in the CLI
layer because ``onnxpress.search`` may not import the backends; the search gets it as a
latency factory.
"""

from __future__ import annotations

import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.rpc import RpcSpec, check_tracker, time_library
from onnxpress.backends.tvm.targets import parse_target
from onnxpress.search.latency import LatencyMeter, LatencyResult
from onnxpress.search.objectives import SearchError

RPC_PATTERN = re.compile(r"rpc://([^:/]+):(\d+)/(.+)")


def parse_measure(text: str) -> RpcSpec | None:
    """None for ``tvm`` (this host), the tracker and key for ``rpc://HOST:PORT/KEY``."""
    if text == "tvm":
        return None
    match = RPC_PATTERN.fullmatch(text)
    if not match:
        raise SearchError(f"--measure '{text}': expected ort, tvm or rpc://HOST:PORT/KEY")
    return RpcSpec(match.group(1), int(match.group(2)), match.group(3))


class TvmLatency:
    """Compiled-library timing of candidates against one baseline, here or over RPC."""

    def __init__(
        self,
        baseline: onnx.ModelProto,
        feed: dict[str, np.ndarray],
        target: str,
        rpc: RpcSpec | None,
        rounds: int = 3,
    ) -> None:
        self.spec = parse_target(target)
        self.rpc = rpc
        self.rounds = rounds
        self.shapes = {name: list(array.shape) for name, array in feed.items()}
        self._folder = tempfile.TemporaryDirectory(prefix="onnxpress-search-tvm-")
        place = f"over RPC (tracker {rpc.host}:{rpc.port}, key {rpc.key})" if rpc else "here"
        self.where = f"TVM library for {self.spec.name}, timed {place}"
        if rpc is not None:
            check_tracker(rpc)
        self._count = 0
        self.baseline, self.inputs = self._compile(baseline)

    def _compile(self, model: onnx.ModelProto) -> tuple[Path, list[dict[str, Any]]]:
        self._count += 1
        folder = Path(self._folder.name) / f"model-{self._count}"
        result = compile_model(model, self.spec, folder, input_shapes=self.shapes, verify=False)
        return result.library, result.manifest["inputs"]

    def _time(self, library: Path) -> float:
        return float(time_library(library, self.rpc, self.inputs, repeat=3)["median_ms"])

    def measure(self, model: onnx.ModelProto) -> LatencyResult:
        library, _ = self._compile(model)
        base_times, cand_times = [], []
        for index in range(self.rounds):
            pair = (self.baseline, library) if index % 2 == 0 else (library, self.baseline)
            first, second = self._time(pair[0]), self._time(pair[1])
            base, cand = (first, second) if index % 2 == 0 else (second, first)
            base_times.append(base)
            cand_times.append(cand)
        ratios = [c / b for c, b in zip(cand_times, base_times, strict=True)]
        return LatencyResult(
            ratio=float(statistics.median(ratios)),
            baseline_ms=statistics.median(base_times),
            candidate_ms=statistics.median(cand_times),
            where=self.where,
        )


def tvm_latency_factory(measure: str, target: str) -> Any:
    """A ``search(latency_factory=...)`` for ``--measure tvm|rpc://...``."""
    rpc = parse_measure(measure)

    def make(baseline: onnx.ModelProto, feed: dict[str, np.ndarray]) -> LatencyMeter:
        return TvmLatency(baseline, feed, target, rpc)

    return make
