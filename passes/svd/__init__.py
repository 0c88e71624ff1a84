"""Low-rank factorization of constant weights (SVD).

MatMul(x, W[k,n]) -> MatMul(MatMul(x, U[k,r]), V[r,n]) when r·(k+n) < (1 − min_gain)·k·n;
likewise a MatMul's left weight, Gemm (any transA/transB/alpha/beta, bias kept on the second
factor), Conv (``scheme=channel``: k×k conv with r filters per group then 1×1; ``spatial``:
kh×1 conv then 1×kw) and a GRU's input weight W (see ``layers``). A weight read by
several nodes is factored once and its factors are shared, or refused with a reason.

Rank rules (one of; default ``energy=0.99``): ``rank=N``, ``energy=E`` (kept fraction of
Σs²), ``params=P`` (kept fraction of the layer's params) and ``budget=B`` (kept fraction of
all candidate params, allocated greedily where the error per saved param is smallest), with
``multiple`` rounding. Under ``budget``, each layer's error is weighed by the measured
effect of its truncation on the model's outputs (``sensitivity``, see ``sensitivity``), so
attention projections and feed-forward layers are compared on what they cost the model,
and no rank goes below ``rank-floor`` of the weight's full rank. The allocation's spectra
come from the first calibration batches that give every candidate ``ALLOCATION_ROWS`` rows
(``factor``), and each probe runs the model only from its layer's inputs on. ``min-params`` skips small
weights; ``include``/``exclude`` select nodes by name: an entry is an exact node name, or
``re:PATTERN`` (``re.search``).

With calibration data (``whiten``/``refit`` default to true then), layers are processed in
waves in topological order: student layer inputs X (the graph as rewritten so far) and
teacher layer outputs Y (the original model) are streamed into XᵀX, XᵀY; the whitened
weight Lᵀ·W (L·Lᵀ = XᵀX + λI) is truncated, then V is refit by least squares so that
X·U·V reproduces the teacher's Y (the plain SVD's factors are kept instead where they do
better, as can happen for the spatial conv, whose whitening is a proxy; only there is the
plain SVD computed). Each
wave runs the student and the teacher only from the tensors where the previous wave stopped
(``analysis.segments``), so calibration costs about one pass over the model. Each factored
weight reports k, n, r, params before and after and its relative output error on the
calibration data (``details``). Without calibration data the plain SVD of W is truncated.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.svd.factor import (
    WeightGroup,
    allocation_moments,
    factorize,
    per_group,
    spectra,
    taps,
)
from onnxpress.passes.svd.layers import LinearForm
from onnxpress.passes.svd.match import classify
from onnxpress.passes.svd.rank import (
    BudgetItem,
    allocate_budget,
    floor_rank,
    max_useful_rank,
    rank_for_energy,
    rank_for_params,
    round_rank,
)
from onnxpress.passes.svd.sensitivity import Probe, measure_sensitivity, probe, wave_stages

from onnxpress.analysis.refit import Spectrum, accumulate_moments, layer_waves
from onnxpress.analysis.segments import SegmentCapture, WeightArrays
from onnxpress.calibration.activations import Moments
from onnxpress.core.context import PassContext
from onnxpress.core.ir import unique_name
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

logger = logging.getLogger(__name__)

DEFAULT_ENERGY = 0.99
RULES = ("rank", "energy", "params", "budget")


@dataclass(frozen=True)
class SvdOptions:
    rank: int | None = None  # keep this many singular values
    energy: float | None = None  # keep this fraction of Σ s² (whitened with calibration)
    params: float | None = None  # keep this fraction of each layer's params
    budget: float | None = None  # keep this fraction of all candidate params
    multiple: int = 1  # round ranks to a multiple of this
    min_params: int = 1024  # leave smaller weights alone
    min_gain: float = 0.1  # factor only when r·(k+n) < (1 − min_gain)·k·n (< 0: tests only)
    scheme: Literal["channel", "spatial"] = "channel"  # how a Conv is split
    include: tuple[str, ...] = ()  # only these nodes (names, or re:PATTERN)
    exclude: tuple[str, ...] = ()  # never these nodes (names, or re:PATTERN)
    whiten: bool | None = None  # factor X·W rather than W; default: with calibration
    refit: bool | None = None  # least-squares V against the teacher; default: with calibration
    damping: float = 0.01  # relative ridge of the whitening Cholesky and of the refit
    # budget: weigh each layer's error by its measured effect on the outputs (with calibration)
    sensitivity: bool = True
    rank_floor: float = 0.0625  # budget: no weight below this fraction of its full rank

    def __post_init__(self) -> None:
        given = [name for name in RULES if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one rank rule, not {' and '.join(given)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, not {self.rank}")
        for name in ("energy", "params", "budget"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], not {value}")
        if self.multiple < 1:
            raise ValueError(f"multiple must be >= 1, not {self.multiple}")
        if self.min_params < 0:
            raise ValueError(f"min-params must be >= 0, not {self.min_params}")
        if not (math.isfinite(self.min_gain) and self.min_gain < 1):
            raise ValueError(f"min-gain must be < 1, not {self.min_gain}")
        if self.scheme not in ("channel", "spatial"):
            raise ValueError(f"scheme must be channel or spatial, not {self.scheme!r}")
        if not 0 <= self.rank_floor <= 1:
            raise ValueError(f"rank-floor must be in [0, 1], not {self.rank_floor}")
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"damping must be > 0, not {self.damping}")
        for entry in (*self.include, *self.exclude):
            if entry.startswith("re:"):
                try:
                    re.compile(entry[3:])
                except re.error as exc:
                    raise ValueError(f"bad regex in {entry!r}: {exc}") from None

    @property
    def rule(self) -> tuple[str, float]:
        """The rank rule in force: (name, value)."""
        for name in RULES:
            value = getattr(self, name)
            if value is not None:
                return name, float(value)
        return "energy", DEFAULT_ENERGY


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """True when ``name`` equals an entry or matches a ``re:`` entry."""
    return any(re.search(p[3:], name) if p.startswith("re:") else p == name for p in patterns)


@register_pass("svd")
class Svd(Pass[SvdOptions]):
    """Factor MatMul/Gemm/Conv/GRU weights into two low-rank factors (data-aware with calibration)."""

    options_type = SvdOptions
    lossless = False
    metric = "rel-l2"
    default_budget = 0.2

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        has_data = ctx.calibration is not None
        whiten = opts.whiten if opts.whiten is not None else has_data
        refit = opts.refit if opts.refit is not None else has_data
        if (whiten or refit) and not has_data:
            raise ValueError("whiten=true and refit=true need calibration data")
        result = PassResult()
        self._sensitivity: dict[str, float] = {}
        groups = self._candidates(graph, result)
        fixed: dict[str, int] = {}
        if opts.budget is not None and groups:
            fixed = self._allocate(graph, ctx, groups, whiten, result)
            groups = [g for g in groups if g.key in fixed]
        if ctx.calibration is None:
            for group in groups:
                self._factor(graph, group, {}, fixed.get(group.key), False, False, result)
            return result
        teacher_names = {t for node in ctx.original.graph.node for t in node.output}
        teacher_names |= {i.name for i in ctx.original.graph.input}
        waves = layer_waves(graph, [[f.node for f in g.forms] for g in groups])
        by_wave = [
            [t for i in wave for t in taps(groups[i], teacher_names, True)] for wave in waves
        ]
        # Each wave runs the student and the teacher only from where the last wave stopped.
        calibration = ctx.calibration
        arrays = WeightArrays()  # the teacher's regions share the weights the student kept
        student = SegmentCapture(calibration.batches, arrays=arrays)
        teacher = SegmentCapture(calibration.batches, arrays=arrays)
        for wave, wave_taps in zip(waves, by_wave, strict=True):
            moments: dict[str, Moments] = {}
            if wave_taps:
                inputs = student.run(ctx.export(graph), [t.student for t in wave_taps])
                targets = teacher.run(ctx.original, [t.teacher for t in wave_taps if t.teacher])
                empty: dict[str, np.ndarray] = {}
                pairs = zip_longest(inputs, targets, fillvalue=empty)  # runs both to the end
                moments = accumulate_moments(wave_taps, pairs)
            for group in (groups[i] for i in wave):
                self._factor(graph, group, moments, fixed.get(group.key), whiten, refit, result)
        return result

    def _candidates(self, graph: gs.Graph, result: PassResult) -> list[WeightGroup]:
        by_weight: dict[int, list[LinearForm]] = {}
        for node in graph.nodes:
            for item in classify(node, self.options.scheme):
                if isinstance(item, tuple):
                    result.refuse(*item)
                else:
                    by_weight.setdefault(id(item.weight), []).append(item)
        interface = {id(t) for t in (*graph.inputs, *graph.outputs)}
        groups = []
        for forms in by_weight.values():
            reason = self._group_reason(forms, interface)
            if reason:
                for form in forms:
                    result.refuse(str(form.node.name), reason)
            else:
                groups.append(WeightGroup(f"{forms[0].weight.name}", forms[0].weight, forms))
        return groups

    def _group_reason(self, forms: list[LinearForm], interface: set[int]) -> str | None:
        opts, form, weight = self.options, forms[0], forms[0].weight
        users = {id(f.node) for f in forms}
        others = [n for n in weight.outputs if id(n) not in users]
        names = [str(f.node.name) for f in forms]
        if id(weight) in interface:
            return f"weight '{weight.name}' is a graph input or output"
        if others:
            return (
                f"weight '{weight.name}' is also read by '{others[0].name}' "
                f"({others[0].op}); refusing rather than factoring it for one user only"
            )
        kinds = {f.key() for f in forms}
        if len(kinds) > 1:
            return (
                f"weight '{weight.name}' is read in {len(kinds)} different forms by "
                f"{names}; refusing rather than factoring it for one user only"
            )
        if opts.include and not all(matches(n, opts.include) for n in names):
            return (
                "not selected by include"
                if len(names) == 1
                else (f"weight '{weight.name}' is shared with a node not selected by include")
            )
        if any(matches(n, opts.exclude) for n in names):
            return (
                "excluded by exclude"
                if len(names) == 1
                else (f"weight '{weight.name}' is shared with a node excluded by exclude")
            )
        dense = form.groups * form.k * form.n
        if dense < opts.min_params:
            return f"{dense} params < min-params {opts.min_params}"
        if max_useful_rank(form.k, form.n, opts.min_gain) < 1:
            return (
                f"no rank r saves min-gain {opts.min_gain:g}: "
                f"r·(k+n) >= (1 − min-gain)·k·n already at r=1 (k={form.k}, n={form.n})"
            )
        return None

    def _allocate(
        self,
        graph: gs.Graph,
        ctx: PassContext,
        groups: list[WeightGroup],
        whiten: bool,
        result: PassResult,
    ) -> dict[str, int]:
        """Ranks for the budget rule from every candidate's (whitened) spectrum."""
        opts = self.options
        moments: dict[str, Moments] = {}
        weights: dict[str, float] = {}
        if ctx.calibration is not None and whiten:
            all_taps = [tap for g in groups for tap in taps(g, set(), targets=False)]
            moments = allocation_moments(ctx.export(graph), all_taps, ctx.calibration.batches)
        found: dict[str, list[Spectrum]] = {}
        for group in groups:  # each group's moments go as soon as its spectra are known
            found[group.key] = spectra(group.form, per_group(group, moments), opts.damping)
            for index in range(group.form.groups):
                moments.pop(f"{group.key}#{index}", None)
        singular = {key: [s.singular for s in found[key]] for key in found}
        if ctx.calibration is not None:
            batch = next(iter(ctx.calibration.batches(1)), None) if opts.sensitivity else None
            probes: dict[str, Probe] = {}
            for group in groups if batch is not None else []:
                found_group = found.pop(group.key)
                probes[str(group.weight.name)] = probe(
                    group, found_group, opts.rank_floor, opts.min_gain
                )
            found.clear()  # the factors: only the spectra's singular values are read below
            if batch is not None:
                stages = wave_stages(graph, groups)
                weights = measure_sensitivity(ctx.export(graph), probes, batch, stages)
        items = [
            BudgetItem(
                group.key,
                group.form.k,
                group.form.n,
                group.form.groups,
                singular[group.key],
                weight=weights.get(str(group.weight.name), 1.0),
                floor=floor_rank(group.form.k, group.form.n, opts.rank_floor),
            )
            for group in groups
        ]
        assert opts.budget is not None
        allocation = allocate_budget(items, opts.budget, opts.multiple, opts.min_gain)
        self._sensitivity = weights
        for group in groups:
            if group.key not in allocation.ranks:
                for form in group.forms:
                    result.refuse(
                        str(form.node.name),
                        "budget: kept dense (its error per saved param"
                        + (
                            f", weighed by its measured sensitivity "
                            f"{weights[str(group.weight.name)]:.2g},"
                            if str(group.weight.name) in weights
                            else ""
                        )
                        + " was higher than the other candidates')",
                    )
        if allocation.kept > allocation.target:
            result.count("budget_shortfall_params", allocation.kept - allocation.target)
            logger.warning(
                "svd budget=%g: cannot go below %d of %d params (target %d)",
                opts.budget,
                allocation.kept,
                allocation.dense,
                allocation.target,
            )
        return allocation.ranks

    def _rank(self, group: WeightGroup, singular: list[np.ndarray]) -> int:
        opts, form = self.options, group.form
        full = min(form.k, form.n)
        name, value = opts.rule
        if name == "rank":
            return round_rank(int(value), opts.multiple, full, up=True)
        if name == "energy":
            rank = rank_for_energy(singular, value)
            return round_rank(rank, opts.multiple, full, up=True)
        return round_rank(rank_for_params(form.k, form.n, value), opts.multiple, full, up=False)

    def _factor(
        self,
        graph: gs.Graph,
        group: WeightGroup,
        moments: dict[str, Moments],
        rank: int | None,
        whiten: bool,
        refit: bool,
        result: PassResult,
    ) -> None:
        opts, form = self.options, group.form
        group_moments = per_group(group, moments)
        found = spectra(form, group_moments if whiten else [None] * form.groups, opts.damping)
        if rank is None:
            rank = self._rank(group, [s.singular for s in found])
            if rank > max_useful_rank(form.k, form.n, opts.min_gain):
                rule, value = opts.rule
                reason = (
                    f"rank {rank} ({rule}={value:g}) keeps {rank * (form.k + form.n)} of "
                    f"{form.k * form.n} params per group: saves less than min-gain "
                    f"{opts.min_gain:g}"
                )
                for f in group.forms:
                    result.refuse(str(f.node.name), reason)
                return
        factors = factorize(form, found, rank, group_moments, refit, opts.damping)
        if whiten and factors.output_error is not None and form.whitening_is_proxy:
            # Whitening is exact for rows that are the layer's inputs and a proxy for the
            # spatial conv; keep the plain factors where they reproduce the teacher better.
            plain_spectra = spectra(form, [None] * form.groups, opts.damping)
            plain = factorize(form, plain_spectra, rank, group_moments, refit, opts.damping)
            if plain.output_error is not None and plain.output_error < factors.output_error:
                factors, whiten = plain, False
        first, second = form.factor_values(factors.u, factors.v)
        dtype, base = form.values.dtype, str(group.weight.name)
        first_c = gs.Constant(unique_name(graph, f"{base}_svd_u"), first.astype(dtype))
        second_c = gs.Constant(unique_name(graph, f"{base}_svd_v"), second.astype(dtype))
        for f in group.forms:
            f.rewrite(graph, first_c, second_c)
        after = int(first.size + second.size)
        result.count("factored")
        result.count("nodes_rewritten", len(group.forms))
        result.count("params_saved", group.dense - after)
        result.details.append(
            {
                "weight": base,
                "nodes": [str(f.node.name) for f in group.forms],
                "form": form.kind,
                "k": form.k,
                "n": form.n,
                "groups": form.groups,
                "rank": rank,
                "params_before": group.dense,
                "params_after": after,
                "weight_error": factors.weight_error,
                "output_error": factors.output_error,
                "upstream_error": factors.upstream_error,
                "whitened": whiten,
                "refit": factors.refit,
                "sensitivity": self._sensitivity.get(base),
            }
        )


__all__: list[Any] = ["Svd", "SvdOptions"]
