"""Held-out quality of a bundled model on onnxruntime, for the QDQ benchmark.

Classifiers: top-1 accuracy and top-1 agreement with the float model; the sunspots GRU:
RMSE; the digit detector: COCO-style mAP (IoU 0.50:0.95) and mAP@0.5 (``models/detection.py``);
super-resolution: PSNR in dB.
Every task also reports the relative L2 distance of the outputs from the float model's.
The eval sets are read by ``models/evaluate.py`` so that the numbers match its own.
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
    result: dict[str, float] = {}
    if task == "classification":
        result["accuracy"] = float(np.mean(out.argmax(1) == data["labels"]))
        if reference is not None:
            result["agreement"] = float(np.mean(out.argmax(1) == reference.argmax(1)))
    elif task == "super_resolution":
        result["psnr"] = _evaluate_module().psnr(out, data["target"])
    elif task == "detection":
        scores = _evaluate_module()._detection().mean_average_precision(
            out, data["boxes"], data["labels"]
        )
        result["map"], result["map50"] = scores["map"], scores["map50"]
    else:
        target = data["target"].astype(np.float64)
        predicted = out.reshape(len(target)) * float(data["std"]) + float(data["mean"])
        result["rmse"] = float(np.sqrt(np.mean((predicted - target) ** 2)))
    if reference is not None:
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
