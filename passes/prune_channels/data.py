"""Calibration measurements for channel pruning, each one streaming pass over the batches.

* ``mean_abs_scores``: mean |x| of each channel at the inputs of a group's consumers;
* ``thinet_scores``: the consumers' input moments (im2col rows for a Conv), turned into
  ThiNet's greedy removal order (``greedy_removal_scores``);
* ``sensitivity_curves``: the relative L2 error of the model's outputs with one group pruned
  at 25, 50 and 75 % (by its scores), the others intact: what ``macs=`` spreads ratios by;
* ``output_error``: that error, and for a sequence head (a [batch, time, classes] Softmax, a
  CTC recognizer's) ``sequence_error``, the change of its per-step class distributions and
  greedy decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

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
    return output_error(reference, outputs, [None] * len(reference[0]))


def output_error(
    reference: list[list[np.ndarray]],
    outputs: list[list[np.ndarray]],
    sequence_axes: Sequence[int | None],
) -> float:
    """Mean over the outputs of their error, batches concatenated: ``sequence_error`` for a
    sequence head's logits (``sequence_axes[k]``, the class axis), else ‖y − ŷ‖ / ‖y‖."""
    errors = []
    for index, axis in enumerate(sequence_axes):
        ref = [r[index].astype(np.float64) for r in reference]
        new = [o[index].astype(np.float64) for o in outputs]
        if axis is not None:
            errors.append(sequence_error(ref, new, axis))
            continue
        flat_ref = np.concatenate([r.reshape(-1) for r in ref])
        flat_new = np.concatenate([o.reshape(-1) for o in new])
        errors.append(
            float(np.linalg.norm(flat_ref - flat_new) / max(np.linalg.norm(flat_ref), 1e-12))
        )
    return float(np.mean(errors))


def sequence_error(reference: list[np.ndarray], logits: list[np.ndarray], axis: int) -> float:
    """The CTC-level change of a [batch, time, classes] head, from the logits behind its
    Softmax: per time step KL(p ‖ p̂) of the class distributions plus the fraction of steps
    whose greedy (arg-max) class changed, averaged over the steps of every batch. A shift of
    a step's logits by a constant costs nothing; a near-flip costs more than a far one."""
    kl_sum, flips, steps = 0.0, 0, 0
    for ref, new in zip(reference, logits, strict=True):
        log_p, log_q = _log_softmax(ref, axis), _log_softmax(new, axis)
        kl_sum += float(np.sum(np.exp(log_p) * (log_p - log_q)))
        flips += int(np.count_nonzero(ref.argmax(axis) != new.argmax(axis)))
        steps += ref.size // ref.shape[axis]
    return (kl_sum + flips) / max(steps, 1)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
