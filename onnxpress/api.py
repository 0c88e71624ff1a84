"""The Python entry point: ``onnxpress.optimize(model_or_path, passes=..., calibration=...)``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.io import prepare_model
from onnxpress.core.manager import PassManager, ProgressCallback, VerifyConfig
from onnxpress.core.pass_base import Pass
from onnxpress.core.pipeline import DEFAULT_LOSSLESS, DEFAULT_WITH_CALIBRATION, parse_pipeline
from onnxpress.core.report import Report
from onnxpress.core.targets import parse_targets

CalibrationLike = (
    CalibrationData | str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | None
)


def default_pipeline(with_calibration: bool) -> str:
    return DEFAULT_WITH_CALIBRATION if with_calibration else DEFAULT_LOSSLESS


def resolve_passes(passes: str | list[Pass[Any]] | None, with_calibration: bool) -> list[Pass[Any]]:
    if passes is None:
        return parse_pipeline(default_pipeline(with_calibration))
    if isinstance(passes, str):
        return parse_pipeline(passes)
    return list(passes)


def optimize(
    model: onnx.ModelProto | str | os.PathLike[str],
    passes: str | list[Pass[Any]] | None = None,
    calibration: CalibrationLike = None,
    *,
    verify: VerifyConfig | str = "numeric",
    seed: int = 0,
    on_progress: ProgressCallback | None = None,
    targets: Sequence[str] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Run a pipeline over a model and return the optimized model and its report.

    ``passes`` is pipeline text (``"fold-constants,svd{energy=0.9}"``), a list of Pass
    instances, or None for the default pipeline. ``calibration`` is a CalibrationData, an
    ``.npz`` file or folder, or an iterable of input dicts. ``targets`` names the hardware
    the result must hold on (``onnxpress.core.targets``; default: every CPU kind
    onnxruntime has int8 kernels for). The input is never modified.
    """
    chosen_targets = parse_targets(tuple(targets)) if targets else None
    calib = CalibrationData.coerce(
        Path(calibration) if isinstance(calibration, os.PathLike) else calibration
    )
    pass_list = resolve_passes(passes, calib is not None)
    config = VerifyConfig(level=verify) if isinstance(verify, str) else verify  # type: ignore[arg-type]
    loaded, source = prepare_model(model)
    result, report = PassManager(pass_list, config, calib, seed, on_progress, chosen_targets).run(
        loaded
    )
    report.input_path = None if source == "<model>" else source
    return result, report
