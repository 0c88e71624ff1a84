"""``onnxpress search --distill``: each Pareto model distilled from the original afterwards,
measured again, and kept only where it measures better; search.json, the recipe and the
report say which points were distilled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxpress.cli.main import main
from onnxpress.search.objectives import EvalSet, top1_accuracy

pytest.importorskip("torch")

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = str(MODELS / "mlp_digits.onnx")
CALIB = str(MODELS / "data" / "mlp_digits_calib.npz")
EVAL = str(MODELS / "data" / "mlp_digits_eval.npz")


def test_distill_finishes_the_front(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["search", MODEL, "--calibration", CALIB, "--eval", EVAL, "--trials", "3"]
    args += ["--metric", "onnxpress.search.objectives:top1_accuracy"]
    args += ["--objectives", "accuracy,size", "--distill", "--distill-epochs", "2"]
    code = main([*args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "distilled" in printed
    stored = json.loads((out / "search.json").read_text())
    assert stored["distill"] is True and stored["front"]
    eval_set = EvalSet.from_npz(EVAL, onnx.load(MODEL))
    for point in stored["front"]:
        done = point["distilled"]
        assert done is not None and done["failure"] is None
        assert done["details"]["epochs_run"] >= 1
        trial = next(t for t in stored["trials"] if t["number"] == point["trial"])
        assert done["before"] == trial["values"]
        session = ort.InferenceSession(str(out / point["model"]))
        logits = np.concatenate([session.run(None, b)[0] for b in eval_set.batches])
        accuracy = top1_accuracy([logits], eval_set.labels)
        recipe = (out / point["recipe"]).read_text()
        if done["kept"]:  # the saved model is the distilled one, and measured better
            assert done["after"]["accuracy"] > done["before"]["accuracy"]
            assert point["values"] == done["after"]
            assert accuracy == pytest.approx(done["after"]["accuracy"])
            assert "then distilled" in recipe
        else:
            assert point["values"] == done["before"]
            assert accuracy == pytest.approx(done["before"]["accuracy"])
            assert "then distilled" not in recipe
    report = (out / "report.html").read_text()
    assert "<th>distilled</th>" in report
