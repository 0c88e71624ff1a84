"""Held-out quality of a bundled model on onnxruntime, for the QDQ benchmark.

The metrics are ``models/evaluate.py``'s (``scores``: accuracy, RMSE, mAP, PSNR), so the
numbers match its own; against the float model's outputs this adds top-1 agreement
(classifiers) and the relative L2 distance of the outputs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from _timing import session

MODELS = Path(__file__).resolve().parents[1] / "models"


def _evaluate_module() -> Any:
    name = "models_evaluate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MODELS / "evaluate.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def eval_set(name: str) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """(model inputs, the whole eval archive, task) of a bundled model's held-out set."""
    module = _evaluate_module()
    data = module.load_eval_set(module.default_data(name))
    return module.model_inputs(data), data, str(data["task"])


def evaluate(model: onnx.ModelProto, name: str, reference: np.ndarray | None) -> dict[str, float]:
    """Quality of ``model`` on ``name``'s held-out set; with the float model's outputs as
    ``reference``, also agreement (classifiers) and relative L2 distance."""
    inputs, data, task = eval_set(name)
    out = session(model, threads=2).run(None, {"input": inputs})[0]
    result: dict[str, float] = _evaluate_module().scores(data, out)
    if reference is not None:
        if task == "classification":
            result["agreement"] = float(np.mean(out.argmax(1) == reference.argmax(1)))
        result["rel_l2"] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
    return result


def quality_text(row: dict[str, Any]) -> str:
    """The quality column of a benchmark table row."""
    if "accuracy" in row:
        return f"{row['accuracy']:.4f}"
    if "psnr" in row:
        return f"PSNR {row['psnr']:.3f} dB"
    if "map" in row:
        return f"mAP {row['map']:.4f} (@0.5 {row['map50']:.4f})"
    return f"{row['rmse']:.3f}"
