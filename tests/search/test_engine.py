"""The search on a bundled model with its real data: the front, the outputs, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxpress.core.pipeline import load_recipe
from onnxpress.search import engine
from onnxpress.search.engine import SearchConfig, search
from onnxpress.search.front import search_json, write_outputs
from onnxpress.search.objectives import EvalSet, top1_accuracy
from onnxpress.search.space import SearchSpace
from onnxpress.search.study import INTERRUPTED, counted, measured

MODELS = Path(__file__).resolve().parents[2] / "models"


def _config(out: Path, **changes: object) -> SearchConfig:
    settings: dict[str, object] = {
        "model": str(MODELS / "mlp_digits.onnx"),
        "calibration": str(MODELS / "data" / "mlp_digits_calib.npz"),
        "eval_data": str(MODELS / "data" / "mlp_digits_eval.npz"),
        "metric": "onnxpress.search.objectives:top1_accuracy",
        "objectives": ("accuracy", "size"),
        "trials": 20,
        "out": out,
    }
    settings.update(changes)
    return SearchConfig(**settings)  # type: ignore[arg-type]


def _front(outcome: engine.SearchOutcome) -> list[tuple[str, tuple[float, ...]]]:
    return sorted((t.user_attrs["pipeline"], tuple(t.values)) for t in outcome.front)


def _dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    signs = [1 if d == "maximize" else -1 for d in directions]
    better = [s * (x - y) for s, x, y in zip(signs, a, b, strict=True)]
    return all(v >= 0 for v in better) and any(v > 0 for v in better)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> engine.SearchOutcome:
    out = tmp_path_factory.mktemp("search")
    return search(_config(out))


def test_front_is_measured_and_non_dominated(uninterrupted: engine.SearchOutcome) -> None:
    outcome = uninterrupted
    complete = [t for t in outcome.trials if measured(t)]
    assert len(outcome.trials) == 20 and len(complete) >= 15
    directions = ["maximize", "minimize"]
    for point in outcome.front:
        assert not any(_dominates(t.values, point.values, directions) for t in complete)
    # every completed trial is on the front or dominated by a front point
    front_numbers = {p.number for p in outcome.front}
    for trial in complete:
        assert (
            trial.number in front_numbers
            or trial.user_attrs.get("repeats") in front_numbers
            or any(_dominates(p.values, trial.values, directions) for p in outcome.front)
        )
    # the single-pass pipelines were measured first, and the front holds or beats each one
    assert set(outcome.references) == {"qdq", "svd{budget=0.75}", "prune-channels{macs=0.75}"}
    for number in outcome.references.values():
        reference = outcome.study.trials[number]
        assert reference.number in front_numbers or any(
            _dominates(p.values, reference.values, directions) for p in outcome.front
        )
    assert min(p.values[1] for p in outcome.front) < 0.4  # int8 at least: < 0.4x the bytes
    # qdq trials after the first took the float graph's calibration statistics from it
    assert outcome.statistics is not None and outcome.statistics.hits > 0


def test_front_models_match_their_values(uninterrupted: engine.SearchOutcome) -> None:
    outcome = uninterrupted
    model = onnx.load(outcome.config.model)
    eval_set = EvalSet.from_npz(outcome.config.eval_data or "", model)
    for point in outcome.front:
        compressed = outcome.models[point.number]
        session = ort.InferenceSession(compressed.SerializeToString())
        logits = np.concatenate([session.run(None, b)[0] for b in eval_set.batches])
        assert top1_accuracy([logits], eval_set.labels) == pytest.approx(point.values[0])
        assert compressed.ByteSize() / outcome.baseline.bytes == pytest.approx(point.values[1])


def test_outputs_and_recipes(uninterrupted: engine.SearchOutcome, tmp_path: Path) -> None:
    outcome = uninterrupted
    data = search_json(outcome)
    write_outputs(outcome, data, {"extra.txt": b"x"})
    out = outcome.config.out
    stored = json.loads((out / "search.json").read_text())
    assert [f["trial"] for f in stored["front"]] == [t.number for t in outcome.front]
    for point in stored["front"]:
        assert (out / point["model"]).is_file()
        recipe = load_recipe(out / point["recipe"])
        assert ",".join(p.spec() for p in recipe.passes) == point["pipeline"]
    assert (out / "extra.txt").read_bytes() == b"x"
    assert stored["calibration_statistics"]["reused"] == outcome.statistics.hits  # type: ignore[union-attr]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_interrupted_search_resumes_with_the_same_front(
    uninterrupted: engine.SearchOutcome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_pipeline = SearchSpace.pipeline
    calls = {"n": 0}

    def ctrl_c_in_trial_8(self: SearchSpace, params: dict[str, object]) -> str:
        calls["n"] += 1  # once per trial, after its choices were sampled
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_pipeline(self, params)

    monkeypatch.setattr(SearchSpace, "pipeline", ctrl_c_in_trial_8)
    with pytest.raises(KeyboardInterrupt):
        search(_config(tmp_path))
    monkeypatch.setattr(SearchSpace, "pipeline", real_pipeline)
    resumed = search(_config(tmp_path))
    trials = resumed.study.get_trials(deepcopy=False)
    assert sum(counted(t) for t in trials[:8]) == 7 and trials[7].user_attrs[INTERRUPTED]
    assert resumed.ran == 13 and len(resumed.trials) == 20
    assert _front(resumed) == _front(uninterrupted)
