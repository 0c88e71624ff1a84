"""The ``compile`` and ``run`` subcommands (Apache TVM), kept apart so the core CLI never
imports TVM. Errors are OnnxpressErrors, rendered as one line by ``onnxpress.cli.main``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.errors import CalibrationError, OnnxpressError
from onnxpress.render import render_report, table


class OutputMismatchError(OnnxpressError):
    """``run --verify``: the compiled library disagrees with onnxruntime."""


def compile_command(args: argparse.Namespace) -> int:
    from onnxpress.tvm_backend import compile_model, require_tvm
    from onnxpress.tvm_prepare import parse_input_shapes
    from onnxpress.tvm_targets import parse_target

    shapes = parse_input_shapes(args.input_shape)
    spec = parse_target(args.target)
    require_tvm()
    result = compile_model(
        args.model,
        spec,
        args.output,
        input_shapes=shapes,
        default_schedules=not args.no_default_schedules,
        verify=not args.no_verify,
        seed=args.seed,
        int8=args.int8,
    )
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
    check = result.manifest.get("verification")
    if check:
        worst = max(check["errors"], key=lambda k: check["errors"][k] / check["limits"][k])
        print(
            f"verified against onnxruntime: {check['metric']} {check['errors'][worst]:.2g} "
            f"<= {check['limits'][worst]:g} (output '{worst}')"
        )
    times = ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
    print(f"target {spec.name} {json.dumps(spec.config)}; {times}")
    print(f"wrote {result.library}, manifest.json and README.md in {result.output_dir}")
    return 0


def _load_npz(path: str) -> dict[str, np.ndarray]:
    if not Path(path).is_file():
        raise CalibrationError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz file ({exc})") from None


def run_command(args: argparse.Namespace) -> int:
    from onnxpress.tvm_backend import (
        compare_outputs,
        load_manifest,
        reference_outputs,
        run_compiled,
    )

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
        np.savez(args.output, **arrays_out)
        print(f"wrote {args.output}")
    if args.verify:
        from onnxpress.api import prepare_model

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
