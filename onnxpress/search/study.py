"""The Optuna study of a search: its storage, its sampler, and the loop of trials.

Storage: by default a journal file in the search folder (``study.journal``), so a search
resumes where it stopped (Ctrl-C, a crash, a rerun); ``--storage`` takes an RDB URL
(``sqlite:///file.db``, ``postgresql://...``) or a journal file (``journal:PATH`` or a path
ending in ``.journal``/``.log``), shared by ``--worker`` processes on several machines.

Sampler: TPE (multi-objective) by default, NSGA-II or random on request. A resumed search
must make the choices the uninterrupted one would have made, so the sampler is built afresh
for every trial with a seed derived from the search seed and the trial's index among the
trials that were not interrupted (``ReplayableSampler``). The samplers themselves read the
history from the storage; nothing else is carried between trials.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.samplers import BaseSampler, NSGAIISampler, RandomSampler, TPESampler
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from onnxpress.search.objectives import SearchError, TrialFailed

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")
DEFAULT_JOURNAL = "study.journal"
INTERRUPTED = "interrupted"  # user attr of a trial stopped by Ctrl-C: not counted, not replayed
FAILURE = "failure"  # user attr: why a trial failed
FAILED_CONSTRAINT = "failed"  # 1 for a failed trial: infeasible, so samplers learn from it


def open_storage(url: str | None, out: Path) -> BaseStorage:
    """The study storage named by ``url`` (or the journal file in ``out``); one-line errors."""
    try:
        if url is None:
            return JournalStorage(JournalFileBackend(str(out / DEFAULT_JOURNAL)))
        if url.startswith("journal:") or url.endswith((".journal", ".log")):
            path = Path(url.removeprefix("journal:"))
            if not path.parent.is_dir():
                raise SearchError(f"storage '{url}': folder '{path.parent}' does not exist")
            return JournalStorage(JournalFileBackend(str(path)))
        if "://" not in url:
            raise SearchError(
                f"storage '{url}': expected an RDB URL (sqlite:///file.db) or a journal file "
                "(journal:PATH or a .journal file)"
            )
        return _rdb_storage(url)
    except SearchError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]
        raise SearchError(
            f"storage '{url}' cannot be reached: {type(exc).__name__}: {reason}"
        ) from None


def _rdb_storage(url: str, attempts: int = 4) -> RDBStorage:
    """An RDB storage; workers started together race to create its tables (an
    IntegrityError, or SQLite's "table ... already exists"): retry that."""
    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:
            text = f"{type(exc).__name__} {exc}"
            if attempt == attempts - 1 or not (
                "IntegrityError" in text or "already exists" in text
            ):
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def study_name(*parts: str) -> str:
    """A name fixed by what the search measures, so a rerun with other settings is a new study."""
    return "onnxpress-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def failed(trial: FrozenTrial) -> bool:
    """A trial that produced no model (refused, not verified, crashed, timed out)."""
    return trial.state == TrialState.FAIL or bool(trial.user_attrs.get(FAILURE))


def measured(trial: FrozenTrial) -> bool:
    """A trial whose model was built and measured."""
    return trial.state == TrialState.COMPLETE and not trial.user_attrs.get(FAILURE)


WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process runs a trial (user attr)
STALE_AFTER = 3600.0  # s: a running trial of an unknown or remote worker older than this is dead


def _owner_alive(trial: FrozenTrial, now: float) -> bool:
    """Whether a RUNNING trial's worker still runs it: a process of this host is looked up
    by its pid; a trial of another host, or one not yet marked with its worker, is taken
    to be alive for ``STALE_AFTER`` seconds from its start."""
    host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    started = trial.datetime_start.timestamp() if trial.datetime_start else now
    return now - started < STALE_AFTER


def taken(trial: FrozenTrial, now: float) -> bool:
    """Whether a trial counts against --trials when a worker decides to start another: the
    counted ones, and those another live worker is running (so that workers sharing a study
    run the N trials between them, not N plus one each at the end)."""
    if counted(trial):
        return True
    return trial.state == TrialState.RUNNING and _owner_alive(trial, now)


def counted(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards --trials: finished, and not interrupted."""
    if trial.user_attrs.get(INTERRUPTED):
        return False
    return trial.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)


class ReplayableSampler(BaseSampler):
    """Delegates to a sampler made for each trial, seeded by the trial's logical index."""

    def __init__(self, kind: str, seed: int, population: int = 16) -> None:
        if kind not in SAMPLERS:
            raise SearchError(f"unknown sampler '{kind}' (samplers: {', '.join(SAMPLERS)})")
        self.kind = kind
        self.seed = seed
        self.population = population
        self._inner: BaseSampler = self._make(seed)
        self._for_trial: int | None = None

    def _make(self, seed: int) -> BaseSampler:
        if self.kind == "nsga2":
            return NSGAIISampler(population_size=self.population, seed=seed)
        if self.kind == "random":
            return RandomSampler(seed=seed)
        return TPESampler(seed=seed, n_startup_trials=8)

    def _index(self, study: optuna.Study, trial: FrozenTrial) -> int:
        before = study.get_trials(deepcopy=False)
        return sum(
            1 for t in before if t.number < trial.number and not t.user_attrs.get(INTERRUPTED)
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        index = self._index(study, trial)
        self._inner = self._make(self.seed * 100_003 + index)
        self._for_trial = trial.number
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def open_study(
    storage: BaseStorage, name: str, directions: list[str], sampler: BaseSampler
) -> optuna.Study:
    try:
        return optuna.create_study(
            storage=storage,
            study_name=name,
            directions=directions,  # type: ignore[arg-type]
            sampler=sampler,
            load_if_exists=True,
        )
    except Exception as exc:
        raise SearchError(f"cannot open study '{name}': {type(exc).__name__}: {exc}") from None


TrialFunction = Callable[[optuna.Trial], list[float]]


def run_trials(
    study: optuna.Study,
    objective: TrialFunction,
    failed_values: list[float],
    total: int,
    deadline: float | None,
    clock: Callable[[], float],
    on_trial: Callable[[FrozenTrial], None] | None = None,
    constraints: tuple[str, ...] = (),
) -> int:
    """Ask and tell trials until ``total`` count in the study (all workers together) or the
    deadline passes; return how many this process ran. ``objective`` raises ``TrialFailed``
    for a failed trial; Ctrl-C marks the running trial interrupted and propagates.

    A failed trial keeps its reason (user attr ``failure``) and is told to Optuna as an
    infeasible trial with ``failed_values`` (constraint ``failed`` = 1): samplers ignore
    failed trials (TPE proposed one refused pipeline thousands of times in a row), but they
    steer away from infeasible ones, and the front never holds one."""
    ran = 0
    while True:
        now = time.time()
        done = sum(1 for t in study.get_trials(deepcopy=False) if taken(t, now))
        if done >= total or (deadline is not None and clock() >= deadline):
            return ran
        try:
            trial = study.ask()
        except UpdateFinishedTrialError:
            # another worker took and finished the queued trial this one was taking
            continue
        try:
            _run_one(study, trial, objective, failed_values, constraints)
        except UpdateFinishedTrialError:
            # SQLite cannot lock the row of a queued trial: two workers may both take it;
            # the one that finished first told it, the other's result is dropped
            logger.info("trial %d was finished by another worker", trial.number)
            continue
        ran += 1
        if on_trial is not None:
            finished = [t for t in study.get_trials(deepcopy=False) if t.number == trial.number]
            on_trial(finished[0])


def _run_one(
    study: optuna.Study,
    trial: optuna.Trial,
    objective: TrialFunction,
    failed_values: list[float],
    constraints: tuple[str, ...],
) -> None:
    try:
        values = objective(trial)
    except KeyboardInterrupt:
        trial.set_user_attr(INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    except TrialFailed as failure:
        trial.set_user_attr(FAILURE, str(failure))
        for key in (FAILED_CONSTRAINT, *constraints):
            trial.set_constraint(key, 1.0)
        _tell(study, trial, failed_values)
    else:
        trial.set_constraint(FAILED_CONSTRAINT, 0.0)
        _tell(study, trial, values)


def _tell(study: optuna.Study, trial: optuna.Trial, values: list[float]) -> None:
    state = study._storage.get_trial(trial._trial_id).state
    if state.is_finished():
        raise UpdateFinishedTrialError(f"trial {trial.number} is already {state.name}")
    study.tell(trial, values, skip_if_finished=True)
