"""The TVM bench zoo: real-size architectures compiled by ``onnxpress compile`` against
onnxruntime, fp32 and (with ``--int8``) int8, at batch 1 and batch 8.

  python tools/bench_tvm_zoo.py --models resnet18,encoder [--int8] [--tune-minutes M]
                                [--batches 1,8] [--rounds 7] [--target x86] [--busy-core]
                                [--json]

Per model and batch: export it (tools/_zoo_models.py: torchvision / transformers' BertModel /
torch, random weights, generated here, never committed), compile it for ``--target`` (default
this CPU, both cores) with onnxpress's default schedules, ``--tune-minutes`` adding
MetaSchedule tuning into one database shared by all models (``--tuning-db``); compile_model
checks every library against onnxruntime (max-rel 1e-4 fp32, one quantization step int8
beyond onnxruntime's own spread).
With ``--int8`` the model is also quantized by the default calibrated pipeline (``qdq``) on
random calibration batches, and that QDQ model runs on onnxruntime (its int8 kernels) and on
TVM (``--int8 auto``: integer kernels). onnxruntime's own ``quantize_static`` also
quantizes the model from the same batches (tools/_ort_quantizer.py), and both runtimes run
that model too. The default ``qdq`` keeps weights safe on x86 without VNNI, often as uint8
weights that onnxruntime runs on slower kernels, and keeps layers float where the task
metric asks for it; onnxruntime's model is its fastest int8, the fairer speed baseline.
All runners of one model and batch (onnxruntime and TVM, fp32 and int8) are timed in the same interleaved rounds (tools/_timing.py), both cores;
medians, ratios = TVM / onnxruntime within the run (> 1: TVM is slower). ``--busy-core``
times them while a spinning process holds one CPU (a device that runs other work too).

``--json`` prints one JSON object per model and batch: model, batch, ort_ms, tvm_ms, ratio,
ort_int8_ms, tvm_int8_ms, int8_ratio (null without --int8), compile_s (fp32 compile, tuning
included), max_rel_err (fp32 library vs onnxruntime at compile time), plus int8_compile_s,
int8_error_steps (quantization steps; limit one step beyond int8_spread_steps, onnxruntime's
own distance from exact integer sums), quantize_s (the default pipeline's optimize),
int8_float_layers (layers the default ``qdq`` kept float to hold the task metric),
ort_quantizer_int8_ms and tvm_quantizer_int8_ms (the two runtimes on onnxruntime's
quantizer's model), quantizer_int8_ratio (TVM over onnxruntime on that model),
int8_ratio_vs_ort_quantizer (TVM on onnxpress's model over onnxruntime on its own) and
tune_s. Without it, a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import onnxpress
from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.runtime import CompiledModel
from onnxpress.backends.tvm.tune import TuneOptions
from onnxpress.core.errors import OnnxpressError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ort_quantizer import ort_quantized
from _timing import busy_core, interleaved_ms, session

CALIBRATION_BATCHES = 4
# --tune-minutes M asks MetaSchedule for M * 60 / SECONDS_PER_TRIAL trials, spread over the
# kernels; the time budget (TuneOptions.minutes) stops it from starting kernels once M
# minutes are spent, so the count only needs to be enough to fill them. A conv candidate
# took ~2.5 s to build and time while TVM ran on one core; 0.4-0.6 s since it uses both
# (240 trials in 90 s for the encoder, 143 s for resnet18).
SECONDS_PER_TRIAL = 0.5
KEYS = (
    "model",
    "batch",
    "ort_ms",
    "tvm_ms",
    "ratio",
    "ort_int8_ms",
    "tvm_int8_ms",
    "int8_ratio",
    "compile_s",
    "max_rel_err",
)


def calibration_batches(feed: Mapping[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    """``count`` random input dicts shaped like ``feed``: float inputs redrawn from a normal
    distribution, integer inputs (token ids, masks) kept as they are."""
    rng = np.random.default_rng(1)
    return [
        {
            name: rng.standard_normal(a.shape).astype(a.dtype) if a.dtype.kind == "f" else a
            for name, a in feed.items()
        }
        for _ in range(count)
    ]


def _verification_error(manifest: Mapping[str, Any]) -> float:
    checks = manifest.get("verification") or {}
    return max(checks.get("errors", {}).values(), default=float("nan"))


def compile_timed(
    model: onnx.ModelProto, folder: Path, target: str, **options: Any
) -> tuple[CompiledModel, dict[str, Any], float]:
    """Compile (and verify) ``model`` into ``folder``: (loaded library, manifest, seconds)."""
    start = time.perf_counter()
    result = compile_model(model, target, folder, **options)
    seconds = time.perf_counter() - start
    return CompiledModel(result.library), result.manifest, seconds


def measure(
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    folder: Path,
    *,
    name: str,
    batch: int,
    int8: bool,
    rounds: int,
    target: str = "x86",
    tuning: TuneOptions | None = None,
    threads: int | None = None,
    busy: bool = False,
) -> dict[str, Any]:
    """One zoo row: compile ``model`` (and its QDQ form with ``int8``), then time onnxruntime
    and TVM on ``feed`` in the same interleaved rounds."""
    threads = threads or os.cpu_count() or 1
    arrays = [np.ascontiguousarray(a) for a in feed.values()]
    row: dict[str, Any] = dict.fromkeys(KEYS)
    row.update(model=name, batch=batch, tune_s=None, int8_compile_s=None, int8_error_steps=None)
    row.update(quantize_s=None, int8_spread_steps=None, int8_float_layers=None)
    row.update(ort_quantizer_int8_ms=None, tvm_quantizer_int8_ms=None)
    row.update(quantizer_int8_ratio=None, int8_ratio_vs_ort_quantizer=None)
    fp32, manifest, row["compile_s"] = compile_timed(
        model, folder / f"{name}-b{batch}-fp32", target, tuning=tuning
    )
    row["max_rel_err"] = _verification_error(manifest)
    if manifest.get("tuning"):
        row["tune_s"] = manifest["tuning"]["seconds"]
    ort_fp32 = session(model, threads)
    runners: dict[str, Callable[[], Any]] = {
        "ort": lambda: ort_fp32.run(None, dict(feed)),
        "tvm": lambda: fp32(*arrays),
    }
    if int8:
        start = time.perf_counter()
        qdq, report = onnxpress.optimize(
            model, calibration=calibration_batches(feed, CALIBRATION_BATCHES)
        )
        counts = [p.result.counts for p in report.passes if p.name == "qdq"]
        row["int8_float_layers"] = counts[0].get("fallback_layers", 0) if counts else None
        row["quantize_s"] = time.perf_counter() - start
        lowered, int8_manifest, row["int8_compile_s"] = compile_timed(
            qdq, folder / f"{name}-b{batch}-int8", target, int8="auto"
        )
        row["int8_error_steps"] = _verification_error(int8_manifest)
        spread = (int8_manifest.get("verification") or {}).get("onnxruntime_spread", {})
        row["int8_spread_steps"] = max(spread.values(), default=None)
        ort_int8 = session(qdq, threads)
        runners["ort_int8"] = lambda: ort_int8.run(None, dict(feed))
        runners["tvm_int8"] = lambda: lowered(*arrays)
        theirs = ort_quantized(model, calibration_batches(feed, CALIBRATION_BATCHES))
        if theirs is not None:
            ort_theirs = session(theirs, threads)
            runners["ort_quantizer_int8"] = lambda: ort_theirs.run(None, dict(feed))
            try:  # on x86 without VNNI onnxruntime's sums saturate: the check may fail
                tvm_theirs, _, _ = compile_timed(
                    theirs, folder / f"{name}-b{batch}-quantizer", target, int8="auto"
                )
                runners["tvm_quantizer_int8"] = lambda: tvm_theirs(*arrays)
            except OnnxpressError as error:
                row["quantizer_error"] = str(error)
    with busy_core() if busy else contextlib.nullcontext():
        timed = interleaved_ms(runners, rounds)
    row["ort_ms"], row["tvm_ms"] = timed["ort"], timed["tvm"]
    row["ratio"] = timed["tvm"] / timed["ort"]
    if int8:
        row["ort_int8_ms"], row["tvm_int8_ms"] = timed["ort_int8"], timed["tvm_int8"]
        row["int8_ratio"] = timed["tvm_int8"] / timed["ort_int8"]
        if "ort_quantizer_int8" in timed:
            ort_theirs_ms = row["ort_quantizer_int8_ms"] = timed["ort_quantizer_int8"]
            if "tvm_quantizer_int8" in timed:
                row["tvm_quantizer_int8_ms"] = timed["tvm_quantizer_int8"]
                row["quantizer_int8_ratio"] = timed["tvm_quantizer_int8"] / ort_theirs_ms
            row["int8_ratio_vs_ort_quantizer"] = timed["tvm_int8"] / ort_theirs_ms
    return row


def _cell(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


MARKDOWN_HEADER = (
    "| model | batch | ORT ms | TVM ms | ratio | ORT int8 ms | TVM int8 ms | int8 ratio "
    "| TVM int8 / fp32 | ORT quantizer int8 ms | TVM on it ms | ratio on it | compile s "
    "| max-rel |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(r: Mapping[str, Any]) -> str:
    speedup = r["tvm_int8_ms"] / r["tvm_ms"] if r["tvm_int8_ms"] is not None else None
    return (
        f"| {r['model']} | {r['batch']} | {r['ort_ms']:.2f} | {r['tvm_ms']:.2f} | "
        f"{r['ratio']:.2f} | {_cell(r['ort_int8_ms'], 2)} | {_cell(r['tvm_int8_ms'], 2)} | "
        f"{_cell(r['int8_ratio'], 2)} | {_cell(speedup, 2)} | "
        f"{_cell(r['ort_quantizer_int8_ms'], 2)} | {_cell(r['tvm_quantizer_int8_ms'], 2)} | "
        f"{_cell(r['quantizer_int8_ratio'], 2)} | "
        f"{r['compile_s']:.1f} | "
        f"{r['max_rel_err']:.1e} |"
    )


def _rounded(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}


def main(argv: list[str] | None = None) -> int:
    from _zoo_models import ZOO, export

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help=f"comma-separated: {','.join(ZOO)}")
    parser.add_argument("--int8", action="store_true", help="also quantize and time int8")
    parser.add_argument("--tune-minutes", type=float, default=0.0, help="MetaSchedule per model")
    parser.add_argument("--tuning-db", type=Path, help="database shared by all models")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--target", default="x86")
    parser.add_argument("--busy-core", action="store_true", help="time with one CPU kept busy")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(ZOO)}")
    if args.busy_core and not hasattr(os, "sched_setaffinity"):
        parser.error("--busy-core needs CPU affinity (os.sched_setaffinity: Linux)")
    batches = [int(b) for b in args.batches.split(",")]
    if not args.json:
        print(MARKDOWN_HEADER, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        database = args.tuning_db or Path(tmp) / "tuning-db"
        tuning = (
            TuneOptions(
                trials=max(1, round(args.tune_minutes * 60 / SECONDS_PER_TRIAL)),
                database=database,
                minutes=args.tune_minutes,
            )
            if args.tune_minutes > 0
            else None
        )
        for name in names:
            for batch in batches:
                model, feed = export(name, batch)
                try:
                    row = measure(
                        model, feed, Path(tmp), name=name, batch=batch, int8=args.int8,
                        rounds=args.rounds, target=args.target, tuning=tuning,
                        busy=args.busy_core,
                    )  # fmt: skip
                except OnnxpressError as error:  # one failed model does not end the run
                    failed = {"model": name, "batch": batch, "error": str(error)}
                    print(json.dumps(failed) if args.json else f"| {name} | {batch} | {error} |")
                    continue
                print(json.dumps(_rounded(row)) if args.json else markdown_row(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
