"""``onnxpress search --distill``: the finisher that distills each Pareto model.

The search package does not import the training one (they are sibling layers), so the CLI
builds the ``Finisher`` of ``onnxpress.search.finish`` here: knowledge distillation
(``onnxpress.train.distill``) of the front model from the original model on the calibration
data, without labels (the held-out evaluation set stays unseen), one thread, the search's
seed. A front point keeps the distilled model only where it measures better.
"""

from __future__ import annotations

from typing import Any

import onnx

from onnxpress.core.calibration_data import CalibrationData
from onnxpress.search.finish import Finisher


def distill_finisher(epochs: int, seed: int) -> Finisher:
    """A Finisher that distills for up to ``epochs`` epochs; refuses early without torch."""
    from onnxpress.train.distill import distill
    from onnxpress.train.distill_options import DistillOptions, require_torch

    require_torch()  # a one-line error before anything runs when torch is missing
    options = DistillOptions(epochs=epochs, seed=seed, threads=1)

    def finish(
        student: onnx.ModelProto, teacher: onnx.ModelProto, data: CalibrationData
    ) -> tuple[onnx.ModelProto, dict[str, Any]]:
        tuned, report = distill(student, teacher, data, options=options)
        details = {
            "epochs_run": report.epochs_run,
            "best_epoch": report.best_epoch,
            "verdict": report.verdict,
            "seconds": round(report.seconds, 2),
        }
        return tuned, details

    return finish
