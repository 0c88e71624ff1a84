"""The ``onnxpress`` command: optimize, passes, inspect, distill, compile, run (TVM; tvm_cli).

Errors are one line on stderr with a non-zero exit (1 for bad input or a failed pass, 2 for
bad usage, 130 on Ctrl-C); ``--debug`` shows tracebacks. Nothing is written unless the whole
pipeline passed verification, and the output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxpress import __version__
from onnxpress.api import default_pipeline
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.errors import ModelSaveError, OnnxpressError, PipelineError, VerificationError
from onnxpress.core.io import prepare_model, same_file, save_model
from onnxpress.core.manager import PassManager, VerifyConfig, bisect
from onnxpress.core.options import describe_type, option_fields
from onnxpress.core.pipeline import load_recipe, parse_pipeline
from onnxpress.core.registry import all_passes, load_plugin_file
from onnxpress.core.stats import describe_io, model_stats
from onnxpress.core.verify import METRICS
from onnxpress.report.render import Progress, human, render_report, table

logger = logging.getLogger("onnxpress")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxpress", description="Compress and optimize ONNX models with verified passes."
    )
    parser.add_argument("--version", action="version", version=f"onnxpress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE",
        help="Python file that registers passes (repeatable)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    opt = sub.add_parser("optimize", help="run a pipeline of passes and write the optimized model")
    opt.add_argument("model", help="input .onnx file")
    opt.add_argument("-o", "--output", help="output .onnx file (default: MODEL.opt.onnx)")
    source = opt.add_mutually_exclusive_group()
    source.add_argument("--passes", help='pipeline text, e.g. "fold-constants,svd{energy=0.95}"')
    source.add_argument("--recipe", help="TOML recipe with [[pass]] tables and [verify]")
    opt.add_argument(
        "--calibration", help=".npz file or folder of .npz batches keyed by input name"
    )
    opt.add_argument("--verify", choices=["off", "structure", "numeric"], help="default: numeric")
    opt.add_argument("--metric", choices=sorted(METRICS), help="metric for lossy passes")
    opt.add_argument("--budget", type=float, help="largest metric value a lossy pass may reach")
    opt.add_argument("--tolerance", type=float, help="relative tolerance for lossless passes")
    opt.add_argument(
        "--holdout",
        type=int,
        metavar="N",
        help="keep the last N calibration batches from the passes and verify on them only",
    )
    opt.add_argument("--seed", type=int, default=0, help="seed for random verification inputs")
    opt.add_argument("--report", metavar="FILE", help="write the JSON report here")
    opt.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    opt.add_argument("--in-place", action="store_true", help="allow overwriting the input model")
    opt.add_argument(
        "--bisect",
        action="store_true",
        help="first check prefixes of the pipeline against the original model and name the "
        "first pass that breaks it (even with --verify structure)",
    )
    _add_plugin_option(opt)

    ps = sub.add_parser("passes", help="list registered passes and their options")
    ps.add_argument("--json", action="store_true")
    _add_plugin_option(ps)

    ins = sub.add_parser("inspect", help="show a model's interface, ops, params and MACs")
    ins.add_argument("model")
    ins.add_argument("--json", action="store_true")

    comp = sub.add_parser("compile", help="compile a model with Apache TVM into a library")
    comp.add_argument("model", help="input .onnx file")
    comp.add_argument(
        "--target", default="x86", help="x86 (this CPU), x86-64, arm64-linux, cuda[:sm_XX]"
    )
    comp.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D1,D2,...",
        help="static shape of an input (repeatable; default: the model's, symbolic batch = 1)",
    )
    comp.add_argument("-o", "--output", required=True, help="output folder")
    comp.add_argument(
        "--no-default-schedules",
        action="store_true",
        help="compile CPU kernels without onnxpress's untuned parallel/vector schedules",
    )
    comp.add_argument(
        "--int8",
        choices=("auto", "off"),
        default="auto",
        help="auto: run a QDQ model's convs/matmuls as int8 x int8 -> int32 (default); "
        "off: TVM's float fake-quant",
    )
    comp.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        metavar="N",
        help="tune the kernels with MetaSchedule: about N measured trials, N/kernels each; "
        "kernels the database already tuned with that share are reused (default 0: no tuning)",
    )
    comp.add_argument(
        "--tuning-db",
        metavar="DIR",
        help="tuning database reused across runs and models "
        "(default: $ONNXPRESS_TUNING_DB or ~/.cache/onnxpress/tuning)",
    )
    comp.add_argument(
        "--rpc",
        metavar="TRACKER:PORT:KEY",
        help="measure tuning candidates on the device registered under KEY at a TVM RPC tracker",
    )
    comp.add_argument(
        "--gru",
        choices=("loop", "unroll"),
        default="loop",
        help="loop: each GRU op is one recurrence kernel (default); unroll: lower-gru's "
        "per-step ops",
    )
    comp.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    comp.add_argument("--seed", type=int, default=0, help="seed for verification inputs")
    comp.add_argument("--json", action="store_true", help="print the manifest as JSON")

    dist = sub.add_parser("distill", help="fine-tune a compressed model against its original")
    dist.add_argument("model", help="student .onnx file (the compressed model)")
    dist.add_argument("--teacher", required=True, help="teacher .onnx file (the original)")
    dist.add_argument("--data", required=True, help=".npz file or folder of .npz input batches")
    dist.add_argument("-o", "--output", help="output .onnx file (default: MODEL.distilled.onnx)")
    dist.add_argument("--labels", help=".npz holding 'labels' (int), one per sample, in order")
    dist.add_argument("--epochs", type=int, default=10)
    dist.add_argument("--lr", type=float, default=1e-3)
    dist.add_argument("--temperature", type=float, default=4.0)
    dist.add_argument("--alpha", type=float, default=0.5, help="hard-label loss weight")
    dist.add_argument("--batch-size", type=int, default=32)
    dist.add_argument(
        "--feature-loss", metavar="S:T,...", help="MSE between student:teacher tensor pairs"
    )
    dist.add_argument("--holdout", type=float, default=0.1, help="held-out fraction")
    dist.add_argument("--patience", type=int, default=3, help="early-stopping patience")
    dist.add_argument("--freeze-scales", action="store_true", help="do not learn QDQ scales")
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--json", action="store_true", help="print the report as JSON")
    dist.add_argument("--in-place", action="store_true", help="allow overwriting the input")

    run = sub.add_parser("run", help="run a compiled folder on inputs from an .npz file")
    run.add_argument("folder", help="output folder of 'onnxpress compile'")
    run.add_argument("--inputs", required=True, help=".npz file keyed by input name")
    run.add_argument("--verify", metavar="MODEL", help="compare with onnxruntime on this model")
    run.add_argument("--tolerance", type=float, default=1e-4, help="max-rel limit for --verify")
    run.add_argument("-o", "--output", metavar="FILE", help="write the outputs to this .npz")
    return parser


def _add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """--plugin is also accepted after the subcommand (``onnxpress optimize --plugin f.py``)."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE",
        dest="plugin_sub",
        help=argparse.SUPPRESS,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        for plugin in [*args.plugin, *getattr(args, "plugin_sub", [])]:
            load_plugin_file(plugin)
        if args.command == "optimize":
            return _optimize(args)
        if args.command == "passes":
            return _passes(args)
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "distill":
            return _distill(args)
        if args.command == "compile":
            from onnxpress.cli.compile import compile_command

            return compile_command(args)
        if args.command == "run":
            from onnxpress.cli.compile import run_command

            return run_command(args)
    except KeyboardInterrupt:
        print("\nonnxpress: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OnnxpressError as exc:
        if args.debug:
            raise
        print(f"onnxpress: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"onnxpress: internal error: {type(exc).__name__}: {exc} (rerun with --debug)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _default_output(model: str) -> Path:
    path = Path(model)
    return path.with_name(path.stem + ".opt.onnx")


def _optimize(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first.
    recipe = load_recipe(args.recipe) if args.recipe else None
    calibration_path = args.calibration or (recipe.calibration if recipe else None)
    if recipe is not None:
        passes = recipe.passes
    else:
        passes = parse_pipeline(args.passes or default_pipeline(calibration_path is not None))
    settings = recipe.verify if recipe else None
    verify = VerifyConfig(
        level=args.verify or (settings.level if settings and settings.level else "numeric"),  # type: ignore[arg-type]
        metric=args.metric or (settings.metric if settings else None),
        budget=args.budget if args.budget is not None else (settings.budget if settings else None),
        tolerance=args.tolerance
        if args.tolerance is not None
        else (settings.tolerance if settings and settings.tolerance is not None else 1e-5),
        holdout=args.holdout
        if args.holdout is not None
        else (settings.holdout if settings and settings.holdout is not None else 0),
    )
    output = Path(args.output) if args.output else _default_output(args.model)
    if Path(args.model).exists() and same_file(output, args.model) and not args.in_place:
        raise ModelSaveError(
            f"{output}: output path is the input model (use --in-place to overwrite)"
        )
    if not (output.parent if str(output.parent) else Path(".")).is_dir():
        raise ModelSaveError(f"{output}: folder '{output.parent}' does not exist")
    if args.report and not Path(args.report).resolve().parent.is_dir():
        raise PipelineError(f"{args.report}: report folder does not exist")

    model, source = prepare_model(args.model)
    calibration = CalibrationData.from_path(calibration_path) if calibration_path else None
    if args.bisect:
        # Run each prefix of the pipeline and check only its end result: names the first
        # pass that breaks the model even when per-pass checks are relaxed.
        index = bisect(model, passes, verify, calibration, args.seed)
        if index is not None:
            raise VerificationError(
                passes[index].name,
                f"bisect: pass #{index + 1} '{passes[index].spec()}' is the first whose "
                "pipeline prefix fails verification against the original model",
            )
        logger.info("bisect: every prefix of the pipeline passes verification")
    progress = Progress(enabled=not args.json)
    manager = PassManager(passes, verify, calibration, args.seed, on_progress=progress)
    try:
        result, report = manager.run(model)
    except BaseException:
        progress.clear()
        raise
    report.input_path = source
    report.output_path = str(output)
    save_model(result, output, protect=None if args.in_place else args.model)
    if args.report:
        report.write(args.report)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(render_report(report))
        print(f"\nwrote {output}" + (f" and {args.report}" if args.report else ""))
    return 0


def _distill(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from onnxpress.train.distill import distill
    from onnxpress.train.distill_options import DistillOptions, require_torch

    pairs: list[tuple[str, str]] = []
    for item in (args.feature_loss or "").split(","):
        if item.strip():
            student, sep, teacher = item.strip().partition(":")
            if not sep or not student or not teacher:
                raise PipelineError(f"--feature-loss: expected student:teacher, not {item!r}")
            pairs.append((student, teacher))
    options = DistillOptions(
        epochs=args.epochs,
        lr=args.lr,
        temperature=args.temperature,
        alpha=args.alpha,
        batch_size=args.batch_size,
        feature_losses=tuple(pairs),
        holdout=args.holdout,
        patience=args.patience,
        learn_scales=not args.freeze_scales,
        seed=args.seed,
    )
    path = Path(args.model)
    output = Path(args.output) if args.output else path.with_name(path.stem + ".distilled.onnx")
    if path.exists() and same_file(output, args.model) and not args.in_place:
        raise ModelSaveError(
            f"{output}: output path is the input model (use --in-place to overwrite)"
        )
    if not (output.parent if str(output.parent) else Path(".")).is_dir():
        raise ModelSaveError(f"{output}: folder '{output.parent}' does not exist")
    require_torch()
    started = [0.0]

    def progress(epoch: int, epochs: int, train_loss: float, holdout_loss: float) -> None:
        if args.json:
            return
        bar = "#" * epoch + "." * (epochs - epoch)
        text = f"[{bar}] epoch {epoch}/{epochs} loss {train_loss:.4f} held-out {holdout_loss:.4f}"
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[2K" + text + ("\n" if epoch == epochs else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        started[0] = epoch

    tuned, report = distill(
        args.model,
        args.teacher,
        args.data,
        labels=args.labels,
        options=options,
        on_progress=progress,
    )
    if sys.stderr.isatty() and not args.json and started[0] != options.epochs:
        sys.stderr.write("\n")
    save_model(tuned, output, protect=None if args.in_place else args.model)
    if args.json:
        print(json.dumps({**asdict(report), "output_path": str(output)}, indent=2))
    else:
        print(report.describe())
        print(f"\nwrote {output}")
    return 0


def _passes(args: argparse.Namespace) -> int:
    registry = all_passes()
    entries: list[dict[str, Any]] = []
    for name, cls in registry.items():
        options = [
            {
                "name": opt_name,
                "type": describe_type(tp),
                "default": None if default is _MISSING else default,
            }
            for opt_name, tp, default in option_fields(cls.options_type)
        ]
        entries.append(
            {
                "name": name,
                "description": cls.description(),
                "lossless": cls.lossless,
                "metric": None if cls.lossless else cls.metric,
                "options": options,
            }
        )
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    for entry in entries:
        kind = "lossless" if entry["lossless"] else f"lossy, judged by {entry['metric']}"
        print(f"{entry['name']}  ({kind})")
        print(f"    {entry['description']}")
        for opt in entry["options"]:
            print(f"    {opt['name']}: {opt['type']} = {_fmt_default(opt['default'])}")
        print()
    return 0


_MISSING: Any = __import__("dataclasses").MISSING


def _fmt_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return "none" if value is None else str(value)


def _inspect(args: argparse.Namespace) -> int:
    model, source = prepare_model(args.model)
    stats = model_stats(model)
    io = describe_io(model)
    info = {
        "file": source,
        "file_bytes": os.path.getsize(source),
        "ir_version": model.ir_version,
        "opsets": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        **io,
        **stats.to_json(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    print(f"{source}: {human(info['file_bytes'], 'B')}, IR {model.ir_version}, opset {opsets}")
    if info["producer"]:
        print(f"producer: {info['producer']}")
    print()
    rows = [["input", e["name"], e["dtype"], _shape(e["shape"])] for e in io["inputs"]]
    rows += [["output", e["name"], e["dtype"], _shape(e["shape"])] for e in io["outputs"]]
    print(table(["", "name", "dtype", "shape"], rows))
    print()
    print(
        f"nodes {stats.nodes}, params {human(stats.params)} ({stats.params}), "
        f"MACs {human(stats.macs)} at batch 1"
    )
    print()
    op_rows = [
        [op, count, human(stats.macs_by_op.get(op, 0)) if op in stats.macs_by_op else ""]
        for op, count in stats.op_histogram.items()
    ]
    print(table(["op", "count", "MACs"], op_rows, right=(1, 2)))
    return 0


def _shape(shape: list[Any] | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


if __name__ == "__main__":
    sys.exit(main())
