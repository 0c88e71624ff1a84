"""The ``onnxpress`` command: its options, and the dispatch to one module per command.

Errors are one line on stderr with a non-zero exit (1 for bad input or a failed pass, 2 for
bad usage, 3 when ``distill`` did not improve the student, 130 on Ctrl-C); ``--debug`` shows
tracebacks. Nothing is written unless the whole
pipeline passed verification, and the output is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from onnxpress import __version__
from onnxpress.cli.compile import compile_command, run_command
from onnxpress.cli.distill import distill_command
from onnxpress.cli.inspect import inspect_command, passes_command
from onnxpress.cli.optimize import optimize_command
from onnxpress.cli.search import add_search_parser, search_command
from onnxpress.core.errors import OnnxpressError, OutputConflictError, PluginError
from onnxpress.core.manager import time_limit
from onnxpress.core.registry import load_plugin_file
from onnxpress.core.verify import METRICS

logger = logging.getLogger("onnxpress")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (``onnxpress: error: ...``) and exit 2."""

    def error(self, message: str) -> NoReturn:
        first = " ".join(message.split())
        self.exit(
            EXIT_USAGE, f"onnxpress: error: {first} (see onnxpress {self._command()}--help)\n"
        )

    def _command(self) -> str:
        words = self.prog.split()[1:]
        return " ".join(words) + " " if words else ""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

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
    opt.add_argument(
        "--target",
        action="append",
        metavar="T",
        help="hardware the model must hold on, repeatable: avx2, avx512, avx512-vnni, avx-vnni, "
        "arm64, arm64+dotprod, cuda, host (default: avx2, avx512-vnni and arm64)",
    )
    opt.add_argument("--seed", type=int, default=0, help="seed for random verification inputs")
    opt.add_argument(
        "--pass-timeout",
        type=float,
        metavar="SECONDS",
        help="refuse, naming it, a pass that runs (or a --plugin file that loads) longer than "
        "this (default: no limit)",
    )
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
    ins.add_argument(
        "--target",
        action="append",
        metavar="T",
        help="list the int8 layers that saturate on this hardware (repeatable; see optimize)",
    )
    ins.add_argument(
        "--calibration",
        metavar="FILE|DIR",
        help="measure each saturating layer's error on these inputs (.npz or folder)",
    )

    comp = sub.add_parser("compile", help="compile a model with Apache TVM into a library")
    comp.add_argument("model", help="input .onnx file")
    comp.add_argument(
        "--target",
        default="x86",
        help="avx2, avx512, avx512-vnni, avx-vnni, arm64[+dotprod], cuda[:sm_XX], host "
        "(the names of optimize --target), or x86 (this CPU), x86-64, arm64-linux[+dotprod]",
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
        "--tune-minutes",
        type=float,
        metavar="M",
        help="with --tune-trials: stop starting kernels after M minutes (heaviest kernels "
        "first); the rest keep their default schedules",
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
    comp.add_argument(
        "--parallel",
        choices=("dynamic", "static"),
        default="dynamic",
        help="dynamic: threads of a library for this host (x86) share each kernel's loop "
        "iterations as they go (default); static: TVM's fixed split",
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
    dist.add_argument(
        "--hints",
        type=int,
        default=0,
        metavar="N",
        help="N hint (feature) pairs inferred between student and teacher; a learned 1x1 "
        "adapter where pruned channels differ, dropped afterwards",
    )
    dist.add_argument("--holdout", type=float, default=0.1, help="held-out fraction")
    dist.add_argument("--patience", type=int, default=3, help="early-stopping patience")
    dist.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="cosine",
        help="learning rate over the steps: constant, or a half cosine down to 0 (default)",
    )
    dist.add_argument("--freeze-scales", action="store_true", help="do not learn QDQ scales")
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--json", action="store_true", help="print the report as JSON")
    dist.add_argument("--in-place", action="store_true", help="allow overwriting the input")

    add_search_parser(sub)

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
        timeout = getattr(args, "pass_timeout", None)
        for plugin in [*args.plugin, *getattr(args, "plugin_sub", [])]:
            hung = PluginError(f"{plugin}: plugin did not finish loading within {timeout} s")
            with time_limit(timeout, lambda hung=hung: hung):  # type: ignore[misc]
                load_plugin_file(plugin)
        if args.command == "optimize":
            return optimize_command(args)
        if args.command == "passes":
            return passes_command(args)
        if args.command == "inspect":
            return inspect_command(args)
        if args.command == "distill":
            return distill_command(args)
        if args.command == "compile":
            return compile_command(args)
        if args.command == "run":
            return run_command(args)
        if args.command == "search":
            return search_command(args)
    except KeyboardInterrupt:
        print("\nonnxpress: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OnnxpressError as exc:
        if args.debug:
            raise
        print(f"onnxpress: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, OutputConflictError) else EXIT_ERROR
    except MemoryError:
        if args.debug:
            raise
        print("onnxpress: error: out of memory; nothing was written", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"onnxpress: internal error: {type(exc).__name__}: {_one_line(str(exc))} "
            "(rerun with --debug)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
