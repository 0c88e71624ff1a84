"""A finishing step on the chosen Pareto front (``onnxpress search --distill``).

Each front model is handed to a ``Finisher`` (student, teacher, calibration data) -> (tuned
model, what was done): for ``--distill``, knowledge distillation from the original model
(``onnxpress.train.distill``, plugged in by the CLI: the search package does not import the
training one). The tuned model is measured again exactly like a trial (accuracy under each
target's arithmetic on the held-out set, size, latency interleaved with the baseline) and
replaces the trial's model only where its accuracy is higher, at a size and latency no more
than ``TOLERANCE`` above the trial's (distillation changes weights, not the graph, so those
differ by noise at most). Either way the front point records what happened.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import onnx
from optuna.trial import FrozenTrial

from onnxpress.core.calibration_data import CalibrationData
from onnxpress.search.trial import Evaluator, Measured

logger = logging.getLogger(__name__)

Finisher = Callable[
    [onnx.ModelProto, onnx.ModelProto, CalibrationData], tuple[onnx.ModelProto, dict[str, Any]]
]
TOLERANCE = 0.05  # relative size or latency growth still counted as "the same" after tuning


@dataclass
class Finished:
    """What the finishing step did to one front point."""

    kept: bool  # the tuned model replaced the trial's
    before: dict[str, float]  # objective values of the trial
    after: dict[str, float] | None  # of the tuned model (None: the step failed)
    measured: dict[str, Any] | None
    details: dict[str, Any]
    failure: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _no_worse(after: dict[str, float], before: dict[str, float]) -> bool:
    return all(after[k] <= before[k] * (1 + TOLERANCE) for k in ("size", "latency") if k in after)


def finish_front(
    front: list[FrozenTrial],
    models: dict[int, onnx.ModelProto],
    teacher: onnx.ModelProto,
    calibration: CalibrationData,
    finisher: Finisher,
    evaluator: Evaluator,
    objectives: tuple[str, ...],
    baseline: Measured,
) -> dict[int, Finished]:
    """Tune each front model; replace it in ``models`` where the tuned one is better."""
    done: dict[int, Finished] = {}
    with_latency = "latency" in objectives
    for trial in front:
        before = dict(zip(objectives, trial.values, strict=True))
        try:
            tuned, details = finisher(models[trial.number], teacher, calibration)
            scores = evaluator.measure(tuned, with_latency)
        except Exception as exc:  # a point that cannot be tuned keeps its model
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            logger.warning("trial %d not distilled: %s", trial.number, reason)
            done[trial.number] = Finished(False, before, None, None, {}, reason)
            continue
        after = dict(zip(objectives, scores.values(list(objectives), baseline), strict=True))
        kept = after["accuracy"] > before["accuracy"] and _no_worse(after, before)
        if kept:
            models[trial.number] = tuned
        logger.info(
            "trial %d distilled: accuracy %.4g -> %.4g (%s)",
            trial.number,
            before["accuracy"],
            after["accuracy"],
            "kept" if kept else "not kept",
        )
        done[trial.number] = Finished(kept, before, after, scores.to_json(), details)
    return done


def describe(finished: dict[str, Any] | None) -> str:
    """One line for a front point's ``distilled`` entry of search.json ("" if not tried)."""
    if not finished:
        return ""
    if finished.get("failure"):
        return f"failed: {finished['failure']}"
    before, after = finished["before"]["accuracy"], finished["after"]["accuracy"]
    verdict = "kept" if finished["kept"] else "not kept"
    return f"{verdict}: accuracy {before:.4g} -> {after:.4g}"
