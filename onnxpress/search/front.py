"""The results of a search as data (``search_json``) and as files in the search folder.

``write_outputs`` puts, all or nothing (staged in a hidden folder, then renamed into place):

- ``pareto/trial-N.onnx``: each non-dominated model, and ``pareto/trial-N.toml``, its recipe
  (``onnxpress optimize MODEL --recipe pareto/trial-N.toml --target ...`` rebuilds it);
- ``search.json``: the configuration, the baseline, the space, every trial with its pipeline,
  objective values, measurements, where its latency was measured and why it failed;
- any further files it is given (the HTML report and its plots).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from onnxpress.core.io import save_model
from onnxpress.search.engine import SearchOutcome
from onnxpress.search.study import FAILURE, INTERRUPTED, failed
from onnxpress.search.trial import VERIFY_BUDGET

PARETO = "pareto"
SEARCH_JSON = "search.json"


def trial_json(trial: FrozenTrial, objectives: tuple[str, ...]) -> dict[str, Any]:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "state": "fail" if failed(trial) else trial.state.name.lower(),
        "params": dict(trial.params),
        "pipeline": attrs.get("pipeline"),
        "values": dict(zip(objectives, trial.values, strict=True))
        if trial.values and not failed(trial)
        else None,
        "measured": attrs.get("measured"),
        "choices": attrs.get("choices", []),
        "latency_measured_on": attrs.get("latency_where") or None,
        "failure": attrs.get(FAILURE),
        "interrupted": bool(attrs.get(INTERRUPTED)),
        "feasible": float(attrs.get("constraint", 0.0)) <= 0.0,
        "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start
        else None,
    }


def search_json(outcome: SearchOutcome) -> dict[str, Any]:
    config = outcome.config
    objectives = config.objectives
    trials = [
        trial_json(t, objectives)
        for t in outcome.study.get_trials(deepcopy=False)
        if t.state != TrialState.WAITING  # queued single-pass pipelines not run yet
    ]
    return {
        "model": config.model,
        "calibration": config.calibration,
        "eval": config.eval_data,
        "metric": config.metric or "agreement",
        "targets": list(config.targets),
        "measure": config.measure,
        "latency_measured_on": outcome.where,
        "objectives": {name: _direction(name) for name in objectives},
        "max_drop": config.max_drop,
        "sampler": config.sampler,
        "seed": config.seed,
        "study": outcome.study.study_name,
        "trials_requested": config.trials,
        "trials_run_now": outcome.ran,
        "seconds": round(outcome.seconds, 3),
        "baseline": outcome.baseline.to_json(),
        "space": outcome.space.to_json(),
        "int8_sensitivity": outcome.sensitivities,
        "calibration_statistics": {
            "reused": outcome.statistics.hits,
            "measured": outcome.statistics.misses,
        }
        if outcome.statistics is not None
        else None,
        "references": outcome.references,
        "distill": bool(outcome.finished),
        "front": [_front_point(t, outcome) for t in outcome.front],
        "trials": trials,
    }


def _front_point(trial: FrozenTrial, outcome: SearchOutcome) -> dict[str, Any]:
    """A front point; after --distill its values are the distilled model's where that one
    was kept, and ``distilled`` says what distillation did (None: not tried)."""
    finished = outcome.finished.get(trial.number)
    values = dict(zip(outcome.config.objectives, trial.values, strict=True))
    if finished is not None and finished.kept and finished.after is not None:
        values = finished.after
    return {
        "trial": trial.number,
        "values": values,
        "pipeline": trial.user_attrs.get("pipeline"),
        "model": f"{PARETO}/trial-{trial.number}.onnx",
        "recipe": f"{PARETO}/trial-{trial.number}.toml",
        "distilled": finished.to_json() if finished is not None else None,
    }


def _direction(name: str) -> str:
    return "maximize" if name == "accuracy" else "minimize"


def recipe_text(trial: FrozenTrial, outcome: SearchOutcome) -> str:
    values = ", ".join(
        f"{name} {value:.4g}"
        for name, value in zip(outcome.config.objectives, trial.values, strict=True)
    )
    targets = " ".join(f"--target {t}" for t in outcome.config.targets)
    finished = outcome.finished.get(trial.number)
    distilled = (
        "# then distilled: onnxpress distill REBUILT.onnx --teacher "
        f"{outcome.config.model} --data {outcome.config.calibration} (pareto/"
        f"trial-{trial.number}.onnx is the distilled model)\n"
        if finished is not None and finished.kept
        else ""
    )
    return (
        f"# onnxpress search, trial {trial.number}: {values}\n"
        f"# rebuild: onnxpress optimize {outcome.config.model} --recipe THIS_FILE {targets}\n"
        f"{distilled}"
        f"pipeline = {json.dumps(trial.user_attrs['pipeline'])}\n"
        f"calibration = {json.dumps(str(Path(outcome.config.calibration).resolve()))}\n\n"
        "[verify]\n"
        'metric = "rel-l2"\n'
        f"budget = {VERIFY_BUDGET}\n"
    )


def write_outputs(outcome: SearchOutcome, data: dict[str, Any], files: dict[str, bytes]) -> Path:
    """Write the front, ``search.json`` and ``files`` into the search folder, atomically."""
    out = outcome.config.out
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".search-", dir=out))
    try:
        (stage / PARETO).mkdir()
        for trial in outcome.front:
            model = outcome.models[trial.number]
            save_model(model, stage / PARETO / f"trial-{trial.number}.onnx")
            (stage / PARETO / f"trial-{trial.number}.toml").write_text(
                recipe_text(trial, outcome), encoding="utf-8"
            )
        (stage / SEARCH_JSON).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        for name, content in files.items():
            (stage / name).write_bytes(content)
        for entry in sorted(stage.iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                old = out / f".old-{entry.name}-{os.getpid()}"
                os.replace(target, old)
                os.replace(entry, target)
                shutil.rmtree(old)
            else:
                os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
