"""``search(config)``: measure the baseline, build the space, run the study, return the front.

Everything that can be refused is refused before anything is written: the objectives and
sampler, the targets, the data, the metric (run once on the baseline: it must return a
finite number), the storage (opened), and the time budget (it must hold one trial; the
baseline's own measurement is a lower bound of a trial's cost).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna
from optuna.trial import FrozenTrial, TrialState

from onnxpress.calibration.cache import StatisticsCache
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.io import prepare_model
from onnxpress.core.manager import PassManager, VerifyConfig
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.targets import Target, parse_targets
from onnxpress.search.finish import Finished, Finisher, finish_front
from onnxpress.search.latency import LatencyMeter, OrtLatency
from onnxpress.search.objectives import (
    EvalSet,
    Scorer,
    SearchError,
    TrialFailed,
    load_metric,
    model_outputs,
)
from onnxpress.search.sensitivity import int8_ranking
from onnxpress.search.space import LOSSLESS_PREFIX, SearchSpace, build_space
from onnxpress.search.study import (
    FAILURE,
    WORKER,
    ReplayableSampler,
    counted,
    measured,
    open_storage,
    open_study,
    run_trials,
    study_name,
)
from onnxpress.search.trial import OBJECTIVES, Evaluator, Measured, TrialResult

logger = logging.getLogger(__name__)

STATISTICS = "calibration-statistics"  # folder in --out: onnxpress.calibration.cache entries
MEASURES = ("ort", "tvm", "rpc://HOST:PORT/KEY")
LATENCY_BATCH = 64  # samples per timed run (docs/BENCHMARKS.md measures at batch 64)


@dataclass(frozen=True)
class SearchConfig:
    model: str
    calibration: str
    out: Path
    eval_data: str | None = None
    metric: str | None = None
    targets: tuple[str, ...] = ("host",)
    measure: str = "ort"
    objectives: tuple[str, ...] = ("accuracy", "latency", "size")
    max_drop: float | None = None
    trials: int = 30
    time_budget: float | None = None  # seconds
    storage: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    worker: bool = False
    trial_timeout: float | None = None
    latency_rounds: int = 7
    reuse_statistics: bool = True  # calibration statistics shared by trials (in out/)
    # further single-pass pipelines to measure first, beside the references:
    # (pass, settings), e.g. ("prune", {"macs": 0.6, "multiple": 8}); see SearchSpace.single
    warm_start: tuple[tuple[str, dict[str, Any]], ...] = ()

    def check(self) -> None:
        unknown = [o for o in self.objectives if o not in OBJECTIVES]
        if unknown or not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise SearchError(
                f"objectives '{','.join(self.objectives)}': choose from {', '.join(OBJECTIVES)}"
                ", each once"
            )
        if "accuracy" not in self.objectives:
            raise SearchError("objectives must include accuracy")
        if self.measure not in ("ort", "tvm") and not self.measure.startswith("rpc://"):
            raise SearchError(f"--measure {self.measure}: expected {', '.join(MEASURES)}")
        if self.trials < 1:
            raise SearchError(f"--trials must be >= 1, not {self.trials}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise SearchError(f"--time-budget must be positive, not {self.time_budget}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise SearchError(f"--max-drop must be >= 0, not {self.max_drop}")
        if self.trial_timeout is not None and not self.trial_timeout > 0:
            raise SearchError(f"--trial-timeout must be positive, not {self.trial_timeout}")
        ReplayableSampler(self.sampler, self.seed)


@dataclass
class SearchOutcome:
    config: SearchConfig
    space: SearchSpace
    baseline: Measured
    study: optuna.Study
    front: list[FrozenTrial]
    references: dict[str, int]  # label of a single-pass pipeline -> its trial number
    models: dict[int, onnx.ModelProto] = field(default_factory=dict)  # front trial -> model
    where: str = ""
    ran: int = 0
    seconds: float = 0.0
    sensitivities: dict[str, float] = field(default_factory=dict)
    statistics: StatisticsCache | None = None  # its hits and misses: what trials reused
    finished: dict[int, Finished] = field(default_factory=dict)  # front trial -> --distill

    @property
    def trials(self) -> list[FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False) if counted(t)]


ProgressHook = Callable[[FrozenTrial, "SearchState"], None]
# (baseline model, timed batch) -> a latency meter: how --measure tvm|rpc:// is plugged in
LatencyFactory = Callable[[onnx.ModelProto, dict[str, np.ndarray]], LatencyMeter]


@dataclass
class SearchState:
    """What a progress display shows after each trial."""

    done: int
    total: int
    deadline: float | None
    front: list[FrozenTrial]
    objectives: tuple[str, ...]


def _digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def search(
    config: SearchConfig,
    on_trial: ProgressHook | None = None,
    latency_factory: LatencyFactory | None = None,
    finisher: Finisher | None = None,
) -> SearchOutcome:
    """Run (or resume, or join as a worker) the search; see the module docstring.
    ``latency_factory`` measures latency elsewhere than onnxruntime here (``--measure``);
    ``finisher`` tunes each front model afterwards (``--distill``; ``finish.py``)."""
    started = time.perf_counter()
    config.check()
    targets: tuple[Target, ...] = parse_targets(list(config.targets))
    model, _ = prepare_model(config.model)
    calibration = CalibrationData.from_path(config.calibration).fitted_to(model)
    calibration.validate(model)
    eval_set = (
        EvalSet.from_npz(config.eval_data, model)
        if config.eval_data
        else EvalSet.from_calibration(calibration)
    )
    metric = load_metric(config.metric) if config.metric else None
    reference = model_outputs(model, eval_set)
    scorer = Scorer(eval_set, reference, metric, config.metric or "agreement")
    scorer.score(reference)  # a metric that raises or returns NaN is refused here
    feed = {name: array[:LATENCY_BATCH] for name, array in eval_set.batches[0].items()}
    if config.measure == "ort":
        meter: LatencyMeter = OrtLatency(model, feed, rounds=config.latency_rounds)
    elif latency_factory is not None:
        meter = latency_factory(model, feed)
    else:
        raise SearchError(f"--measure {config.measure}: no latency factory was given")
    statistics = StatisticsCache(config.out / STATISTICS) if config.reuse_statistics else None
    evaluator = Evaluator(
        model,
        calibration,
        scorer,
        meter,
        targets,
        config.seed,
        config.trial_timeout,
        statistics,
    )
    with_latency = "latency" in config.objectives
    baseline = evaluator.measure(model, with_latency)
    if config.time_budget is not None and config.time_budget < baseline.seconds:
        raise SearchError(
            f"--time-budget {config.time_budget:g} s is shorter than one trial (measuring the "
            f"unchanged model alone takes {baseline.seconds:.1f} s)"
        )
    storage = open_storage(config.storage, config.out)
    prefixed, _ = PassManager(parse_pipeline(LOSSLESS_PREFIX), VerifyConfig(level="off")).run(model)
    ranking, errors, cached = int8_ranking(
        prefixed, calibration, targets, config.out / "sensitivity.json"
    )
    logger.info("int8 sensitivities %s", "from the cache" if cached else "measured")
    space = build_space(model, ranking)
    name = study_name(
        _digest(model),
        config.calibration,
        config.eval_data or "",
        config.metric or "",
        ",".join(config.objectives),
        ",".join(t.name for t in targets),
        config.measure,
        str(config.max_drop),
        config.sampler,
        str(config.seed),
        json.dumps(space.to_json(), sort_keys=True),
    )
    directions = [OBJECTIVES[o] for o in config.objectives]
    study = open_study(storage, name, directions, ReplayableSampler(config.sampler, config.seed))
    _enqueue_references(study, space, config.warm_start)
    memo: dict[int, TrialResult] = {}

    def objective(trial: optuna.Trial) -> list[float]:
        params = space.suggest(trial)
        pipeline = space.pipeline(params)
        trial.set_user_attr("pipeline", pipeline)
        trial.set_user_attr("worker", WORKER)
        earlier = _earlier_result(study, pipeline, trial.number)
        if earlier is not None:  # measured before (by any process): the same model
            return _repeat(trial, earlier, len(config.objectives))
        result = evaluator.run(pipeline, with_latency)
        scores = result.measured
        trial.set_user_attr("measured", scores.to_json())
        trial.set_user_attr("choices", result.choices)
        trial.set_user_attr("latency_where", scores.latency.where if scores.latency else "")
        if config.max_drop is not None:
            floor = baseline.accuracy - config.max_drop
            trial.set_user_attr("constraint", floor - scores.accuracy)
            trial.set_constraint("max-drop", floor - scores.accuracy)
        memo[trial.number] = result
        return scores.values(list(config.objectives), baseline)

    deadline = started + config.time_budget if config.time_budget is not None else None

    def progress(trial: FrozenTrial) -> None:
        front = study.best_trials
        on_front = {t.number for t in front}
        for number in [n for n in memo if n not in on_front]:
            del memo[number]  # only the current front's models are kept in memory
        if on_trial is not None:
            done = sum(1 for t in study.get_trials(deepcopy=False) if counted(t))
            on_trial(trial, SearchState(done, config.trials, deadline, front, config.objectives))

    worst = {"accuracy": baseline.accuracy - 1e3, "latency": 1e3, "size": 1e3}
    failed_values = [worst[name] for name in config.objectives]
    extra = ("max-drop",) if config.max_drop is not None else ()
    ran = run_trials(
        study, objective, failed_values, config.trials, deadline, time.perf_counter, progress, extra
    )
    outcome = SearchOutcome(
        config,
        space,
        baseline,
        study,
        [],
        reference_trials(study, space),
        where=meter.where,
        ran=ran,
        sensitivities=errors,
        statistics=statistics,
    )
    complete = [t for t in outcome.trials if measured(t)]
    if not config.worker:
        if not complete:
            failures = [t.user_attrs.get(FAILURE, "?") for t in outcome.trials]
            if config.time_budget is not None and not outcome.trials:
                raise SearchError(
                    f"--time-budget {config.time_budget:g} s is shorter than one trial: "
                    "no trial finished"
                )
            raise SearchError(
                "no trial produced a model"
                + (f" (first failure: {failures[0]})" if failures else "")
            )
        # a repeated pipeline is the same model as its first trial: listed once
        best = [t for t in study.best_trials if "repeats" not in t.user_attrs]
        outcome.front = sorted(best, key=lambda t: t.number)
        for trial in outcome.front:
            known = memo.get(trial.number)
            if known is None:  # measured by an earlier run or another worker: rebuild it
                known = evaluator.run(trial.user_attrs["pipeline"], with_latency=False)
            outcome.models[trial.number] = known.model
        if finisher is not None:
            outcome.finished = finish_front(
                outcome.front,
                outcome.models,
                model,
                calibration,
                finisher,
                evaluator,
                config.objectives,
                baseline,
            )
    outcome.seconds = time.perf_counter() - started
    return outcome


REPEATED_ATTRS = ("measured", "choices", "latency_where", "constraint")


def _earlier_result(study: optuna.Study, pipeline: str, number: int) -> FrozenTrial | None:
    """A finished trial (completed, or failed with a reason) of the same pipeline."""
    for trial in study.get_trials(deepcopy=False):
        if trial.number < number and trial.user_attrs.get("pipeline") == pipeline:
            if trial.state == TrialState.COMPLETE:
                return trial
    return None


def _repeat(trial: optuna.Trial, earlier: FrozenTrial, objectives: int) -> list[float]:
    """The outcome of ``earlier`` again: samplers may propose a pipeline twice; a pipeline's
    model is deterministic, so it is not built again."""
    trial.set_user_attr("repeats", earlier.number)
    if earlier.user_attrs.get(FAILURE):
        raise TrialFailed(str(earlier.user_attrs[FAILURE]))
    for key in REPEATED_ATTRS:
        if key in earlier.user_attrs:
            trial.set_user_attr(key, earlier.user_attrs[key])
    if "constraint" in earlier.user_attrs:
        trial.set_constraint("max-drop", float(earlier.user_attrs["constraint"]))
    assert earlier.values is not None and len(earlier.values) == objectives
    return list(earlier.values)


def _enqueue_references(
    study: optuna.Study, space: SearchSpace, extra: tuple[tuple[str, dict[str, Any]], ...]
) -> None:
    """Queue the single-pass pipelines first (the warm start: the front can only improve on
    them), once per study (the first process does)."""
    if study.user_attrs.get("references") is None:
        study.set_user_attr("references", list(space.references()))
        queued = [*space.references().values()]
        try:
            queued += [space.single(name, **settings) for name, settings in extra]
        except ValueError as exc:
            raise SearchError(f"warm start: {exc}") from None
        for params in queued:
            study.enqueue_trial(params, skip_if_exists=True)


def reference_trials(study: optuna.Study, space: SearchSpace) -> dict[str, int]:
    """Label of each single-pass pipeline -> the number of the trial that measured it."""
    pipelines = {space.pipeline(_as_choices(p)): label for label, p in space.references().items()}
    numbers: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        label = pipelines.get(str(trial.user_attrs.get("pipeline")))
        if label is not None and label not in numbers and counted(trial):
            numbers[label] = trial.number
    return numbers


def _as_choices(params: dict[str, Any]) -> dict[str, Any]:
    """Enqueued params as ``SearchSpace.suggest`` returns them (only the active knobs)."""
    return {k: v for k, v in params.items() if "." in k}
