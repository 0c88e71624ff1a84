"""``--metric`` callables for the bundled models' eval sets (used by bench_search.py).

    onnxpress search models/gru_sunspots.onnx --eval models/data/gru_sunspots_eval.npz \
        --metric tools/search_metrics.py:negative_sunspots_rmse ...
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUNSPOTS = Path(__file__).resolve().parent.parent / "models" / "data" / "gru_sunspots_eval.npz"


def negative_sunspots_rmse(outputs: list[np.ndarray], labels: np.ndarray | None) -> float:
    """Minus the RMSE in sunspot numbers: the model predicts normalised values, the eval
    set's ``target`` (the labels) is in sunspots; its ``mean``/``std`` undo the scaling."""
    if labels is None:
        raise ValueError("needs the sunspots eval set's 'target'")
    with np.load(SUNSPOTS) as data:
        mean, std = float(data["mean"]), float(data["std"])
    predicted = outputs[0].reshape(-1).astype(np.float64) * std + mean
    error = predicted - labels.reshape(-1).astype(np.float64)
    return -float(np.sqrt(np.mean(error * error)))
