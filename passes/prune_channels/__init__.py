"""Channel pruning: remove whole channels and every weight that reads them.

Conv(x, W[M,C,k,k]) -> Conv(x, W[M',C',k,k]) with M' of M output channels kept (and C' of C
input channels, where the input's channels were pruned upstream); Gemm / MatMul hidden
units (a transformer FFN's neurons), ConvTranspose channels and GRU/LSTM hidden units likewise. The model gets smaller
in MACs and bytes; nothing is masked with zeros.

Multi-head attention is pruned by whole heads (the same heads in q, k, v and the output
projection's rows) and by head dimensions (the same count per head; q with k, v with the
output rows): ``heads.py`` makes them allocation units beside the groups, with head
importance measured by masking each head on calibration data; ``attention.py`` rewrites the
head Reshapes and the fused attention ops.

Channels coupled through the graph form one group (``onnxpress.analysis.channels.groups``: residual
Adds, Concat, depthwise and grouped Convs, Flatten into a Gemm, Split, GRU, ...) and are
pruned together; a group the analysis cannot prove safe is refused with its reasons. A
transformer's residual width is one such group: the embedding, every residual Add, the
LayerNorms over the channels and the projections reading and writing the stream
(``onnxpress.analysis.channels.residual``). Its LayerNorms then normalize over the kept
channels (``norm-stats=kept``) or, with ``norm-stats=full``, over the original width with
the removed channels as zeros (``passes/prune_channels/width.py``); either way the
consumers are refit, on the pruned model, by least squares. Per
group a criterion scores the channels (l1, l2, bn-gamma, activation, reconstruction;
``passes/prune_channels/importance.py``) and the best ``count`` are kept, where ``count`` comes from
``ratio`` (uniform) or from ``macs``, the fraction of the model's MACs to keep, spread by
measured sensitivity on calibration data (or one uniform ratio): per group the model's
output error with that group alone pruned at 25/50/75 %, at the CTC level for a sequence
head (``data.sequence_error``), cut first within the measured ratios; the report names the
groups cut while the first 20 % of the MACs went (``first-fifth``). With calibration data each
layer that lost input channels is then refit by least squares to the teacher's output of
that layer (``passes/prune_channels/refit.py``).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxpress.passes.prune_channels.data import mean_abs_scores, thinet_scores
from onnxpress.passes.prune_channels.heads import (
    HeadUnit,
    UnitMacs,
    attention_units,
    cut_split,
    heads_kept,
    masked_head_scores,
    ratio_counts,
    unit_probes,
    weight_head_scores,
)
from onnxpress.passes.prune_channels.importance import (
    MacModel,
    count_for_ratio,
    gamma_scores,
    keep_top,
    sensitivity_counts,
    uniform_counts,
    weight_norms,
)
from onnxpress.passes.prune_channels.refit import refit_consumers
from onnxpress.passes.prune_channels.rewrite import Pruner
from onnxpress.passes.prune_channels.sensitivity import (
    cache_key,
    fast_sensitivity_curves,
    load_curves,
    probe_curves,
    save_curves,
)

from onnxpress.analysis.channels.groups import ChannelGroup, ChannelGroups
from onnxpress.analysis.channels.layout import node_key
from onnxpress.analysis.channels.residual import renormalized
from onnxpress.core.context import PassContext
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

logger = logging.getLogger(__name__)

Criterion = Literal["l1", "l2", "bn-gamma", "activation", "reconstruction"]
DEFAULT_RATIO = 0.3


@dataclass(frozen=True)
class PruneChannelsOptions:
    ratio: float | None = None  # fraction of each group's channels removed (0.3 without macs)
    macs: float | None = None  # or: the fraction of the model's MACs to keep
    criterion: Criterion = "l1"
    allocation: Literal["sensitivity", "uniform"] = "sensitivity"  # how macs= spreads ratios
    multiple: int = 1  # kept counts are multiples of this (or the whole group)
    min_channels: int = 1
    include: tuple[str, ...] = ()  # fnmatch patterns on producer node names
    exclude: tuple[str, ...] = ()
    reconstruct: bool | None = None  # least-squares refit; default: when calibrated
    batches: int = 8  # calibration batches the data-aware steps read
    damping: float = 1e-3  # refit ridge, relative to the mean eigenvalue of XᵀX
    heads: bool = True  # prune whole attention heads
    head_dims: bool = True  # prune query/key and value dimensions, the same count per head
    # a LayerNorm over a pruned residual width: statistics over the kept channels, or over
    # the original width with the removed channels as zeros (Pad/Slice; width.py)
    norm_stats: Literal["kept", "full"] = "kept"

    def __post_init__(self) -> None:
        if self.ratio is not None and self.macs is not None:
            raise ValueError("give ratio or macs, not both")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), not {self.ratio}")
        if self.macs is not None and not 0.0 < self.macs <= 1.0:
            raise ValueError(f"macs must be in (0, 1], not {self.macs}")
        for name in ("multiple", "min_channels", "batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1")
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, not {self.damping}")


@register_pass("prune-channels")
class PruneChannels(Pass[PruneChannelsOptions]):
    """Remove whole Conv channels and Gemm/MatMul/GRU/LSTM hidden units; refit the consumers."""

    options_type = PruneChannelsOptions
    lossless = False
    # With calibration and refit the bundled models land at rel-l2 0.08-0.17; data-free
    # pruning of a trained model often exceeds 0.5 and then needs an explicit budget.
    metric = "rel-l2"
    default_budget = 0.5

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        result = PassResult()
        reconstruct = self._reconstruct(ctx)
        data_aware = reconstruct or opts.criterion in ("activation", "reconstruction")
        if data_aware and ctx.calibration is None:
            what = "reconstruct=true" if reconstruct else f"criterion={opts.criterion}"
            raise ValueError(f"{what} needs calibration data")
        groups = ctx.analysis(ChannelGroups, graph)
        nodes = {node_key(n): n for n in graph.nodes}
        chosen = self._candidates(groups, nodes, result)
        in_sites = {g for s in groups.sites for g in (s.query, s.value)}
        candidates = [g for g in chosen if g.index not in in_sites]
        units, unit_refusals = attention_units(
            groups, {g.index for g in chosen}, opts.heads, opts.head_dims
        )
        for name, reason in unit_refusals:
            result.refuse(name, reason)
        if not candidates and not units:
            if not result.refusals:
                result.refuse(
                    "prune-channels",
                    "no Conv, ConvTranspose, Gemm, MatMul, GRU or LSTM channels to prune",
                )
            return result
        before = ctx.export(graph)
        in_units = {g for u in units for g in (u.site.query, u.site.value)}
        scored = candidates + [groups.groups[g] for g in sorted(in_units)]
        scores = self._scores(groups, scored, nodes, before, ctx, reconstruct)
        head_scores = self._head_scores(groups, units, scores, before, ctx)
        counts = self._counts(groups, candidates, scores, before, ctx, result, units, head_scores)
        kept = {
            g.index: keep_top(scores[g.index], counts[g.index])
            for g in candidates
            if counts[g.index] < g.size
        }
        kept.update(heads_kept(units, counts, head_scores, scores, result))
        if not kept:
            result.refuse("prune-channels", "every group keeps all channels at this ratio")
            return result
        pruner = Pruner(graph, groups, kept, opts.norm_stats)
        result.count("nodes_rewritten", pruner.apply())
        for group in candidates:
            if group.index in kept:
                result.count("groups_pruned")
                result.count("channels_removed", group.size - len(kept[group.index]))
                result.details.append(_group_record(group, nodes, kept[group.index]))
        if reconstruct and ctx.calibration is not None:
            calibration = ctx.calibration
            records = refit_consumers(
                graph,
                groups,
                pruner,
                {key for g in scored if g.index in kept for key in g.consumers},
                [ctx.original, before],
                lambda: calibration.batches(limit=opts.batches),
                opts.damping,
            )
            result.count("layers_refit", sum(bool(r["refit"]) for r in records))
            result.details.extend({"kind": "refit", **r} for r in records)
        return result

    def _reconstruct(self, ctx: PassContext) -> bool:
        if self.options.reconstruct is not None:
            return self.options.reconstruct
        return ctx.calibration is not None

    def _candidates(
        self, groups: ChannelGroups, nodes: dict[str, gs.Node], result: PassResult
    ) -> list[ChannelGroup]:
        opts = self.options
        chosen = []
        for group in groups.groups:
            if not group.producers:
                continue
            names = [nodes[key].name or key for key in group.producers]
            if opts.include and not any(fnmatch.fnmatch(n, p) for n in names for p in opts.include):
                continue
            if any(fnmatch.fnmatch(n, p) for n in names for p in opts.exclude):
                result.count("groups_excluded")
                continue
            if group.refusals:
                result.refuse(group.name, "; ".join(group.refusals[:3]))
            elif group.size <= max(opts.min_channels, 1):
                result.refuse(group.name, f"only {group.size} channel(s)")
            else:
                chosen.append(group)
        return chosen

    def _scores(
        self,
        groups: ChannelGroups,
        candidates: list[ChannelGroup],
        nodes: dict[str, gs.Node],
        before: onnx.ModelProto,
        ctx: PassContext,
        centred: bool,
    ) -> dict[int, np.ndarray]:
        criterion = self.options.criterion
        scores = {
            g.index: weight_norms(groups, g, nodes, 2 if criterion == "l2" else 1)
            for g in candidates
        }
        if criterion == "bn-gamma":
            for g in candidates:
                gamma = gamma_scores(groups, g, nodes)
                scores[g.index] = gamma if gamma is not None else scores[g.index]
        elif criterion in ("activation", "reconstruction") and ctx.calibration is not None:
            batches = ctx.calibration.batches(limit=self.options.batches)
            if criterion == "activation":
                measured = mean_abs_scores(groups, candidates, before, batches)
            else:
                measured = thinet_scores(groups, candidates, nodes, before, batches, centred)
            scores.update(measured)
        return scores

    def _head_scores(
        self,
        groups: ChannelGroups,
        units: list[HeadUnit],
        scores: dict[int, np.ndarray],
        before: onnx.ModelProto,
        ctx: PassContext,
    ) -> dict[str, np.ndarray]:
        """Per site: masked-head output error with calibration data, else weight scores."""
        sites = list({id(u.site): u.site for u in units}.values())
        found = {s.name: weight_head_scores(s, scores) for s in sites}
        if ctx.calibration is not None and any(u.kind == "heads" for u in units):
            batches = list(ctx.calibration.batches(limit=self.options.batches))
            found.update(masked_head_scores(groups, sites, before, batches))
        return found

    def _counts(
        self,
        groups: ChannelGroups,
        candidates: list[ChannelGroup],
        scores: dict[int, np.ndarray],
        before: onnx.ModelProto,
        ctx: PassContext,
        result: PassResult,
        units: list[HeadUnit],
        head_scores: dict[str, np.ndarray],
    ) -> dict[int, int]:
        """Kept count per group, and per head unit (negative indices)."""
        opts = self.options
        if opts.macs is None:
            ratio = opts.ratio if opts.ratio is not None else DEFAULT_RATIO
            counts = {
                g.index: count_for_ratio(g.size, ratio, opts.multiple, opts.min_channels)
                for g in candidates
            }
            return {**counts, **ratio_counts(units, ratio, opts.heads)}
        model = UnitMacs(MacModel(before, groups), units)
        target = opts.macs * model.total
        stand_ins = [u.as_group(groups) for u in units]
        levels = {u.index: list(range(1, u.size + 1)) for u in units}
        if opts.allocation == "sensitivity" and ctx.calibration is not None:
            batches = list(ctx.calibration.batches(limit=opts.batches))
            damping = opts.damping if self._reconstruct(ctx) else None
            settings = {
                "criterion": opts.criterion,
                "damping": damping,
                "groups": sorted(g.index for g in candidates),
                "scores": [scores[g.index].round(12).tolist() for g in candidates],
                "units": [u.name for u in units],
                "heads": {k: v.round(12).tolist() for k, v in sorted(head_scores.items())},
                "site_scores": [
                    scores[g].round(12).tolist()
                    for u in units
                    for g in (u.site.query, u.site.value)
                ],
                **({"norm_stats": opts.norm_stats} if opts.norm_stats != "kept" else {}),
            }
            key = cache_key(before, batches, settings)
            cached = load_curves(key)
            wanted = [g.index for g in candidates] + [u.index for u in units]
            if cached is not None and all(i in cached for i in wanted):
                curves = cached
            else:
                curves = fast_sensitivity_curves(
                    groups, candidates, scores, before, batches, damping, opts.norm_stats
                )
                probes = unit_probes(groups, units, head_scores, scores)
                curves.update(
                    probe_curves(groups, probes, before, batches, damping, opts.norm_stats)
                )
                save_curves(key, curves)
            result.details.append({"kind": "sensitivity", "cached": cached is not None})
            order: list[tuple[int, float]] = []
            counts = sensitivity_counts(
                candidates + stand_ins,
                model,
                target,
                curves,
                opts.multiple,
                opts.min_channels,
                levels=levels,
                order=order,
            )
            allocation = "sensitivity"
            names = {g.index: g.name for g in candidates + stand_ins}
            first = [names[i] for i, after in order if after >= 0.8 * model.total - 1e-9]
            result.details.append({"kind": "first-fifth", "groups": sorted(set(first))})
        else:
            cut = ratio_counts(units, 0.0, opts.heads)  # the units a ratio steps down
            uniform = candidates + [g for g in stand_ins if g.index in cut]
            counts, _ = uniform_counts(uniform, model, target, opts.multiple, opts.min_channels)
            allocation = "uniform"
        estimate = model.macs(counts) / max(model.total, 1.0)
        result.details.append(
            {
                "kind": "allocation",
                "allocation": allocation,
                "macs_target": opts.macs,
                "macs_estimate": round(estimate, 4),
                "cut": cut_split(model, counts, units),
            }
        )
        if estimate > opts.macs + 1e-9:
            result.refuse("prune-channels", f"MAC target {opts.macs} not reached: {estimate:.3f}")
        return counts


def _group_record(
    group: ChannelGroup, nodes: dict[str, gs.Node], kept: np.ndarray
) -> dict[str, Any]:
    removed = np.setdiff1d(np.arange(group.size), kept)
    return {
        "kind": "group",
        "group": group.name,
        "channels": group.size,
        "kept": len(kept),
        "removed": removed.tolist(),
        "producers": [nodes[k].name or k for k in group.producers],
        "consumers": [nodes[k].name or k for k in group.consumers],
        "width": renormalized(group.norms, nodes),
    }
