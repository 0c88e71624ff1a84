"""The finishing step on the front (``--distill``): a tuned model is measured like a trial and
replaces the trial's model only where it is more accurate at no larger size; a step that
fails leaves the model as it was and says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import optuna
import pytest

from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.manager import PassManager, VerifyConfig
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.targets import parse_targets
from onnxpress.search.finish import describe, finish_front
from onnxpress.search.objectives import EvalSet, Scorer, model_outputs, top1_accuracy
from onnxpress.search.trial import Evaluator

MODELS = Path(__file__).resolve().parents[2] / "models"
PRUNE = "fold-constants,prune-channels{{macs=0.3,allocation=uniform,reconstruct={}}}"


def test_a_better_tuned_model_is_kept_and_a_larger_or_failed_one_is_not() -> None:
    model = onnx.load(str(MODELS / "mlp_digits.onnx"))
    data = CalibrationData.from_path(MODELS / "data" / "mlp_digits_calib.npz").fitted_to(model)
    eval_set = EvalSet.from_npz(MODELS / "data" / "mlp_digits_eval.npz", model)
    scorer = Scorer(eval_set, model_outputs(model, eval_set), top1_accuracy, "top1")
    evaluator = Evaluator(model, data, scorer, None, parse_targets(None))
    objectives = ("accuracy", "size")
    baseline = evaluator.measure(model, with_latency=False)

    def pruned(reconstruct: str) -> onnx.ModelProto:
        passes = parse_pipeline(PRUNE.format(reconstruct))
        return PassManager(passes, VerifyConfig(level="off"), data).run(model)[0]

    # the same channels removed; refitting the layers that lost inputs recovers accuracy
    student, refit = pruned("false"), pruned("true")
    measured = evaluator.measure(student, with_latency=False)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for _ in range(3):
        study.add_trial(
            optuna.trial.create_trial(values=measured.values(list(objectives), baseline))
        )
    front = study.trials
    models = {t.number: student for t in front}
    offers = iter([refit, model, None])  # trial 0, 1, 2 in front order; None: it raises

    def finisher(
        tuned: onnx.ModelProto, teacher: onnx.ModelProto, _: CalibrationData
    ) -> tuple[onnx.ModelProto, dict[str, Any]]:
        assert tuned is student and teacher is model
        offer = next(offers)
        if offer is None:
            raise RuntimeError("no torch kernel for this op")
        return offer, {}

    done = finish_front(front, models, model, data, finisher, evaluator, objectives, baseline)
    assert done[0].after is not None and done[0].after["accuracy"] > done[0].before["accuracy"]
    assert done[0].kept and models[0] is refit
    # the float model is more accurate, but about 3x the size: not an improvement of the point
    assert not done[1].kept and models[1] is student
    assert done[1].after is not None and done[1].after["size"] == pytest.approx(1.0)
    assert not done[2].kept and models[2] is student and done[2].after is None
    assert "RuntimeError: no torch kernel" in (done[2].failure or "")
    assert describe(done[0].to_json()).startswith("kept: accuracy")
    assert describe(done[2].to_json()).startswith("failed: RuntimeError")
