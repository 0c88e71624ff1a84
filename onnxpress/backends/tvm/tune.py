"""MetaSchedule tuning for ``onnxpress compile --tune-trials N`` with a persistent database.

  tune_module(mod, spec, options, on_progress) -> Tuned(records to apply, summary)
    1. legalize and fuse the Relax module (the passes the CPU/GPU pipelines run first) and
       extract one MetaSchedule task per distinct fused kernel, leaving out kernels that
       arrive scheduled, take integer inputs (random test data would index out of bounds)
       or hold a Winograd transform (winograd_schedule.has_transform);
    2. open the database for this target: <tuning-db>/<target key>/ holds MetaSchedule's JSON
       workload and record files plus onnxpress's ledger (budgets.json);
    3. a kernel's share of the budget is ceil(N / kernels). A kernel already tuned with at
       least that share, by this model or another, is reused; the others are tuned one after
       another with that share each (random cost model unless xgboost is installed);
    4. candidates are built in this process (MetaSchedule's LocalBuilder forks workers that
       each spend 30-80 s importing TVM's tensor intrinsics) and measured in this process or
       on an RPC device (rpc.py).
    5. guard: each kernel is timed with its best record and with its default (untuned)
       schedule side by side, and gets the record only where that is faster; then the whole
       model is timed both ways, and no record is applied unless it is faster (tune_db.py).
  build.build then applies those records to the fused module before onnxpress's
  default schedules, which skip the kernels the records scheduled.

Progress is reported through ``on_progress(TuningProgress)``; this module never prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from onnxpress.backends.tvm.build import fuse
from onnxpress.backends.tvm.int8_gemm import has_packed_gemm
from onnxpress.backends.tvm.rpc import RpcSpec, check_tracker, in_process_builder, session_runner
from onnxpress.backends.tvm.targets import TargetSpec, tvm_target
from onnxpress.backends.tvm.tune_db import (
    LEDGER,
    Ledger,
    TuningError,
    best_records,
    default_database,
    guard_times,
    model_times,
    open_database,
    workload_key,
)
from onnxpress.backends.tvm.winograd_schedule import has_transform
from onnxpress.core.errors import OnnxpressError

__all__ = ["TuneOptions", "Tuned", "TuningError", "TuningProgress", "tune_module"]

logger = logging.getLogger(__name__)

MAX_TRIALS_PER_ITER = 64


@dataclass(frozen=True)
class TuneOptions:
    """What ``--tune-trials``, ``--tuning-db`` and ``--rpc`` ask for."""

    trials: int
    database: Path = field(default_factory=default_database)
    rpc: RpcSpec | None = None
    seed: int = 0
    # A time budget: kernels are tuned heaviest first (FLOPs x uses), and none is started
    # once it is spent (those left are listed in the summary's "skipped").
    minutes: float | None = None

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise TuningError(f"--tune-trials must be at least 1 (got {self.trials})")
        if self.minutes is not None and not self.minutes > 0:
            raise TuningError(f"the tuning budget must be positive (got {self.minutes} minutes)")


@dataclass(frozen=True)
class TuningProgress:
    """After each measured candidate: trials done of the total, the kernel being tuned and
    how many kernels are finished."""

    trials_done: int
    trials_total: int
    task: str
    kernels_done: int = 0


@dataclass
class TaskSummary:
    name: str
    weight: float
    trials: int  # measured in this run
    reused: bool  # tuned before with at least this run's share: not tuned again
    records: int  # valid records in the database after this run
    tuned_us: float | None  # the best record's time, timed with the default's (guard)
    default_us: float | None  # the untuned build's schedule for the kernel
    applied: bool  # the best record is used: it beat the default schedule


@dataclass
class TuningSummary:
    """What the manifest's "tuning" field records."""

    database: str
    target_key: str
    trials_requested: int
    share_per_task: int
    trials_run: int = 0
    records_reused: int = 0
    kernels_applied: int = 0
    records_dropped: int = 0  # unreadable records moved aside when opening the database
    skipped: dict[str, str] = field(default_factory=dict)  # kernel -> why it is not tuned
    # The whole model with the faster kernels' records vs untuned, timed at compile time;
    # when the tuned one is not faster, no record is applied.
    model_ms: dict[str, float] | None = None
    sessions: int = 0
    measured_on: str = "local"
    cost_model: str = ""
    seconds: float = 0.0
    tasks: list[TaskSummary] = field(default_factory=list)
    library_timing: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 2)
        return data


@dataclass
class Tuned:
    database: Any  # the records to apply: per kernel, the best when it beats the default
    summary: TuningSummary


def load_tensor_intrinsics(kind: str) -> None:
    """Register the tensor intrinsics MetaSchedule's rules use for ``kind`` only.

    ``tvm.s_tir.tensor_intrin`` imports every backend's intrinsics (CUDA alone takes ~25 s).
    When it is not loaded yet, register its package without running its __init__ and import
    the submodules for this target kind, which is what that __init__ would register for it.
    """
    package = "tvm.s_tir.tensor_intrin"
    if package not in sys.modules:
        found = importlib.util.find_spec(package)
        if found is None:
            raise TuningError(f"{package} is missing from this TVM build")
        module = importlib.util.module_from_spec(found)
        sys.modules[package] = module
        parent: Any = importlib.import_module("tvm.s_tir")
        parent.tensor_intrin = module
    for sub in ("cuda",) if kind == "cuda" else ("x86", "arm_cpu"):
        importlib.import_module(f"{package}.{sub}")


class _Progress:
    """Trials measured so far (the runner reports each candidate as it is measured) and the
    kernel being tuned, for ``on_progress``."""

    def __init__(self, total: int, report: Callable[[TuningProgress], None] | None) -> None:
        self.total = total
        self.report = report
        self.measured = 0
        self.batches = 0
        self.task = ""
        self.done_kernels = 0

    def on_measured(self, first_of_batch: bool) -> None:
        self.measured += 1
        self.batches += int(first_of_batch)
        if self.report is not None:
            done = min(self.measured, self.total)
            self.report(TuningProgress(done, self.total, self.task, self.done_kernels))


def _not_tunable(task: Any) -> str:
    """Why a kernel is left to its default schedule, or "" when it can be tuned."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    func = task.dispatched[0]["main"]
    for attrs in (task.mod.attrs, func.attrs):
        if attrs is not None and any(
            bool(attrs.get(key, False)) for key in ("tirx.is_scheduled", "tir.is_scheduled")
        ):
            return "scheduled by onnxpress (e.g. a loop-form RNN kernel)"
    if has_transform(func):
        return "a Winograd transform: scheduled by onnxpress's WinogradTransforms rule"
    if has_packed_gemm(s_tir.Schedule(func)):
        return "an int8 GEMM and its epilogue: scheduled by onnxpress's FusedEpilogue rule"
    for arg in ms.arg_info.ArgInfo.from_prim_func(func):
        if not str(arg.as_json()[1]).startswith(("float", "bfloat")):
            # Candidates are timed on random data: random indices would read out of bounds.
            return f"{arg.as_json()[1]} input (e.g. indices): cannot be timed on random data"
    return ""


def _measurable_here(spec: TargetSpec) -> bool:
    if spec.is_gpu:
        import tvm

        return bool(tvm.cuda(0).exist)
    return spec.runs_here()


def tune_module(
    mod: Any,
    spec: TargetSpec,
    options: TuneOptions,
    on_progress: Callable[[TuningProgress], None] | None = None,
    *,
    default_schedules: bool = True,
) -> Tuned:
    """Tune the kernels of a Relax module for ``spec`` with ``options.trials`` trials in all,
    reusing and extending the database under ``options.database``; ``default_schedules`` is
    what the untuned build uses (the guard's baseline)."""
    from tvm.s_tir import meta_schedule as ms

    if options.rpc is None and not _measurable_here(spec):
        raise TuningError(
            f"tuning for {spec.name} needs a device to measure on: pass --rpc TRACKER:PORT:KEY"
        )
    if spec.library_suffix != ".so":
        raise TuningError(f"tuning for {spec.name} needs its cross compiler to link candidates")
    if options.rpc is not None:
        check_tracker(options.rpc)
    started = time.perf_counter()
    load_tensor_intrinsics(spec.kind)
    target = tvm_target(spec)
    fused = fuse(mod, target, default_schedules)
    tasks, skipped = [], {}
    for task in ms.relax_integration.extract_tasks(fused, target):
        reason = _not_tunable(task)
        if reason:
            skipped[task.task_name] = reason
        else:
            tasks.append(task)
    folder, database, dropped = open_database(options.database, spec)
    ledger = Ledger(folder / LEDGER)
    share = max(1, math.ceil(options.trials / max(1, len(tasks))))
    summary = TuningSummary(str(folder), folder.name, options.trials, share)
    summary.measured_on = f"rpc {options.rpc}" if options.rpc else "local"
    summary.records_dropped = dropped
    summary.skipped = skipped
    keys = [workload_key(t.dispatched[0]) for t in tasks]
    todo = [i for i, key in enumerate(keys) if ledger.share(key) < share]
    if options.minutes is not None:
        todo.sort(key=lambda i: -_flops(tasks[i]) * float(tasks[i].weight))
    trials_run: dict[int, int] = {}
    if todo:
        deadline = started + options.minutes * 60 if options.minutes is not None else math.inf
        trials_run = _run_search(
            tasks, todo, share, database, spec, options, summary, on_progress, deadline
        )
    for i in todo:
        if i in trials_run:
            ledger.add(keys[i], tasks[i].task_name, share, trials_run[i])
        else:
            summary.skipped[tasks[i].task_name] = "the tuning time budget was spent"
    ledger.save()
    task_mods = {t.task_name: t.dispatched[0] for t in tasks}
    best, counts = best_records(database, task_mods, spec=spec)
    tuned_s, default_s = guard_times(mod, spec, task_mods, best, options.rpc, default_schedules)
    faster = {n for n, t in tuned_s.items() if t < default_s.get(n, float("inf"))}
    chosen, _ = best_records(best, task_mods, faster)  # from the records that build
    if faster:
        tuned_ms, default_ms = model_times(mod, spec, chosen, options.rpc, default_schedules)
        summary.model_ms = {
            "tuned": round(tuned_ms, 4),
            "default": round(default_ms, 4),
            "tuned_faster": tuned_ms < default_ms,
        }
        if not tuned_ms < default_ms:  # the whole model is not faster: ship the default
            faster, chosen = set(), ms.database.MemoryDatabase()
    for i, task in enumerate(tasks):
        name, reused = task.task_name, i not in todo
        summary.records_reused += counts[name] if reused else 0
        summary.kernels_applied += int(name in faster)
        tuned_us = tuned_s[name] * 1e6 if name in tuned_s else None
        default_us = default_s[name] * 1e6 if name in default_s else None
        summary.tasks.append(
            TaskSummary(
                name, float(task.weight), trials_run.get(i, 0), reused, counts[name],
                tuned_us, default_us, name in faster,
            )
        )  # fmt: skip
    summary.trials_run = sum(trials_run.values())
    summary.seconds = time.perf_counter() - started
    logger.info(
        "tuned %d of %d kernels with %d trials in %.1fs; %d use a tuned schedule",
        len(todo), len(tasks), summary.trials_run, summary.seconds, summary.kernels_applied,
    )  # fmt: skip
    return Tuned(chosen, summary)


def _flops(task: Any) -> float:
    """Estimated floating-point operations of one call of a task's kernel (0 if unknown)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # kernels the estimator cannot read are ordered last
        return 0.0


def cost_model() -> str:
    """MetaSchedule's XGBoost cost model when xgboost is installed, else random scores."""
    return "xgb" if importlib.util.find_spec("xgboost") is not None else "random"


def _search_strategy(per_iter: int, model: str) -> Any:
    """Evolutionary search sized to the batch: a population of 16 candidates per measured
    one (64..512); with random scores, one mutation round (more rounds only cost time)."""
    from tvm.s_tir import meta_schedule as ms

    population = max(64, min(512, 16 * per_iter))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population,
        init_min_unmeasured=min(50, population),
        genetic_num_iters=4 if model == "xgb" else 1,
    )


def _run_search(
    tasks: list[Any],
    todo: list[int],
    share: int,
    database: Any,
    spec: TargetSpec,
    options: TuneOptions,
    summary: TuningSummary,
    on_progress: Callable[[TuningProgress], None] | None,
    deadline: float = math.inf,
) -> dict[int, int]:
    """Run MetaSchedule on tasks[todo], one kernel at a time with ``share`` trials each
    (one task scheduler per kernel: with several tasks in one scheduler, TVM 0.27 filed
    some batches of records under the wrong kernel) until ``deadline`` (perf_counter
    seconds); returns trials measured per task that was started."""
    from tvm.s_tir import meta_schedule as ms

    threads = os.cpu_count() or 1
    per_iter = max(1, min(MAX_TRIALS_PER_ITER, share))
    summary.cost_model = model = cost_model()
    progress = _Progress(share * len(todo), on_progress)
    runner = session_runner(options.rpc, progress.on_measured)
    trials: dict[int, int] = {}
    scratch = Path(tempfile.mkdtemp(prefix="onnxpress-tune-"))
    try:
        builder = in_process_builder(spec.cross_compiler, scratch)
        for n, i in enumerate(todo):
            if time.perf_counter() >= deadline:
                break
            task = tasks[i]
            progress.task = task.task_name
            context = ms.TuneContext(
                mod=task.dispatched[0],
                target=task.target,
                space_generator="post-order-apply",
                search_strategy=_search_strategy(per_iter, model),
                task_name=task.task_name,
                logger=logging.getLogger(f"{__name__}.task.{task.task_name}"),
                rand_state=options.seed + n,
                num_threads=threads,
            ).clone()
            before = progress.measured
            ms.TaskScheduler.create("round-robin").tune(
                tasks=[context],
                task_weights=[float(task.weight)],
                max_trials_global=share,
                max_trials_per_task=share,
                num_trials_per_iter=per_iter,
                builder=builder,
                runner=runner,
                measure_callbacks=ms.MeasureCallback.create("default"),
                database=database,
                cost_model=ms.CostModel.create(model, num_tuning_cores=threads)
                if model == "xgb"
                else ms.CostModel.create("random"),
            )
            trials[i] = progress.measured - before
            progress.done_kernels += 1
    except OnnxpressError:
        raise
    except Exception as exc:
        raise TuningError(f"MetaSchedule failed: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if options.rpc is not None:
        summary.sessions = progress.batches
    return trials
