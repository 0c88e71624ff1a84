"""The persistent tuning database of ``onnxpress compile --tune-trials`` (``--tuning-db``).

  <tuning-db>/<target key>/               one folder per TVM target (target_key)
      database_workload.json              MetaSchedule's JSONDatabase: kernels (workloads)
      database_tuning_record.json         ... and measured schedules (records), append-only
      budgets.json                        Ledger: per kernel, the largest per-kernel share of
                                          trials it was tuned with, and trials measured

Kernels are keyed by structure (shapes, dtypes, computation), not by model, so any model
with the same kernel on the same target reuses its records. ``best_records`` collects the
best record per kernel that builds with onnxpress's own TIR passes (``record_builds``: a
schedule MetaSchedule measured with TVM's pipeline can still fail in them); ``guard_times``
times each kernel with that record and with the untuned build's schedule, side by side, so
a compile applies only records that are faster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from onnxpress.backends.tvm.build import build, export, tir_pipeline
from onnxpress.backends.tvm.rpc import RpcSpec, time_kernels, time_library
from onnxpress.backends.tvm.targets import TargetSpec, split_threads, tvm_target
from onnxpress.core.errors import OnnxpressError

logger = logging.getLogger(__name__)

TUNING_DB_ENV = "ONNXPRESS_TUNING_DB"
LEDGER = "budgets.json"


class TuningError(OnnxpressError):
    """Tuning could not start or run (bad options, a target that cannot be measured)."""


def default_database() -> Path:
    """$ONNXPRESS_TUNING_DB, else $XDG_CACHE_HOME/onnxpress/tuning (~/.cache/...)."""
    if os.environ.get(TUNING_DB_ENV):
        return Path(os.environ[TUNING_DB_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "onnxpress" / "tuning"


def target_key(spec: TargetSpec) -> str:
    """A folder name for a target: readable prefix + hash of the full TVM target dict."""
    config = json.dumps(spec.config, sort_keys=True)
    cpu = spec.config.get("mcpu") or spec.config.get("arch") or spec.config.get("mtriple", "")
    digest = hashlib.sha256(config.encode()).hexdigest()[:12]
    return f"{spec.kind}-{cpu}-{digest}".replace("/", "_")


def open_database(root: Path, spec: TargetSpec) -> tuple[Path, Any, int]:
    """The target's folder under ``root`` (created), its MetaSchedule JSONDatabase, and how
    many unreadable records were moved aside to rejected_records.json to open it."""
    from tvm.s_tir import meta_schedule as ms

    folder = Path(root).expanduser() / target_key(spec)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TuningError(f"--tuning-db {root}: {exc.strerror}") from None
    paths = {
        "path_workload": str(folder / "database_workload.json"),
        "path_tuning_record": str(folder / "database_tuning_record.json"),
    }
    try:
        return folder, ms.database.JSONDatabase(**paths), 0
    except Exception as exc:
        dropped = _drop_unreadable_records(folder)
        if not dropped:
            raise TuningError(f"{folder}: the tuning database cannot be read ({exc})") from None
        logger.warning("%s: moved %d unreadable records aside", folder, dropped)
        return folder, ms.database.JSONDatabase(**paths), dropped


def _drop_unreadable_records(folder: Path) -> int:
    """Move records whose schedule does not replay on their workload (MetaSchedule refuses
    to open a database holding one) to rejected_records.json; returns how many."""
    from tvm.s_tir import meta_schedule as ms

    workload_lines = (folder / "database_workload.json").read_text().splitlines()
    workloads = [ms.database.Workload.from_json(json.loads(line)) for line in workload_lines]
    records_path = folder / "database_tuning_record.json"
    kept, rejected = [], []
    for line in records_path.read_text().splitlines():
        try:
            index, record = json.loads(line)
            ms.database.TuningRecord.from_json(record, workloads[index])
            kept.append(line)
        except Exception:
            rejected.append(line)
    if rejected:
        with (folder / "rejected_records.json").open("a", encoding="utf-8") as out:
            out.write("\n".join(rejected) + "\n")
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=".records-")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in kept))
        os.replace(tmp, records_path)
    return len(rejected)


def workload_key(task_mod: Any) -> str:
    """The ledger key of a kernel: its structural hash (what the database matches on)."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(task_mod) & (1 << 64) - 1:016x}"


class Ledger:
    """budgets.json: per workload, the largest share it was tuned with and the trials
    measured for it, so that later runs can tell which kernels are tuned enough. Written
    whole (temp file + rename); concurrent compiles may drop each other's entries, which
    only costs a re-tune."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                self.entries = json.loads(path.read_text(encoding="utf-8"))["workloads"]
            except (ValueError, KeyError, TypeError) as exc:
                raise TuningError(f"{path}: unreadable tuning ledger ({exc})") from None

    def share(self, key: str) -> int:
        return int(self.entries.get(key, {}).get("share", 0))

    def add(self, key: str, task: str, share: int, trials: int) -> None:
        entry = self.entries.setdefault(key, {"task": task, "share": 0, "trials": 0})
        entry["share"] = max(int(entry["share"]), share)
        entry["trials"] = int(entry["trials"]) + trials

    def save(self) -> None:
        text = json.dumps({"format": 1, "workloads": self.entries}, indent=1, sort_keys=True)
        handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".budgets-")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text + "\n")
        os.replace(tmp, self.path)


MAX_BUILD_TRIES = 8  # records tried per kernel, best first, before it keeps its default


def best_records(
    database: Any,
    task_mods: dict[str, Any],
    names: set[str] | None = None,
    spec: TargetSpec | None = None,
) -> tuple[Any, dict[str, int]]:
    """An in-memory database with the best record of each kernel (task name -> module;
    only ``names`` when given), and the number of valid records per kernel. With ``spec``,
    the best record that also builds for it (``record_builds``; at most MAX_BUILD_TRIES
    tried): a kernel without one keeps its untuned schedule."""
    from tvm.s_tir import meta_schedule as ms

    chosen = ms.database.MemoryDatabase()
    counts: dict[str, int] = {}
    for name, task_mod in task_mods.items():
        records = []
        if database.has_workload(task_mod):
            records = database.get_top_k(database.commit_workload(task_mod), 1 << 20)
        counts[name] = len(records)
        if not records or (names is not None and name not in names):
            continue
        candidates = records[:MAX_BUILD_TRIES] if spec is not None else records[:1]
        best = next(
            (r for r in candidates if spec is None or record_builds(task_mod, r, spec)), None
        )
        if best is None:
            logger.warning("%s: no tuned schedule builds; it keeps the untuned one", name)
            continue
        chosen.commit_tuning_record(
            ms.database.TuningRecord(
                best.trace,
                chosen.commit_workload(task_mod),
                best.run_secs,
                best.target,
                best.args_info,
            )
        )
    return chosen, counts


def record_builds(task_mod: Any, record: Any, spec: TargetSpec) -> bool:
    """Whether ``record``'s schedule of ``task_mod`` compiles with the TIR pipeline that
    ``build`` uses for ``spec`` (CPU: the dynamic split of parallel loops, whose bounds
    TVM's simplifier failed on for 2 of 541 records of the zoo's encoder: "Literal value
    1649267444736 exceeds range of int32"). GPU targets: TVM's own pipeline, not checked."""
    import tvm

    if spec.is_gpu:
        return True
    try:
        sch = tvm.s_tir.Schedule(task_mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        kernels = {
            gvar: func.with_attr("global_symbol", gvar.name_hint)
            for gvar, func in sch.mod.functions.items()
        }
        pipeline = tir_pipeline(split_threads(spec, "dynamic"))
        tvm.compile(tvm.IRModule(kernels), target=tvm_target(spec), tir_pipeline=pipeline)
    except Exception as exc:  # TVM raises many kinds: any failure means "do not apply"
        logger.info("a tuned schedule does not build, skipped: %s", str(exc).splitlines()[-1])
        return False
    return True


def guard_times(
    mod: Any,
    spec: TargetSpec,
    task_mods: dict[str, Any],
    best: Any,
    rpc: RpcSpec | None,
    default_schedules: bool,
    rounds: int = 2,
) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per kernel with its best record and with the untuned build's schedule, both
    timed now, alternately, like the candidates (minimum over ``rounds``): times recorded
    while tuning come from other moments and machine loads."""
    from tvm.s_tir import meta_schedule as ms

    kernels = {
        name: [arg.as_json() for arg in ms.arg_info.ArgInfo.from_prim_func(task["main"])]
        for name, task in task_mods.items()
    }
    device = "cuda" if spec.is_gpu else "cpu"
    times: list[dict[str, float]] = [{}, {}]
    with tempfile.TemporaryDirectory(prefix="onnxpress-guard-") as folder:
        built = [
            kernel_library(mod, spec, default_schedules, database, Path(folder) / name)
            for name, database in (("tuned", best), ("default", ms.database.MemoryDatabase()))
        ]
        libraries = [library for library in built if library is not None]
        if len(libraries) != len(built):
            return {}, {}
        for _ in range(rounds):
            for library, seen in zip(libraries, times, strict=True):
                for name, seconds in time_kernels(library, kernels, rpc, device).items():
                    seen[name] = min(seconds, seen.get(name, seconds))
    return times[0], times[1]


def kernel_library(
    mod: Any, spec: TargetSpec, default_schedules: bool, database: Any, folder: Path
) -> Path | None:
    """Build ``mod`` with a database's records and export only its kernels (the VM
    executable's imported module, whose functions are named after the tasks)."""
    executable = build(mod, spec, default_schedules=default_schedules, database=database)
    libraries = [m for m in executable.mod.imports if m.kind in ("llvm", "library")]
    if not libraries:
        return None
    folder.mkdir()
    library = folder / "kernels.so"
    try:
        if spec.cross_compiler:
            libraries[0].export_library(str(library), cc=spec.cross_compiler)
        else:
            libraries[0].export_library(str(library))
    except Exception as exc:  # e.g. no toolchain to link with: no guard
        logger.warning("cannot time kernels without linking them: %s", exc)
        return None
    return library


def model_times(
    mod: Any,
    spec: TargetSpec,
    chosen: Any,
    rpc: RpcSpec | None,
    default_schedules: bool,
    rounds: int = 2,
) -> tuple[float, float]:
    """Median milliseconds of the whole model built with ``chosen`` records and untuned,
    timed alternately on zero inputs (minimum over ``rounds``): kernels that win alone can
    still lose inside the model (caches, thread start-up)."""
    from tvm.s_tir import meta_schedule as ms

    inputs = [
        {"shape": [int(d) for d in p.ty.shape], "dtype": str(p.ty.dtype)}
        for p in mod["main"].params
    ]
    device = "cuda" if spec.is_gpu else "cpu"
    best = [float("inf"), float("inf")]
    with tempfile.TemporaryDirectory(prefix="onnxpress-guard-") as folder:
        libraries = []
        for name, database in (("tuned", chosen), ("default", ms.database.MemoryDatabase())):
            (Path(folder) / name).mkdir()
            executable = build(mod, spec, default_schedules=default_schedules, database=database)
            libraries.append(export(executable, spec, Path(folder) / name))
        for _ in range(rounds):
            for i, library in enumerate(libraries):
                best[i] = min(best[i], time_library(library, rpc, inputs, device)["median_ms"])
    return best[0], best[1]
