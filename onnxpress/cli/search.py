"""``onnxpress search``: choose the compression automatically, measured on the target.

    onnxpress search MODEL --calibration DATA [--eval DATA] [--metric module:function]
        [--target T] [--objectives accuracy,latency,size] [--max-drop 0.005]
        [--trials N] [--time-budget 30m] [--storage URL] [--out DIR] [--worker] [--distill]
        [--json]

Nothing is written before every input has been checked; on an error a search folder this
run created is removed again, and the front, ``search.json`` and the report are written all
at once at the end (the study storage is what a rerun resumes from).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

from onnxpress.core.io import model_files
from onnxpress.search.objectives import SearchError

# optuna and matplotlib are imported when a search runs: the other commands start without them
SAMPLERS = ("tpe", "nsga2", "random")  # onnxpress.search.study.SAMPLERS

UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1.5h`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text)
    if not match:
        raise SearchError(f"--time-budget '{text}': expected a duration like 90s, 30m or 1.5h")
    return float(match.group(1)) * UNITS[match.group(2)]


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("search", help="search compression pipelines for a Pareto front")
    s.add_argument("model", help="input .onnx file")
    s.add_argument("--calibration", required=True, help=".npz file or folder of .npz batches")
    s.add_argument("--eval", help=".npz of held-out inputs (and 'labels'); default: calibration")
    s.add_argument(
        "--metric",
        metavar="MODULE:FUNCTION",
        help="accuracy = f(outputs, labels), higher is "
        "better (e.g. onnxpress.search.objectives:top1_accuracy); default: agreement with "
        "the float model",
    )
    s.add_argument(
        "--target",
        action="append",
        metavar="T",
        help="hardware the model is built for, repeatable (names of optimize --target; "
        "default: host); accuracy is measured under each one's int8 arithmetic",
    )
    s.add_argument(
        "--measure",
        default="ort",
        help="where latency is measured: ort (onnxruntime here), tvm (a TVM library for the "
        "first --target, run here) or rpc://HOST:PORT/KEY (that library on the device a TVM "
        "RPC tracker hands out under KEY; needs the tvm extra)",
    )
    s.add_argument("--objectives", default="accuracy,latency,size", help="comma-separated")
    s.add_argument("--max-drop", type=float, help="largest accuracy loss a front point may have")
    s.add_argument("--trials", type=int, default=30, help="trials in the study (default 30)")
    s.add_argument("--time-budget", help="stop starting trials after this long (90s, 30m, 1h)")
    s.add_argument("--trial-timeout", type=float, metavar="SECONDS", help="fail a longer trial")
    s.add_argument("--storage", help="RDB URL or journal file shared by --worker processes")
    s.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="search", help="search folder (default: ./search)")
    s.add_argument("--worker", action="store_true", help="only run trials of the shared study")
    s.add_argument(
        "--threads",
        type=int,
        help="onnxruntime threads per session (default: the CPUs allowed, at most 4); "
        "--threads 1 for one worker per core",
    )
    s.add_argument(
        "--distill",
        action="store_true",
        help="distill each Pareto model from the original afterwards (needs torch: the train "
        "extra); a point keeps the distilled model where it measures better",
    )
    s.add_argument("--distill-epochs", type=int, default=5, help="epochs of --distill (5)")
    s.add_argument("--json", action="store_true", help="print the front as JSON")


def search_command(args: argparse.Namespace) -> int:
    import optuna

    from onnxpress.report.search_progress import SearchProgress
    from onnxpress.report.search_report import report_files
    from onnxpress.search.engine import SearchConfig, search
    from onnxpress.search.front import search_json, write_outputs

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SearchError(f"--out {out}: exists and is not a folder")
    inputs = {p.resolve() for _, p in model_files(args.model)}
    if out.resolve() in inputs:
        raise SearchError(f"--out {out}: is the input model")
    config = SearchConfig(
        model=args.model,
        calibration=args.calibration,
        out=out,
        eval_data=args.eval,
        metric=args.metric,
        targets=tuple(args.target or ["host"]),
        measure=args.measure,
        objectives=tuple(o.strip() for o in args.objectives.split(",") if o.strip()),
        max_drop=args.max_drop,
        trials=args.trials,
        time_budget=parse_duration(args.time_budget) if args.time_budget else None,
        storage=args.storage,
        sampler=args.sampler,
        seed=args.seed,
        worker=args.worker,
        trial_timeout=args.trial_timeout,
    )
    config.check()
    if args.threads is not None:
        if args.threads < 1:
            raise SearchError(f"--threads must be >= 1, not {args.threads}")
        from onnxpress.core.verify import set_session_threads

        set_session_threads(args.threads)
    # optuna logs each trial on its own handler; the CLI owns the terminal (-v shows them)
    optuna.logging.set_verbosity(
        optuna.logging.INFO if logging.getLogger().level <= logging.INFO else optuna.logging.WARNING
    )
    factory = None
    if config.measure != "ort":
        from onnxpress.cli.search_tvm import tvm_latency_factory

        factory = tvm_latency_factory(config.measure, config.targets[0])
    finisher = None
    if args.distill and not args.worker:
        from onnxpress.cli.search_distill import distill_finisher

        if args.distill_epochs < 1:
            raise SearchError(f"--distill-epochs must be >= 1, not {args.distill_epochs}")
        finisher = distill_finisher(args.distill_epochs, args.seed)
    try:  # workers started together: only the one that made the folder may remove it
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    progress = SearchProgress(enabled=not args.json)
    try:
        outcome = search(config, on_trial=progress, latency_factory=factory, finisher=finisher)
    except KeyboardInterrupt:
        progress.clear()
        raise
    except BaseException:
        progress.clear()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    progress.clear()
    if args.worker:
        summary = {"worker": True, "trials_run": outcome.ran, "study": outcome.study.study_name}
        print(json.dumps(summary) if args.json else f"worker ran {outcome.ran} trials")
        return 0
    data = search_json(outcome)
    write_outputs(outcome, data, report_files(data))
    if args.json:
        print(json.dumps({"front": data["front"], "baseline": data["baseline"]}, indent=2))
    else:
        print(render_front(data))
        print(f"\nwrote {out}/pareto, {out}/search.json and {out}/report.html")
    return 0


def render_front(data: dict[str, object]) -> str:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from onnxpress.search.finish import describe

    objectives = list(data["objectives"])  # type: ignore[call-overload]
    table = Table(title=f"Pareto front of {data['model']}", title_justify="left")
    table.add_column("trial", justify="right")
    for name in objectives:
        table.add_column(name, justify="right")
    distilled = bool(data.get("distill"))
    if distilled:
        table.add_column("distilled")
    table.add_column("pipeline")
    for point in data["front"]:  # type: ignore[attr-defined]
        values = [f"{point['values'][o]:.4g}" for o in objectives]
        note = [escape(describe(point.get("distilled")))] if distilled else []
        table.add_row(str(point["trial"]), *values, *note, escape(point["pipeline"]))
    console = Console(width=160, record=True, force_terminal=False, no_color=True)
    with console.capture() as capture:
        console.print(table)
    return capture.get().rstrip()
