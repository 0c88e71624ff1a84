"""The ``compile`` and ``run`` subcommands (Apache TVM), kept apart so the core CLI never
imports TVM. Errors are OnnxpressErrors, rendered as one line by ``onnxpress.cli.main``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxpress.cli.paths import compile_paths, run_paths
from onnxpress.core.calibration_data import read_npz
from onnxpress.core.errors import CalibrationError, ModelSaveError, OnnxpressError
from onnxpress.report.progress import TuningBar
from onnxpress.report.render import render_report, table

if TYPE_CHECKING:
    from onnxpress.backends.tvm.tune import TuneOptions


class OutputMismatchError(OnnxpressError):
    """``run --verify``: the compiled library disagrees with onnxruntime."""


def _tune_options(args: argparse.Namespace) -> TuneOptions | None:
    from onnxpress.backends.tvm.rpc import parse_rpc
    from onnxpress.backends.tvm.tune import TuneOptions, TuningError, default_database

    rpc = parse_rpc(args.rpc) if args.rpc else None
    if not args.tune_trials:
        if rpc is not None or args.tuning_db or args.tune_minutes:
            raise TuningError("--rpc, --tuning-db and --tune-minutes need --tune-trials N")
        return None
    database = Path(args.tuning_db).expanduser() if args.tuning_db else default_database()
    return TuneOptions(args.tune_trials, database, rpc, args.seed, args.tune_minutes)


def _tuning_line(tuning: dict[str, Any]) -> str:
    tasks = tuning["tasks"]
    tuned = sum(1 for t in tasks if not t["reused"])
    line = (
        f"tuned {tuned} of {len(tasks)} kernels: {tuning['trials_run']} trials "
        f"({tuning['measured_on']}, {tuning['cost_model'] or 'no search'}) in "
        f"{tuning['seconds']:.0f}s; reused {len(tasks) - tuned} kernels "
        f"({tuning['records_reused']} records) from {tuning['database']}\n"
        f"{tuning['kernels_applied']} of {len(tasks)} kernels use their best tuned schedule; "
        "the others keep the default schedule (faster, or never measured)"
    )
    model_ms = tuning.get("model_ms")
    if model_ms:
        kept = "tuned" if tuning["kernels_applied"] else "untuned (tuning did not pay off)"
        line += (
            f"\nwhole model at compile time: tuned {model_ms['tuned']:.3f} ms, untuned "
            f"{model_ms['default']:.3f} ms; kept {kept}"
        )
    for kernel, reason in tuning.get("skipped", {}).items():
        line += f"\n  not tuned: {kernel}: {reason}"
    timing = tuning.get("library_timing")
    if timing:
        line += f"\nlatency on the RPC device: {timing['median_ms']:.3f} ms (median)"
    return line


def _kernel_line(lowering: dict[str, Any]) -> str:
    """Which kernel ran how many layers, and why some took the exact AVX2 fallback."""
    counts: dict[str, int] = {}
    for layer in lowering.get("layers", []):
        counts[layer["kernel"]] = counts.get(layer["kernel"], 0) + 1
    line = "  kernels: " + (", ".join(f"{k} {n}" for k, n in counts.items()) or "none")
    risky = [layer for layer in lowering.get("layers", []) if layer.get("pairs_at_risk")]
    if risky:
        line += (
            f"\n  {len(risky)} layer(s) on the exact int16 kernel: their 8-bit weights could "
            "saturate vpmaddubsw's int16 pair sums for some activation byte; "
            "qdq{saturation=narrow} (7-bit weights) makes every layer safe for vpmaddubsw"
        )
    return line


def compile_command(args: argparse.Namespace) -> int:
    from onnxpress.backends.tvm.backend import compile_model, require_tvm
    from onnxpress.backends.tvm.build import LIBRARY_STEM
    from onnxpress.backends.tvm.prepare import parse_input_shapes
    from onnxpress.backends.tvm.targets import parse_target

    shapes = parse_input_shapes(args.input_shape)
    spec = parse_target(args.target)
    compile_paths(args, [LIBRARY_STEM + spec.library_suffix, "manifest.json", "README.md"])
    tuning = _tune_options(args)
    require_tvm()
    bar = TuningBar(enabled=not args.json)
    try:
        result = compile_model(
            args.model,
            spec,
            args.output,
            input_shapes=shapes,
            default_schedules=not args.no_default_schedules,
            verify=not args.no_verify,
            seed=args.seed,
            int8=args.int8,
            gru=args.gru,
            parallel=args.parallel,
            tuning=tuning,
            on_tuning_progress=bar,
        )
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.manifest, indent=2))
        return 0
    if result.report is not None:
        print(render_report(result.report))
        print()
    for note in result.notes:
        print(f"note: {note}")
    lowering = result.manifest.get("int8")
    if lowering:
        done = ", ".join(f"{n} {op}" for op, n in lowering["lowered"].items()) or "nothing"
        print(f"int8 ({lowering['kernel']} kernels): lowered {done}")
        for reason, n in lowering["kept_float"].items():
            print(f"  kept in float: {n} x {reason}")
        print(_kernel_line(lowering))
    check = result.manifest.get("verification")
    if check:
        worst = max(check["errors"], key=lambda k: check["errors"][k] / check["limits"][k])
        print(
            f"verified against onnxruntime: {check['metric']} {check['errors'][worst]:.2g} "
            f"<= {check['limits'][worst]:g} (output '{worst}')"
        )
    if result.manifest.get("tuning"):
        print(_tuning_line(result.manifest["tuning"]))
    times = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    print(f"target {spec.name} {json.dumps(spec.config)}; {times}")
    print(f"wrote {result.library}, manifest.json and README.md in {result.output_dir}")
    return 0


def _load_npz(path: str) -> dict[str, np.ndarray]:
    return read_npz(Path(path))


def run_command(args: argparse.Namespace) -> int:
    from onnxpress.backends.tvm.runtime import (
        compare_outputs,
        load_manifest,
        reference_outputs,
        run_compiled,
    )

    run_paths(args)
    manifest = load_manifest(args.folder)
    arrays = _load_npz(args.inputs)
    names = [entry["name"] for entry in manifest["inputs"]]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise CalibrationError(
            f"{args.inputs}: no array for input(s) {missing} (has {sorted(arrays)})"
        )
    inputs = {n: arrays[n] for n in names}
    outputs = run_compiled(args.folder, inputs)
    rows = [
        [name, str(value.dtype), "x".join(map(str, value.shape)), f"{float(np.mean(value)):.4g}"]
        for name, value in outputs.items()
    ]
    print(table(["output", "dtype", "shape", "mean"], rows))
    if args.output:
        arrays_out: dict[str, Any] = dict(outputs)
        try:
            with open(args.output, "wb") as fh:  # this path exactly (np.savez adds ".npz")
                np.savez(fh, **arrays_out)
        except OSError as exc:
            raise ModelSaveError(f"{args.output}: cannot write: {exc.strerror}") from None
        print(f"wrote {args.output}")
    if args.verify:
        from onnxpress.core.io import prepare_model

        model, _ = prepare_model(args.verify)
        dtypes = {e["name"]: np.dtype(e["dtype"]) for e in manifest["inputs"]}
        expected = reference_outputs(model, {n: a.astype(dtypes[n]) for n, a in inputs.items()})
        errors = compare_outputs(expected, outputs)
        worst = max(errors, key=lambda k: errors[k])
        verdict = f"max-rel {errors[worst]:.2g} (output '{worst}') vs onnxruntime on {args.verify}"
        if not errors[worst] <= args.tolerance:
            raise OutputMismatchError(f"{verdict} > {args.tolerance:g}")
        print(f"verified: {verdict} <= {args.tolerance:g}")
    return 0


__all__ = ["compile_command", "run_command"]
