"""Calibration measurements for channel pruning, each one streaming pass over the batches.

* ``mean_abs_scores``: mean |x| of each channel at the inputs of a group's consumers;
* ``thinet_scores``: the consumers' input moments (im2col rows for a Conv), turned into
  ThiNet's greedy removal order (``greedy_removal_scores``);
* ``sensitivity_curves``: the relative L2 error of the model's outputs with one group pruned
  at 25, 50 and 75 % (by its scores), the others intact: what ``macs=`` spreads ratios by.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxpress.passes.prune_channels.importance import (
    contribution_gram,
    greedy_removal_scores,
    keep_top,
    to_group,
)
from onnxpress.passes.prune_channels.refit import LinearLayer, refit_consumers
from onnxpress.passes.prune_channels.rewrite import Pruner

from onnxpress.analysis.channels.groups import ChannelGroup, ChannelGroups
from onnxpress.analysis.refit import Tap, collect_moments
from onnxpress.calibration.activations import stream_activations
from onnxpress.core.calibration_data import Batch
from onnxpress.core.ir import to_graph, to_model
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)

SENSITIVITY_RATIOS = (0.25, 0.5, 0.75)


def mean_abs_scores(
    groups: ChannelGroups,
    candidates: list[ChannelGroup],
    model: onnx.ModelProto,
    batches: Iterable[Batch],
) -> dict[int, np.ndarray]:
    """Per group: Σ over its consumers' inputs of the per-channel mean |x|."""
    tensors = sorted({groups.consumers[k] for g in candidates for k in g.consumers})
    if not tensors:
        return {}
    sums = {name: np.zeros(groups.length(groups.layouts[name])) for name in tensors}
    rows = dict.fromkeys(tensors, 0)
    for values in stream_activations(model, tensors, batches):
        for name in tensors:
            axis = groups.layouts[name].axis
            flat = np.moveaxis(np.abs(values[name].astype(np.float64)), axis, -1)
            flat = flat.reshape(-1, flat.shape[-1])
            sums[name] += flat.sum(axis=0)
            rows[name] += flat.shape[0]
    scores = {}
    for group in candidates:
        if group.consumers:
            scores[group.index] = sum(
                to_group(groups, groups.layouts[t], group.index, sums[t] / max(rows[t], 1))
                for t in (groups.consumers[k] for k in group.consumers)
            )
    return scores


def thinet_scores(
    groups: ChannelGroups,
    candidates: list[ChannelGroup],
    nodes: Mapping[str, gs.Node],
    model: onnx.ModelProto,
    batches: Iterable[Batch],
    centred: bool,
) -> dict[int, np.ndarray]:
    """Per group with a linear consumer: ThiNet's removal order from the consumers' moments."""
    layers = {
        key: layer
        for g in candidates
        for key in g.consumers
        if (layer := LinearLayer.of(nodes[key])) is not None
    }
    if not layers:
        return {}
    taps = [
        Tap(key=key, student=groups.consumers[key], rows=layer.rows, dim=layer.matrix()[0].shape[0])
        for key, layer in layers.items()
    ]
    moments = collect_moments(model, None, taps, batches)
    scores = {}
    for group in candidates:
        grams = []
        for key in group.consumers:
            if key not in layers:
                continue
            moment = moments[key].second_moment
            if centred:
                mean = moments[key].sum / max(moments[key].count, 1)
                moment = moment - np.outer(mean, mean)
            layer = layers[key]
            layout = groups.layouts[groups.consumers[key]]
            weight = layer.matrix()[0]
            grams.append(
                contribution_gram(
                    groups, group.index, layout, moment, weight, layer.features_per_channel
                )
            )
        if grams:
            scores[group.index] = greedy_removal_scores(sum(grams))
    return scores


def sensitivity_curves(
    groups: ChannelGroups,
    candidates: list[ChannelGroup],
    scores: Mapping[int, np.ndarray],
    model: onnx.ModelProto,
    batches: list[Batch],
    damping: float | None,
) -> dict[int, tuple[list[float], list[float]]]:
    """(ratios, output errors) per group, pruning that group alone (and refitting its
    consumers when ``damping`` is given, as the pass will)."""
    runner = Runner(model)
    reference = [runner(batch) for batch in batches]
    curves: dict[int, tuple[list[float], list[float]]] = {}
    for group in candidates:
        ratios, errors = [], []
        for ratio in SENSITIVITY_RATIOS:
            count = max(1, round(group.size * (1 - ratio)))
            if count >= group.size:
                continue
            trial = to_graph(model)
            pruner = Pruner(trial, groups, {group.index: keep_top(scores[group.index], count)})
            pruner.apply()
            if damping is not None:
                consumers = set(group.consumers)
                refit_consumers(trial, groups, pruner, consumers, [model], lambda: batches, damping)
            pruned = Runner(to_model(trial, model))
            outputs = [pruned(batch) for batch in batches]
            ratios.append(1 - count / group.size)
            errors.append(_relative_error(reference, outputs))
        curves[group.index] = (ratios, errors) if ratios else ([1.0], [0.0])
        logger.debug("sensitivity of %s: %s", group.name, list(zip(ratios, errors, strict=True)))
    return curves


def _relative_error(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]]) -> float:
    """‖y − ŷ‖ / ‖y‖ over every batch and output, outputs weighted alike."""
    errors = []
    for index in range(len(reference[0])):
        ref = np.concatenate([r[index].reshape(-1) for r in reference]).astype(np.float64)
        new = np.concatenate([o[index].reshape(-1) for o in outputs]).astype(np.float64)
        errors.append(float(np.linalg.norm(ref - new) / max(np.linalg.norm(ref), 1e-12)))
    return float(np.mean(errors))
