"""How much each ``svd`` candidate's truncation moves the model's outputs (budget rule).

The budget rule compares layers by the relative error a rank step adds to each one; a unit
of relative error in a query projection, whose output goes through a softmax, does not cost
the model what it costs in a feed-forward layer that adds straight into the residual stream.
``measure_sensitivity`` weighs them by measurement: every candidate weight W is truncated
at a probe rank to Ŵ (relative layer error e², known from its spectrum), the model is run on
one calibration batch with Ŵ in place of W, and

    sensitivity = (‖f(Ŵ) − f(W)‖² / ‖f(W)‖²) / e²

is the model's relative squared output error per unit of the layer's. The probes go wave by
wave in topological order (``stages``): a one-batch ``SegmentCapture`` runs the model up to
the inputs of the wave's layers, and one session from there to the outputs takes the
weights as inputs, so each probe runs only the part of the model after its layer, with
neither a new session nor a copy of the weights per probe. Sensitivities are divided by
their mean and tempered (``SENSITIVITY_POWER``), so that the greedy allocation's
trade-offs keep their scale.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxpress.passes.svd.factor import WeightGroup
from onnxpress.passes.svd.rank import floor_rank, max_useful_rank, relative_tail

from onnxpress.analysis.probes import relative_change
from onnxpress.analysis.refit import Spectrum, layer_waves
from onnxpress.analysis.segments import SegmentCapture
from onnxpress.core.calibration_data import Batch

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
    """One candidate weight: its truncation and that truncation's e²."""

    truncated: np.ndarray
    layer_error: float  # relative squared error of the layer's output at the probe rank


@dataclass
class Stage:
    """The probes of one wave: weight names and the tensors their layers read."""

    weights: list[str]
    sources: list[str]


def probe(group: WeightGroup, found: list[Spectrum], rank_floor: float, min_gain: float) -> Probe:
    """The weight truncated halfway down its useful ranks (not below the floor)."""
    form = group.form
    rank = max(
        floor_rank(form.k, form.n, rank_floor), max_useful_rank(form.k, form.n, min_gain) // 2, 1
    )
    approx = np.stack([np.matmul(*s.factors(rank)) for s in found])
    truncated = form.dense_values(approx).astype(form.values.dtype)
    return Probe(truncated, relative_tail([s.singular for s in found], rank))


def wave_stages(graph: gs.Graph, groups: Sequence[WeightGroup]) -> list[Stage]:
    """The candidates in topological waves, each with the tensors its layers read."""
    waves = layer_waves(graph, [[f.node for f in g.forms] for g in groups])
    return [
        Stage(
            [str(groups[i].weight.name) for i in wave],
            [str(f.source.name) for i in wave for f in groups[i].forms],
        )
        for wave in waves
    ]


def measure_sensitivity(
    model: onnx.ModelProto, probes: Mapping[str, Probe], batch: Batch, stages: Sequence[Stage]
) -> dict[str, float]:
    """Initializer name -> sensitivity (mean 1) of the outputs to that weight's truncation."""
    if not probes:
        return {}
    capture = SegmentCapture(lambda: [batch])
    reference: list[np.ndarray] | None = None
    raw: dict[str, float] = {}
    for stage in stages:
        names = [name for name in stage.weights if name in probes]
        if not names:
            continue
        for _ in capture.run(model, stage.sources):
            pass  # moves the border to this wave's layer inputs
        run, fed = capture.rest(model, names)
        if reference is None:
            reference = run({})
        for name in names:
            probe = probes[name]
            moved = run({name: probe.truncated}) if name in fed else reference
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
