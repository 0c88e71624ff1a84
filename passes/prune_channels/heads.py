"""Attention heads in ``prune-channels``: allocation units, head importance, kept channels.

Each attention site of the channel analysis (``analysis.channels.attention``) ties a
query/key group (H·Dqk channels, head h owning h·Dqk ..) to a value group (H·Dv). What may
be kept is K heads, the same K in both, with the same count of query/key dimensions in every
kept head, and of value dimensions. So a site gives up to three allocation units, each
stepped down on its own by the sensitivity allocation (``importance.sensitivity_counts``):

* ``heads``: K of H, the least important removed first. Importance is gradient-free: the
  relative change of the compared outputs when the head alone is masked (its slice of the
  context the output projection reads set to zero, which is what removing it does before the
  refit), on the calibration batches, in one onnxruntime session whose masks are inputs.
  Without data: the summed channel scores of the head in both groups;
* ``qk`` / ``vo``: dimensions per head, chosen in each kept head by the groups' channel
  scores (the criterion's, e.g. l1 of the q and k columns together).

``UnitMacs`` turns unit counts into group counts (K·dqk, K·dv) for the MAC model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper
from onnxpress.passes.prune_channels.importance import MacModel, count_for_ratio
from onnxpress.passes.prune_channels.sensitivity import Probe, compared_outputs

from onnxpress.analysis.channels.attention import AttentionSite
from onnxpress.analysis.channels.groups import ChannelGroup, ChannelGroups
from onnxpress.analysis.probes import relative_change
from onnxpress.core.calibration_data import Batch
from onnxpress.core.pass_base import PassResult
from onnxpress.core.verify import Runner

logger = logging.getLogger(__name__)

Kind = Literal["heads", "qk", "vo"]
SENSITIVITY_RATIOS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class HeadUnit:
    """One allocation unit: a site's heads, or its query/key or value dimensions per head."""

    index: int  # negative, apart from the group indices
    kind: Kind
    site: AttentionSite
    size: int

    @property
    def name(self) -> str:
        return f"{self.site.name}:{self.kind}"

    def as_group(self, groups: ChannelGroups) -> ChannelGroup:
        """A stand-in group for the allocation (index and size are what it reads)."""
        members = [groups.groups[self.site.query], groups.groups[self.site.value]]
        return ChannelGroup(
            index=self.index,
            name=self.name,
            size=self.size,
            members=(),
            producers=tuple(k for g in members for k in g.producers),
            consumers=tuple(k for g in members for k in g.consumers),
            norms=(),
            refusals=(),
        )


def attention_units(
    groups: ChannelGroups, allowed: set[int], heads: bool, dims: bool
) -> tuple[list[HeadUnit], list[tuple[str, str]]]:
    """The units of every site whose groups are ``allowed``, and (name, reason) refusals."""
    units: list[HeadUnit] = []
    refusals: list[tuple[str, str]] = []
    for site in groups.sites:
        ok = {role: group in allowed for role, group in (("qk", site.query), ("vo", site.value))}
        wanted: list[tuple[Kind, int, bool]] = [
            ("heads", site.heads, heads and ok["qk"] and ok["vo"]),
            ("qk", site.qk_dim, dims and ok["qk"]),
            ("vo", site.vo_dim, dims and ok["vo"]),
        ]
        for kind, size, usable in wanted:
            if usable and size > 1:
                units.append(HeadUnit(-1 - len(units), kind, site, size))
        for role, group in (("qk", site.query), ("vo", site.value)):
            reasons = groups.groups[group].refusals
            if reasons:
                what = "query/key" if role == "qk" else "value"
                refusals.append(
                    (f"{site.name}:{role}", f"{what} channels: {'; '.join(reasons[:3])}")
                )
    return units, refusals


def site_kept(
    site: AttentionSite,
    counts: tuple[int, int, int],
    head_scores: np.ndarray,
    qk_scores: np.ndarray,
    vo_scores: np.ndarray,
) -> dict[int, np.ndarray]:
    """Kept channels of the query/key and value groups for (heads, qk dims, vo dims)."""
    heads = np.sort(np.argsort(-head_scores, kind="stable")[: counts[0]])

    def pick(scores: np.ndarray, dim: int, count: int) -> np.ndarray:
        return np.concatenate(
            [
                h * dim
                + np.sort(np.argsort(-scores[h * dim : (h + 1) * dim], kind="stable")[:count])
                for h in heads
            ]
        ).astype(np.int64)

    kept = {
        site.query: pick(qk_scores, site.qk_dim, counts[1]),
        site.value: pick(vo_scores, site.vo_dim, counts[2]),
    }
    full = {site.query: site.heads * site.qk_dim, site.value: site.heads * site.vo_dim}
    return {group: idx for group, idx in kept.items() if len(idx) < full[group]}


def site_counts(
    site: AttentionSite, units: list[HeadUnit], counts: Mapping[int, int]
) -> tuple[int, int, int]:
    found = {u.kind: counts.get(u.index, u.size) for u in units if u.site is site}
    return (
        found.get("heads", site.heads),
        found.get("qk", site.qk_dim),
        found.get("vo", site.vo_dim),
    )


class UnitMacs:
    """``MacModel`` over group counts and head-unit counts together."""

    def __init__(self, model: MacModel, units: list[HeadUnit]) -> None:
        self.model = model
        self.units = units
        self.total = model.total

    def group_counts(self, counts: Mapping[int, int]) -> dict[int, int]:
        out = {index: count for index, count in counts.items() if index >= 0}
        for site in {id(u.site): u.site for u in self.units}.values():
            heads, qk, vo = site_counts(site, self.units, counts)
            out[site.query], out[site.value] = heads * qk, heads * vo
        return out

    def macs(self, kept_counts: Mapping[int, int]) -> float:
        return self.model.macs(self.group_counts(kept_counts))


def ratio_counts(units: list[HeadUnit], ratio: float, heads: bool) -> dict[int, int]:
    """``ratio=`` removes that fraction of a site's heads, or of its dimensions per head
    where heads are off or cannot be removed."""
    out = {}
    with_heads = {id(u.site) for u in units if u.kind == "heads"} if heads else set()
    for unit in units:
        if (unit.kind == "heads") == (id(unit.site) in with_heads):
            out[unit.index] = count_for_ratio(unit.size, ratio, 1, 1)
    return out


def unit_probes(
    groups: ChannelGroups,
    units: list[HeadUnit],
    head_scores: Mapping[str, np.ndarray],
    scores: Mapping[int, np.ndarray],
) -> list[Probe]:
    """Trials at 25, 50, 75 % of each unit alone, for ``sensitivity.probe_curves``."""
    probes = []
    for unit in units:
        site = unit.site
        trials = []
        for count in sorted(
            {max(1, round(unit.size * (1 - r))) for r in SENSITIVITY_RATIOS} - {unit.size},
            reverse=True,
        ):
            full = [site.heads, site.qk_dim, site.vo_dim]
            full[("heads", "qk", "vo").index(unit.kind)] = count
            kept = site_kept(
                site,
                (full[0], full[1], full[2]),
                head_scores[site.name],
                scores[site.query],
                scores[site.value],
            )
            trials.append((1 - count / unit.size, kept))
        group = unit.as_group(groups)
        probes.append(
            Probe(
                unit.index,
                unit.name,
                frozenset(group.producers),
                frozenset(group.consumers),
                tuple(trials),
            )
        )
    return probes


def weight_head_scores(site: AttentionSite, scores: Mapping[int, np.ndarray]) -> np.ndarray:
    """Data-free head importance: the head's channel scores in both groups, summed."""
    qk = scores[site.query].reshape(site.heads, site.qk_dim).sum(axis=1)
    vo = scores[site.value].reshape(site.heads, site.vo_dim).sum(axis=1)
    return np.asarray(qk / max(qk.mean(), 1e-12) + vo / max(vo.mean(), 1e-12))


def masked_head_scores(
    groups: ChannelGroups,
    sites: list[AttentionSite],
    model: onnx.ModelProto,
    batches: list[Batch],
) -> dict[str, np.ndarray]:
    """Per site and head: the relative change of the compared outputs with that head's
    context zeroed at the output projection's input (sites without one are left out)."""
    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    compared = compared_outputs(model)
    have = {o.name for o in graph.graph.output}
    graph.graph.output.extend(
        helper.make_empty_tensor_value_info(n) for n in compared if n not in have
    )
    masks: dict[str, tuple[str, AttentionSite]] = {}
    for site in sites:
        value = groups.groups[site.value]
        tensors = {groups.consumers[k] for k in value.consumers}
        layouts = [groups.layouts[t] for t in tensors]
        if len(tensors) != 1 or groups.ranks.get(next(iter(tensors))) != layouts[0].axis + 1:
            continue
        tensor = next(iter(tensors))
        mask, masked = f"{tensor}~head_mask", f"{tensor}~masked"
        position = 0
        for index, node in enumerate(graph.graph.node):
            node.input[:] = [masked if name == tensor else name for name in node.input]
            position = index + 1 if tensor in node.output else position
        graph.graph.node.insert(position, helper.make_node("Mul", [tensor, mask], [masked]))
        graph.graph.input.append(
            helper.make_tensor_value_info(mask, onnx.TensorProto.FLOAT, [site.heads * site.vo_dim])
        )
        masks[mask] = (tensor, site)
    if not masks:
        return {}
    runner = Runner(graph)
    positions = [runner.output_names.index(n) for n in compared]
    ones = {
        mask: np.ones(site.heads * site.vo_dim, np.float32) for mask, (_, site) in masks.items()
    }
    references = [[runner({**b, **ones})[i] for i in positions] for b in batches]
    out: dict[str, np.ndarray] = {}
    for mask, (_, site) in masks.items():
        errors = np.zeros(site.heads)
        for head in range(site.heads):
            feed = dict(ones)
            feed[mask] = ones[mask].copy()
            feed[mask][head * site.vo_dim : (head + 1) * site.vo_dim] = 0
            for batch, reference in zip(batches, references, strict=True):
                values = runner({**batch, **feed})
                errors[head] += relative_change(reference, [values[i] for i in positions])
        out[site.name] = errors / max(len(batches), 1)
        logger.debug("head importance of %s: %s", site.name, out[site.name].tolist())
    return out


def heads_kept(
    units: list[HeadUnit],
    counts: Mapping[int, int],
    head_scores: Mapping[str, np.ndarray],
    scores: Mapping[int, np.ndarray],
    result: PassResult,
) -> dict[int, np.ndarray]:
    """Kept channels of every site's groups for the allocated unit counts; records them."""
    kept: dict[int, np.ndarray] = {}
    for site in {id(u.site): u.site for u in units}.values():
        counted = site_counts(site, units, counts)
        importance = head_scores[site.name]
        kept.update(site_kept(site, counted, importance, scores[site.query], scores[site.value]))
        result.details.append(_site_record(site, counted, importance))
        result.count("heads_removed", site.heads - counted[0])
        result.count("qk_dims_removed", (site.qk_dim - counted[1]) * counted[0])
        result.count("vo_dims_removed", (site.vo_dim - counted[2]) * counted[0])
    return kept


def cut_split(model: UnitMacs, counts: dict[int, int], units: list[HeadUnit]) -> dict[str, float]:
    """The fraction of the model's MACs each kind of cut removes when applied alone."""
    kinds = {"heads": ("heads",), "head_dims": ("qk", "vo")}
    split = {}
    for name, unit_kinds in kinds.items():
        mine = {
            u.index: counts[u.index] for u in units if u.kind in unit_kinds and u.index in counts
        }
        split[name] = round(1 - model.macs(mine) / max(model.total, 1.0), 4)
    channels = {i: c for i, c in counts.items() if i >= 0}
    split["channels"] = round(1 - model.macs(channels) / max(model.total, 1.0), 4)
    return split


def _site_record(
    site: AttentionSite, counts: tuple[int, int, int], importance: np.ndarray
) -> dict[str, Any]:
    heads, qk, vo = counts
    return {
        "kind": "attention",
        "site": site.name,
        "heads": site.heads,
        "kept_heads": sorted(np.argsort(-importance, kind="stable")[:heads].tolist()),
        "head_importance": [round(float(v), 8) for v in importance],
        "qk_dims": f"{qk} of {site.qk_dim}",
        "vo_dims": f"{vo} of {site.vo_dim}",
    }
