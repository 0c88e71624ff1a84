"""How much each ``svd`` candidate's truncation moves the model's outputs (budget rule).

The budget rule compares layers by the relative error a rank step adds to each one; a unit
of relative error in a query projection, whose output goes through a softmax, does not cost
the model what it costs in a feed-forward layer that adds straight into the residual stream.
``measure_sensitivity`` weighs them by measurement: every candidate weight W is truncated
at a probe rank to Ŵ (relative layer error e², known from its spectrum), the model is run on
one calibration batch with Ŵ in place of W, and

    sensitivity = (‖f(Ŵ) − f(W)‖² / ‖f(W)‖²) / e²

is the model's relative squared output error per unit of the layer's. The candidate weights
become graph inputs of one onnxruntime session (fed the graph's own arrays), so the probes
cost one run each and neither a new session nor a copy of the weights. Sensitivities are
divided by their mean and tempered (``SENSITIVITY_POWER``), so that the greedy allocation's
trade-offs keep their scale.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxpress.analysis.probes import relative_change, weights_as_inputs
from onnxpress.core.calibration_data import Batch
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)

# a layer whose probe moves nothing still costs this fraction of the mean sensitivity
MIN_SENSITIVITY = 1e-3
# Weights are the measured ratios to this power. One probe per layer, each alone, on one batch,
# predicts the joint error of many truncations only roughly: on transformer_mnist (refit on)
# the full ratios made the held-out logits error worse than no weighting at budget 0.5
# (0.144 vs 0.109); their square root made it better at 0.5 and 0.75 (0.106, 0.042 vs 0.048).
SENSITIVITY_POWER = 0.5


@dataclass
class Probe:
    """One candidate weight: its dense values, its truncation and that truncation's e²."""

    dense: np.ndarray
    truncated: np.ndarray
    layer_error: float  # relative squared error of the layer's output at the probe rank


def measure_sensitivity(
    model: onnx.ModelProto, probes: Mapping[str, Probe], batch: Batch
) -> dict[str, float]:
    """Initializer name -> sensitivity (mean 1) of the outputs to that weight's truncation."""
    if not probes:
        return {}
    stripped = weights_as_inputs(model, set(probes))
    runner = Runner(stripped)
    feed: dict[str, np.ndarray] = {**batch}
    feed.update({name: probe.dense for name, probe in probes.items()})
    reference = runner(feed)
    raw: dict[str, float] = {}
    for name, probe in probes.items():
        moved = runner({**feed, name: probe.truncated})
        change = relative_change(reference, moved)
        raw[name] = change / probe.layer_error if probe.layer_error > 0 else 0.0
        logger.debug(
            "svd sensitivity %s: output %.3g / layer %.3g", name, change, probe.layer_error
        )
    mean = float(np.mean(list(raw.values())))
    if not mean > 0:
        return dict.fromkeys(raw, 1.0)
    return {
        name: max(value / mean, MIN_SENSITIVITY) ** SENSITIVITY_POWER for name, value in raw.items()
    }
