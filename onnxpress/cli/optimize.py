"""``onnxpress optimize``: check the options, load, run the verified pipeline, write.

Everything that can be checked without the model is checked first; nothing is written
unless every pass passed verification (``--bisect`` names the first pass that breaks it).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from onnxpress.api import default_pipeline
from onnxpress.cli.paths import optimize_paths
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.errors import ModelSaveError, VerificationError
from onnxpress.core.io import prepare_model, save_model
from onnxpress.core.manager import PassManager, VerifyConfig, bisect
from onnxpress.core.pipeline import load_recipe, parse_pipeline
from onnxpress.core.targets import parse_targets
from onnxpress.report.progress import PassProgress
from onnxpress.report.render import render_report

logger = logging.getLogger("onnxpress")


def _default_output(model: str) -> Path:
    path = Path(model)
    return path.with_name(path.stem + ".opt.onnx")


def optimize_command(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked first.
    recipe = load_recipe(args.recipe) if args.recipe else None
    calibration_path = args.calibration or (recipe.calibration if recipe else None)
    if recipe is not None:
        passes = recipe.passes
    elif args.passes is not None:
        passes = parse_pipeline(args.passes)
    else:
        passes = parse_pipeline(default_pipeline(calibration_path is not None))
    settings = recipe.verify if recipe else None
    targets = parse_targets(args.target) if args.target else None
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
    optimize_paths(args, output, calibration_path)

    model, source = prepare_model(args.model)
    calibration = CalibrationData.from_path(calibration_path) if calibration_path else None
    if args.bisect:
        # Run each prefix of the pipeline and check only its end result: names the first
        # pass that breaks the model even when per-pass checks are relaxed.
        index = bisect(model, passes, verify, calibration, args.seed, targets)
        if index is not None:
            raise VerificationError(
                passes[index].name,
                f"bisect: pass #{index + 1} '{passes[index].spec()}' is the first whose "
                "pipeline prefix fails verification against the original model",
            )
        logger.info("bisect: every prefix of the pipeline passes verification")
    progress = PassProgress(enabled=not args.json)
    manager = PassManager(
        passes,
        verify,
        calibration,
        args.seed,
        on_progress=progress,
        targets=targets,
        pass_timeout=args.pass_timeout,
    )
    try:
        result, report = manager.run(model, copy=False)  # the model was loaded for this run
    except BaseException:
        progress.clear()
        raise
    report.input_path = source
    report.output_path = str(output)
    save_model(result, output, protect=None if args.in_place else args.model)
    if args.report:
        try:
            report.write(args.report)
        except OSError as exc:
            raise ModelSaveError(
                f"{args.report}: cannot write the report: {exc.strerror}"
            ) from None
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(render_report(report))
        print(f"\nwrote {output}" + (f" and {args.report}" if args.report else ""))
    return 0
