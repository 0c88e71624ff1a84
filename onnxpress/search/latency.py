"""Latency measured on the target, never estimated: a candidate against the baseline, as a ratio.

``OrtLatency`` runs both models with onnxruntime on this host (all graph optimizations, one
intra-op thread, as ``docs/BENCHMARKS.md`` measures), interleaved: each round times a
sample of runs of one model and then the other, the order flipping every round, and the
ratio is the median of the per-round ratios. A shared machine's bursts hit both models of a
round alike, so the ratio is far steadier than either time.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class LatencyResult:
    ratio: float  # candidate / baseline (< 1 is faster)
    baseline_ms: float  # median time of one run
    candidate_ms: float
    where: str  # what the latency was measured on, for the report

    def to_json(self) -> dict[str, float | str]:
        return {
            "ratio": round(self.ratio, 4),
            "baseline_ms": round(self.baseline_ms, 4),
            "candidate_ms": round(self.candidate_ms, 4),
            "where": self.where,
        }


class LatencyMeter(Protocol):
    where: str

    def measure(self, model: onnx.ModelProto) -> LatencyResult: ...


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ort_session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


class OrtLatency:
    """Interleaved onnxruntime timing of candidates against one baseline on this host."""

    def __init__(
        self,
        baseline: onnx.ModelProto,
        feed: Batch,
        rounds: int = 7,
        sample_seconds: float = 0.02,
        threads: int = 1,
    ) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, not {rounds}")
        self.feed = feed
        self.rounds = rounds
        self.threads = threads
        self.where = f"onnxruntime {ort.__version__} on this host ({cpu_name()}, {threads} thread)"
        self.baseline = ort_session(baseline, threads)
        self._run(self.baseline, 3)
        # runs per sample: enough that one sample of the baseline takes ~sample_seconds
        once = self._time(self.baseline, 3) / 3
        self.runs = max(1, min(1000, round(sample_seconds / max(once, 1e-6))))

    def _run(self, session: ort.InferenceSession, count: int) -> None:
        for _ in range(count):
            session.run(None, self.feed)

    def _time(self, session: ort.InferenceSession, count: int) -> float:
        start = time.perf_counter()
        self._run(session, count)
        return time.perf_counter() - start

    def measure(self, model: onnx.ModelProto) -> LatencyResult:
        candidate = ort_session(model, self.threads)
        self._run(candidate, 3)
        base_times, cand_times, ratios = [], [], []
        for index in range(self.rounds):
            if index % 2 == 0:
                base = self._time(self.baseline, self.runs)
                cand = self._time(candidate, self.runs)
            else:
                cand = self._time(candidate, self.runs)
                base = self._time(self.baseline, self.runs)
            base_times.append(base / self.runs)
            cand_times.append(cand / self.runs)
            ratios.append(cand / base)
        return LatencyResult(
            ratio=float(statistics.median(ratios)),
            baseline_ms=1e3 * statistics.median(base_times),
            candidate_ms=1e3 * statistics.median(cand_times),
            where=self.where,
        )
