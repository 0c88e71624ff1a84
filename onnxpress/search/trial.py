"""One search trial: run a pipeline through the verified pass manager, then score the result.

The pass manager verifies every pass (checker, strict shape inference, onnxruntime against the
original model, and for int8 layers each target's emulated arithmetic); in a search its
numeric check only catches broken models (``VERIFY_BUDGET`` of relative L2 on every output),
because quality is what the accuracy objective measures, on held-out data, under each
target's integer arithmetic: onnxruntime where the target computes like this host, the
emulation of ``onnxpress.core.emulated_runner`` where it does not. The worst target counts.

A refusal, a failed verification, a crash or a timeout is a ``TrialFailed`` with its reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.context import StatisticsStore
from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.errors import OnnxpressError
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.manager import PassManager, VerifyConfig, time_limit
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.report import Report
from onnxpress.core.stats import model_stats
from onnxpress.core.targets import Target, arithmetics, host_target
from onnxpress.search.latency import LatencyMeter, LatencyResult
from onnxpress.search.objectives import (
    Scorer,
    TrialFailed,
    file_size,
    model_outputs,
)

logger = logging.getLogger(__name__)

VERIFY_BUDGET = 0.5  # relative L2 of any output vs the original: beyond it a model is broken
OBJECTIVES = {"accuracy": "maximize", "latency": "minimize", "size": "minimize"}


@dataclass
class Measured:
    """What a model scored: accuracy (worst target), bytes, MACs, latency."""

    accuracy: float
    bytes: int
    macs: int
    params: int
    latency: LatencyResult | None
    accuracy_by_target: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def values(self, objectives: list[str], baseline: Measured) -> list[float]:
        known = {
            "accuracy": self.accuracy,
            "size": self.bytes / max(baseline.bytes, 1),
            "latency": self.latency.ratio if self.latency else 1.0,
        }
        return [known[name] for name in objectives]

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "accuracy_by_target": self.accuracy_by_target,
            "bytes": self.bytes,
            "macs": self.macs,
            "params": self.params,
            "latency": self.latency.to_json() if self.latency else None,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class TrialResult:
    pipeline: str
    model: onnx.ModelProto
    measured: Measured
    choices: list[dict[str, Any]]  # per lossy pass: what it chose per layer


class Evaluator:
    """Measures models and runs trial pipelines for one search (all state measured once)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        calibration: CalibrationData,
        scorer: Scorer,
        latency: LatencyMeter | None,
        targets: tuple[Target, ...],
        seed: int = 0,
        trial_timeout: float | None = None,
        statistics: StatisticsStore | None = None,
    ) -> None:
        self.model = model
        self.statistics = statistics  # calibration statistics shared by the trials
        self.calibration = calibration
        self.scorer = scorer
        self.latency = latency
        self.targets = targets
        self.seed = seed
        self.trial_timeout = trial_timeout

    def accuracy(self, model: onnx.ModelProto) -> tuple[float, dict[str, float]]:
        """The metric on the evaluation set under each target's arithmetic; the worst."""
        by_target: dict[str, float] = {}
        host = host_target().arithmetic
        quantized = bool(integer_layers(model))
        for arithmetic, names in arithmetics(self.targets).items():
            if arithmetic == host or not quantized:
                outputs = model_outputs(model, self.scorer.eval_set)
            else:
                outputs = model_outputs(
                    model, self.scorer.eval_set, EmulatedRunner(model, arithmetic)
                )
            value = self.scorer.score(outputs)
            by_target.update(dict.fromkeys(names, value))
        return min(by_target.values()), by_target

    def measure(self, model: onnx.ModelProto, with_latency: bool) -> Measured:
        start = time.perf_counter()
        accuracy, by_target = self.accuracy(model)
        stats = model_stats(model)
        latency = self.latency.measure(model) if with_latency and self.latency else None
        return Measured(
            accuracy=accuracy,
            bytes=file_size(model),
            macs=int(stats.macs or 0),
            params=int(stats.params),
            latency=latency,
            accuracy_by_target=by_target,
            seconds=time.perf_counter() - start,
        )

    def run(self, pipeline: str, with_latency: bool) -> TrialResult:
        """Build and score one pipeline; TrialFailed with the reason when it cannot."""
        timeout = self.trial_timeout
        expired = TrialFailed(f"timed out after {timeout:g} s (--trial-timeout)" if timeout else "")
        try:
            with time_limit(timeout, lambda: expired):
                passes = parse_pipeline(pipeline)
                verify = VerifyConfig(level="numeric", metric="rel-l2", budget=VERIFY_BUDGET)
                manager = PassManager(
                    passes,
                    verify,
                    self.calibration,
                    self.seed,
                    targets=self.targets,
                    statistics=self.statistics,
                )
                compressed, report = manager.run(self.model)
                measured = self.measure(compressed, with_latency)
        except TrialFailed:
            raise
        except OnnxpressError as exc:
            raise TrialFailed(_one_line(str(exc))) from None
        except (MemoryError, RecursionError) as exc:
            raise TrialFailed(f"{type(exc).__name__}") from None
        except Exception as exc:
            raise TrialFailed(f"crashed: {type(exc).__name__}: {_one_line(str(exc))}") from None
        return TrialResult(pipeline, compressed, measured, layer_choices(report))


def layer_choices(report: Report) -> list[dict[str, Any]]:
    """Per lossy pass, its per-layer outcome: kept channels, ranks, layers left float."""
    chosen = []
    for record in report.passes:
        if record.lossless:
            continue
        layers = []
        for detail in record.result.details:
            if detail.get("kind") == "group":
                layers.append(
                    {"layer": detail["group"], "kept": detail["kept"], "of": detail["channels"]}
                )
            elif "rank" in detail:
                layers.append(
                    {k: detail[k] for k in ("node", "weight", "rank", "full_rank") if k in detail}
                )
        float_layers = [
            r.node
            for r in record.result.refusals
            if "exclude" in r.reason or "fallback" in r.reason
        ]
        chosen.append(
            {
                "pass": record.spec,
                "counts": dict(record.result.counts),
                "layers": layers,
                "float_layers": float_layers,
            }
        )
    return chosen


def _one_line(text: str) -> str:
    return " ".join(text.split())
