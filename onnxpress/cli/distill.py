"""``onnxpress distill``: fine-tune a compressed student against its teacher (torch).

Progress is an epoch bar on stderr (plain lines when stderr is not a terminal); the report
is printed, or written as JSON with ``--json``. A run that does not lower the held-out loss
writes nothing: it prints "no improvement: kept the input weights" and why, and exits 3
(``EXIT_NO_IMPROVEMENT``); a degenerate loss (NaN, negative) is an error (exit 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxpress.cli.paths import distill_paths
from onnxpress.core.errors import PipelineError
from onnxpress.core.io import save_model
from onnxpress.report.progress import EpochBar

EXIT_NO_IMPROVEMENT = 3


def distill_command(args: argparse.Namespace) -> int:
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
        hints=args.hints,
        holdout=args.holdout,
        patience=args.patience,
        schedule=args.schedule,
        learn_scales=not args.freeze_scales,
        seed=args.seed,
    )
    path = Path(args.model)
    output = Path(args.output) if args.output else path.with_name(path.stem + ".distilled.onnx")
    distill_paths(args, output)
    require_torch()
    progress = EpochBar(enabled=not args.json)
    tuned, report = distill(
        args.model,
        args.teacher,
        args.data,
        labels=args.labels,
        options=options,
        on_progress=progress,
    )
    progress.close()
    if report.improved:
        save_model(tuned, output, protect=None if args.in_place else args.model)
    if args.json:
        written = str(output) if report.improved else None
        print(json.dumps({**asdict(report), "output_path": written}, indent=2))
    elif report.improved:
        print(report.describe())
        print(f"\nwrote {output}")
    else:
        print(report.describe())
        print(f"\nnothing written: {output} would hold the input's weights")
    return 0 if report.improved else EXIT_NO_IMPROVEMENT
