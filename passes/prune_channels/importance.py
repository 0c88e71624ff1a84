"""Channel importance for pruning, a MAC model, and how many channels each group keeps.

Criteria (a score per channel of a group; the highest are kept):

* ``l1`` / ``l2``: the norm of each channel's weights in every producer (a Conv filter, a
  Gemm / MatMul column, a GRU unit's rows of W and R), each producer divided by its mean
  norm so that layers of different scale count alike, summed over the group's producers;
* ``bn-gamma``: |gamma| of the BatchNormalization / InstanceNormalization nodes on the
  group's channels (``l1`` for a group without one);
* ``activation``: mean |x| of the channels at the inputs of the group's consumers;
* ``reconstruction``: ThiNet's greedy choice. With x_c the contribution of channel c to a
  consumer's output, removing a set T costs E‖Σ_{c∈T} x_c‖² = 1ᵀ G_TT 1, where
  G[c,c'] = Σ_{f∈c, f'∈c'} (M ⊙ W Wᵀ)[f,f'] from the consumer's input moments M (centred
  when a refit follows: its bias absorbs the means) and weight W. Channels join T one at a
  time, cheapest first; the order is the score. Summed over consumers, each normalised.

``MacModel`` writes the model's MACs as Σ base · Π kept fractions (a Conv scales with its
kept inputs and outputs, a depthwise Conv with its channels, a GRU as H'(I' + H')).
``uniform_counts`` finds one ratio for a MAC target by bisection; ``sensitivity_counts``
lowers, one step at a time, the group whose measured output error grows least per MAC saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.analysis.channels.groups import ChannelGroup, ChannelGroups
from onnxpress.analysis.channels.layout import Layout
from onnxpress.analysis.channels.trace import constant_array
from onnxpress.core.stats import infer_shapes, node_macs


def to_group(groups: ChannelGroups, layout: Layout, group: int, values: np.ndarray) -> np.ndarray:
    """Per-index values along a channel axis -> per channel of ``group`` (block mean, summed)."""
    out = np.zeros(groups.groups[group].size)
    for (offset, index, block), seg in zip(groups.spans(layout), layout.segments, strict=True):
        if index == group:
            size = groups.space_sizes[seg.space]
            out += values[offset : offset + size * block].reshape(size, block).mean(axis=1)
    return out


def owners(groups: ChannelGroups, layout: Layout, group: int) -> np.ndarray:
    """For each index along a channel axis, its channel in ``group``, or -1."""
    out = np.full(groups.length(layout), -1, dtype=np.int64)
    for (offset, index, block), seg in zip(groups.spans(layout), layout.segments, strict=True):
        if index == group:
            size = groups.space_sizes[seg.space]
            out[offset : offset + size * block] = np.repeat(np.arange(size), block)
    return out


def _own_norms(node: gs.Node, order: int) -> np.ndarray | None:
    """Per output channel (hidden unit) norm of a producer's weights."""
    weight = constant_array(node.inputs[1])
    if weight is None:
        return None
    w = np.abs(weight.astype(np.float64)) ** order
    if node.op == "Conv":
        sums = w.reshape(w.shape[0], -1).sum(axis=1)
    elif node.op == "ConvTranspose":  # [C_in, C_out, k...]
        sums = np.swapaxes(w, 0, 1).reshape(w.shape[1], -1).sum(axis=1)
    elif node.op == "Gemm":
        sums = w.sum(axis=1) if node.attrs.get("transB", 0) else w.sum(axis=0)
    elif node.op in ("MatMul", "Attention"):  # com.microsoft Attention: [D, q|k|v]
        sums = w.sum(axis=0)
    else:  # GRU: W [D, 3H, I], R [D, 3H, H]; LSTM: 4H
        recurrence = np.abs(np.asarray(constant_array(node.inputs[2]), np.float64)) ** order
        hidden = recurrence.shape[-1]
        rows = w.sum(axis=2) + recurrence.sum(axis=2)  # [D, gates * H]
        sums = rows.reshape(rows.shape[0], -1, hidden).sum(axis=(0, 1))
    return np.asarray(sums ** (1.0 / order))


def weight_norms(
    groups: ChannelGroups, group: ChannelGroup, nodes: Mapping[str, gs.Node], order: int
) -> np.ndarray:
    score = np.zeros(group.size)
    for key in group.producers:
        norms = _own_norms(nodes[key], order)
        if norms is not None:
            layout = groups.producers[key]
            score += to_group(groups, layout, group.index, norms / max(norms.mean(), 1e-12))
    return score


def gamma_scores(
    groups: ChannelGroups, group: ChannelGroup, nodes: Mapping[str, gs.Node]
) -> np.ndarray | None:
    if not group.norms:
        return None
    score = np.zeros(group.size)
    for key in group.norms:
        gamma = np.abs(np.asarray(constant_array(nodes[key].inputs[1]), np.float64))
        score += to_group(groups, groups.layouts[groups.norms[key]], group.index, gamma)
    return score


def contribution_gram(
    groups: ChannelGroups,
    group: int,
    layout: Layout,
    moment: np.ndarray,
    weight: np.ndarray,
    features_per_index: int,
) -> np.ndarray:
    """G[c, c'] for one consumer with input moments M [F, F] and weight W [F, outputs]."""
    feature_owner = np.repeat(owners(groups, layout, group), features_per_index)
    energy = moment * (weight @ weight.T)
    one_hot = np.zeros((len(feature_owner), groups.groups[group].size))
    mine = feature_owner >= 0
    one_hot[np.nonzero(mine)[0], feature_owner[mine]] = 1.0
    gram = one_hot.T @ energy @ one_hot
    return np.asarray(gram / max(float(np.sum(energy)), 1e-30))


def greedy_removal_scores(gram: np.ndarray) -> np.ndarray:
    """ThiNet: add to the removed set the channel that raises 1ᵀG_TT1 least; score = order."""
    size = gram.shape[0]
    removed = np.zeros(size, dtype=bool)
    cross = np.zeros(size)  # Σ_{t∈T} G[c, t]
    score = np.zeros(size)
    for step in range(size):
        cost = np.where(removed, np.inf, 2.0 * cross + np.diag(gram))
        channel = int(np.argmin(cost))
        removed[channel] = True
        score[channel] = step
        cross += gram[:, channel]
    return score


def keep_top(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` highest scores, ascending (ties: the lower index wins)."""
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:count]).astype(np.int64)


class MacModel:
    """The model's MACs as Σ base · Π kept fraction of the layouts each term depends on."""

    def __init__(self, model: onnx.ModelProto, groups: ChannelGroups) -> None:
        self.groups = groups
        shapes = infer_shapes(model)
        initializers = {t.name: list(t.dims) for t in model.graph.initializer}
        self.terms: list[tuple[float, list[Layout]]] = []
        for node in model.graph.node:
            base = float(node_macs(node, shapes))
            if not base:
                continue
            key = node.output[0]
            own = groups.producers.get(key)
            feeds = groups.consumers.get(key)
            source = [groups.layouts[feeds]] if feeds is not None else []
            if key in groups.scaled:  # attention products: scale with the heads' channels
                self.terms.extend((base * share, lays) for share, lays in groups.scaled[key])
            elif key in groups.depthwise and key in groups.layouts:
                self.terms.append((base, [groups.layouts[key]]))
            elif node.op_type in ("GRU", "LSTM") and own is not None:
                _, gates, inputs = initializers.get(
                    node.input[1], shapes.get(node.input[1], [1, 3, 0])
                )
                hidden = gates // (4 if node.op_type == "LSTM" else 3)
                share = inputs / max(inputs + hidden, 1)
                self.terms.append((base * share, [*source, own]))
                self.terms.append((base * (1 - share), [own, own]))
            else:
                self.terms.append((base, [*source, *([own] if own is not None else [])]))
        self.total = self.macs({})

    def macs(self, kept_counts: Mapping[int, int]) -> float:
        return sum(
            base * math.prod(self.groups.fractions(layout, kept_counts) for layout in layouts)
            for base, layouts in self.terms
        )


def allowed_counts(size: int, multiple: int, min_channels: int) -> list[int]:
    """Channel counts a group may keep, ascending: multiples of ``multiple``, and all."""
    low = max(min_channels, 1)
    counts = [c for c in range(multiple, size, multiple) if c >= low]
    return [*counts, size]


def count_for_ratio(size: int, ratio: float, multiple: int, min_channels: int) -> int:
    """The allowed count nearest to size·(1 − ratio); ties keep more."""
    target = size * (1.0 - ratio)
    return min(allowed_counts(size, multiple, min_channels), key=lambda c: (abs(c - target), -c))


def uniform_counts(
    candidates: list[ChannelGroup], model: MacCounter, target: float, multiple: int, low: int
) -> tuple[dict[int, int], float]:
    """The smallest uniform ratio whose MACs are within ``target`` (or the largest ratio)."""

    def counts(ratio: float) -> dict[int, int]:
        return {g.index: count_for_ratio(g.size, ratio, multiple, low) for g in candidates}

    lo, hi = 0.0, 1.0
    if model.macs(counts(hi)) > target:
        return counts(hi), hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if model.macs(counts(mid)) <= target else (mid, hi)
    return counts(hi), hi


class MacCounter(Protocol):
    """What the allocations read of a MAC model: the total and MACs at given kept counts."""

    total: float

    def macs(self, kept_counts: Mapping[int, int]) -> float: ...


def sensitivity_counts(
    candidates: list[ChannelGroup],
    model: MacCounter,
    target: float,
    curves: Mapping[int, tuple[list[float], list[float]]],
    multiple: int,
    low: int,
    *,
    levels: Mapping[int, list[int]] | None = None,
    order: list[tuple[int, float]] | None = None,
) -> dict[int, int]:
    """Greedy: step down the group whose error rises least per MAC saved, until on target.

    ``curves[g]`` is (ratios, output errors) measured with only group g pruned; the error
    at other ratios is interpolated linearly. Steps first stay within the measured ratios;
    only where that cannot reach the target does a second round go past them, on the error
    extrapolated from the last measured slope. ``order`` receives each step as (group
    index, MACs after it).
    """

    def error(group: ChannelGroup, count: int) -> float:
        ratios, errors = curves[group.index]
        ratio = 1.0 - count / group.size
        xs, ys = [0.0, *ratios], [0.0, *errors]
        if ratio <= xs[-1]:
            return float(np.interp(ratio, xs, ys))
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-9)
        return ys[-1] + max(slope, 0.0) * (ratio - xs[-1])

    levels = {
        g.index: list((levels or {}).get(g.index, allowed_counts(g.size, multiple, low)))
        for g in candidates
    }

    def measured(group: ChannelGroup, count: int) -> bool:
        return 1.0 - count / group.size <= max(curves[group.index][0]) + 1e-9

    counts = {g.index: g.size for g in candidates}
    current = model.macs(counts)
    for extrapolate in (False, True):
        while current > target:
            best: tuple[float, int, float] | None = None
            for group in candidates:
                options = [c for c in levels[group.index] if c < counts[group.index]]
                if not options or not (extrapolate or measured(group, options[-1])):
                    continue
                trial = {**counts, group.index: options[-1]}
                saved = current - model.macs(trial)
                if saved <= 0:
                    continue
                cost = error(group, options[-1]) - error(group, counts[group.index])
                rate = max(cost, 0.0) / saved
                if best is None or rate < best[0]:
                    best = (rate, group.index, current - saved)
            if best is None:
                break
            _, index, current = best
            counts[index] = max(c for c in levels[index] if c < counts[index])
            if order is not None:
                order.append((index, current))
    return counts
