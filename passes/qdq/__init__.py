"""Static int8 quantization to standard QDQ ONNX: annotate -> observe -> calibrate -> convert.

    Conv(x, W, b)  ->  Conv(DQ(Q(x)), DQ(W_int8, axis=0), DQ(b_int32))  ->  Q -> DQ -> ...
    GRU(x, W, R)   ->  GRU(x, DQ(W_int8, axis=1), DQ(R_int8, axis=1))    (weight-only)

1. annotate (``annotate``): choose the tensors to quantize and where the pairs go so
   that onnxruntime fuses them (QLinearConv with the Relu folded in, MatMulIntegerToFloat,
   QLinearAdd, int8 MaxPool/Reshape/Concat with shared parameters); a Conv with nothing
   quantized downstream keeps a float output (``float-heads``), and after calibration a
   Concat of ranges more than ``concat-spread`` apart that nothing quantized reads stays float;
2. observe (``calibrate``): stream the float model over the calibration batches into
   fixed-size observers (memory does not grow with the number of batches);
3. calibrate: one clipping range per tensor by ``method`` (minmax, percentile, entropy, mse;
   see ``onnxpress.calibration.observers``), unioned over tensors that share parameters; ``auto`` (the
   default) quantizes with minmax, percentile and mse, each with and without bias
   correction, and keeps the one whose outputs on calibration batches are closest to the
   float model's (relative L2);
4. recover: ``bias-correction`` (on by default) adds E[x].(W - Wq) to each bias; ``max-drop``
   keeps the most sensitive layers in float until the quality metric is within budget
   (``recover``; a Python metric is registered with ``register_metric``);
   ``refit=on|auto`` refits each quantized Conv/Gemm/MatMul by least squares against the
   float model's layer outputs on its quantized inputs (``refit``; auto keeps the refit
   only when the outputs get closer to the float model's);
5. convert (``convert``): int8 weights, int32 biases, uint8/int8 activation pairs.

Per-channel weights need DequantizeLinear's ``axis`` (opset 13): an older model is upgraded to
opset 13 with ``onnx.version_converter`` first (the report says so); if the converter fails
the pass refuses with its reason (use ``per-channel=false``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.qdq.annotate import (
    DEFAULT_OPS,
    WEIGHT_ONLY_OPS,
    Annotation,
    Scope,
    annotate,
)
from onnxpress.passes.qdq.calibrate import (
    CARRIED,
    add_zero_biases,
    apply_bias_deltas,
    bias_deltas,
    float_tensor_names,
    mean_axes_for,
    mixed_range_concats,
    observe,
    tensor_ranges,
)
from onnxpress.passes.qdq.convert import ConvertSummary, WeightCache, convert
from onnxpress.passes.qdq.prepare import decompose_hardswish, detach_dead_nodes, name_nodes
from onnxpress.passes.qdq.recover import (
    Evaluator,
    FallbackResult,
    MetricInputs,
    QualityMetric,
    fidelity,
    get_metric,
    greedy_fallback,
    register_metric,
    scoring_arithmetic,
    select_calibration,
)
from onnxpress.passes.qdq.refit import LINEAR_OPS, apply_solutions, refit_quantized
from onnxpress.passes.qdq.report import report
from onnxpress.passes.qdq.saturation import Policy, protect_from_saturation
from onnxpress.passes.qdq.target_fit import fit_targets
from onnxpress.passes.upgrade_opset import upgrade_opset

from onnxpress.calibration.observers import RANGE_METHODS, Range
from onnxpress.core.context import PassContext
from onnxpress.core.errors import CalibrationError
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

__all__ = ["MetricInputs", "Qdq", "QdqOptions", "QualityMetric", "register_metric"]

logger = logging.getLogger(__name__)

Deltas = dict[str, np.ndarray]  # layer name -> bias shift (bias correction)

# what method=auto tries, in order of preference on ties (entropy needs far more data)
AUTO_METHODS = ("mse", "minmax", "percentile")


@dataclass(frozen=True)
class QdqOptions:
    # activation ranges: auto = the best of minmax/percentile/mse (+- bias correction)
    method: Literal["auto", "minmax", "percentile", "entropy", "mse"] = "auto"
    percentile: float = 99.99  # for method=percentile
    bins: int = 2048  # histogram bins (percentile, entropy, mse)
    per_channel: bool = True  # int8 weights per output channel (else per tensor)
    activations: Literal["uint8", "int8"] = "uint8"  # asymmetric uint8 or symmetric int8
    reduce_range: bool = False  # 7-bit weights: no int16 saturation in u8s8 AVX2 kernels
    bias_correction: bool = True  # remove the mean output shift (auto: try with and without)
    max_drop: float | None = None  # accuracy-aware fallback budget on `metric`
    metric: str = "agreement"  # quality metric for max-drop (see register_metric)
    extra_ops: tuple[str, ...] = ()  # op types to quantize besides the defaults (e.g. Softmax)
    include: tuple[str, ...] = ()  # only these nodes: name, op type or re:REGEX on the name
    exclude: tuple[str, ...] = ()  # never these nodes (same forms)
    calibration_batches: int = 0  # 0 = every batch
    fallback_batches: int = 8  # calibration batches that score auto and fallback candidates
    # least-squares refit of each quantized layer against the float model: auto = keep it when
    # the outputs on the scoring batches get closer to the float model's
    refit: Literal["auto", "on", "off"] = "off"
    # HardSwish -> Mul(x, HardSigmoid(x)) so that the Mul runs as QLinearMul: faster,
    # slightly less accurate (BENCHMARKS.md, mobilenet_mnist)
    split_hardswish: bool = False
    float_heads: bool = True  # a Conv with no quantized node downstream keeps a float output
    concat_spread: float = 8.0  # a Concat whose input ranges differ more than this stays float
    # weights safe from int16 pair saturation where a target needs it (x86 without VNNI):
    # auto = per layer the better of reround and narrow, measured, where its error is within
    # saturation-tolerance, else u8 weights (exact, slower kernels); off = never
    saturation: Literal["auto", "reround", "narrow", "u8", "off"] = "auto"
    saturation_margin: float = 1.25  # headroom over the activation bytes seen in calibration
    saturation_tolerance: float = 0.002  # rel-L2 of a layer's output vs exact int32 sums
    # GRU/LSTM/RNN weights: int8 weight-only (4x smaller, but onnxruntime dequantizes them on
    # every run: slower than float) or float; auto = float when --target names the hardware
    # (speed), int8 otherwise (size)
    recurrent: Literal["auto", "int8", "float"] = "auto"
    # without max-drop: when the task metric misses its budget on this CPU or a target's
    # emulated arithmetic, keep the most sensitive layers in float until it fits
    recover: bool = True

    def __post_init__(self) -> None:
        if self.method != "auto" and self.method not in RANGE_METHODS:
            raise ValueError(f"method must be auto or one of {', '.join(RANGE_METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], not {self.percentile}")
        if self.bins < 256:
            raise ValueError(f"bins must be >= 256, not {self.bins}")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise ValueError(f"max-drop must be >= 0, not {self.max_drop}")
        if self.calibration_batches < 0 or self.fallback_batches < 1:
            raise ValueError("calibration-batches must be >= 0 and fallback-batches >= 1")
        if not self.concat_spread >= 1.0:
            raise ValueError(f"concat-spread must be >= 1, not {self.concat_spread}")
        if not 1.0 <= self.saturation_margin <= 255.0:
            raise ValueError(f"saturation-margin must be in [1, 255], not {self.saturation_margin}")
        if not self.saturation_tolerance >= 0:
            raise ValueError(f"saturation-tolerance must be >= 0, not {self.saturation_tolerance}")

    @property
    def saturation_policy(self) -> Policy:
        return Policy(self.saturation, self.saturation_margin, self.saturation_tolerance)


@register_pass("qdq")
class Qdq(Pass[QdqOptions]):
    """Static int8 quantization to QDQ ONNX (calibrated; per-channel weights, uint8 activations)."""

    options_type = QdqOptions
    lossless = False
    # Judged per output by its task's yardstick (top-1, embedding ranks, noise-to-signal),
    # on onnxruntime's integer kernels and on each target's emulated int8 arithmetic.
    metric = "task"
    default_budget = None
    recovery_hint = (
        "try qdq{max-drop=0.01} (keeps the most sensitive layers in float), "
        "qdq{method=percentile}, or a larger --budget"
    )

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        result = PassResult()
        if ctx.calibration is None:
            raise CalibrationError(
                "pass 'qdq' needs calibration data (--calibration FILE|DIR, or calibration= in "
                "onnxpress.optimize)"
            )
        metric = get_metric(opts.metric) if opts.max_drop is not None else None
        opset = int(graph.opset or 0)
        if (opset < 13 and opts.per_channel) or opset < 10:
            failure = upgrade_opset(graph, ctx.export, 13)
            if failure is not None:
                need = "per-channel DequantizeLinear" if opset >= 10 else "QuantizeLinear"
                result.refuse(
                    "<model>",
                    f"opset {opset}: {need} needs opset {13 if opset >= 10 else 10} and onnx's "
                    f"version converter could not upgrade the model ({failure})"
                    + ("; use per-channel=false" if opset >= 10 else ""),
                )
                return result
            result.details.append({"opset_upgraded": {"from": opset, "to": 13}})
        detach_dead_nodes(graph)
        split = decompose_hardswish(graph) if opts.split_hardswish else 0
        name_nodes(graph)
        floats = float_tensor_names(ctx.export(graph))
        recurrent = opts.recurrent
        if recurrent == "auto":
            recurrent = "float" if ctx.targets_named else "int8"
        ops = frozenset(DEFAULT_OPS) | frozenset(opts.extra_ops)
        if recurrent == "float":
            ops -= frozenset(WEIGHT_ONLY_OPS)
            kept = [n.name for n in graph.nodes if n.op in WEIGHT_ONLY_OPS]
            for name in kept:
                result.refuse(
                    name,
                    "recurrent=float: weight-only int8 would be dequantized on every run "
                    "(slower than float); recurrent=int8 makes the weights 4x smaller",
                )
            result.count("recurrent_kept_float", len(kept))
        scope = Scope(ops, opts.include, opts.exclude)
        full = self._annotate(graph, scope, floats, frozenset())
        if opts.bias_correction and add_zero_biases(graph, {k[0] for k in full.weights}):
            full = self._annotate(graph, scope, floats, frozenset())  # now with those biases
        float_model = ctx.export(graph)
        obs = observe(
            float_model,
            full.activations,
            mean_axes_for(graph, full) if opts.bias_correction else {},
            ctx.calibration,
            None if opts.method == "minmax" else opts.bins,
            opts.calibration_batches or None,
            ctx.statistics,
        )
        if ctx.statistics is not None:
            result.count("calibration_statistics_reused", obs.reused)
        symmetric = opts.activations == "int8"
        outputs = {t.name for t in graph.outputs}
        all_deltas = (
            bias_deltas(graph, full, obs, opts.reduce_range) if opts.bias_correction else {}
        )
        method, corrected_biases = opts.method, opts.bias_correction
        mixed = mixed_range_concats(graph, full, obs, symmetric, opts.concat_spread)
        range_cache: dict[str, dict[str, Range]] = {}
        weight_cache: WeightCache = {}

        def materialize(
            target: gs.Graph, excluded: frozenset[str], method: str, deltas: Deltas
        ) -> tuple[Annotation, ConvertSummary, int]:
            ann = self._annotate(target, scope, floats, excluded | frozenset(mixed))
            if method not in range_cache:  # every candidate of one method shares its ranges
                range_cache[method] = tensor_ranges(
                    full, obs, method, symmetric, opts.percentile, outputs
                )
            ranges = range_cache[method]
            corrected = apply_bias_deltas(target, deltas, set(ann.quantized_nodes))
            summary = convert(target, ann, ranges, symmetric, opts.reduce_range, weight_cache)
            return ann, summary, corrected

        def build_graph(
            excluded: frozenset[str], method: str, deltas: Deltas, source: gs.Graph | None = None
        ) -> gs.Graph:
            candidate = (graph if source is None else source).copy()
            materialize(candidate, excluded, method, deltas)
            return candidate

        def build(
            excluded: frozenset[str], method: str, deltas: Deltas, source: gs.Graph | None = None
        ) -> Any:
            return ctx.export(build_graph(excluded, method, deltas, source))

        scoring_kind = scoring_arithmetic(ctx.targets, opts.saturation)
        if opts.method == "auto":
            scoring = list(ctx.calibration.batches(opts.fallback_batches))
            corrections = (True, False) if opts.bias_correction else (False,)
            settings = [(m, c) for m in AUTO_METHODS for c in corrections]
            choices = select_calibration(
                settings,
                lambda m, c: build(frozenset(), m, all_deltas if c else {}),
                Evaluator(float_model, scoring, fidelity, scoring_kind),
            )
            method, corrected_biases = choices[0].method, choices[0].bias_correction
            result.details.append({"auto": [vars(choice) for choice in choices]})
        deltas: Deltas = all_deltas if corrected_biases else {}
        if opts.refit != "off":
            trial = graph.copy()
            records, solutions = refit_quantized(
                trial,
                [n for n in trial.nodes if n.name in full.quantized_nodes and n.op in LINEAR_OPS],
                lambda g: build(frozenset(), method, {}, g),
                float_model,
                lambda: ctx.calibration.batches(opts.calibration_batches or None),
                opts.per_channel,
                opts.reduce_range,
            )
            refit_deltas: Deltas = {}
            if corrected_biases:  # the refit set exact biases; correct the other layers only
                annotated = self._annotate(trial, scope, floats, frozenset())
                rest = bias_deltas(trial, annotated, obs, opts.reduce_range)
                refit_deltas = {
                    k: v for k, v in rest.items() if k.partition(CARRIED)[0] not in solutions
                }
            keep, scores = bool(solutions), {}
            if opts.refit == "auto" and solutions:
                batches = list(ctx.calibration.batches(opts.fallback_batches))
                judge = Evaluator(float_model, batches, fidelity, scoring_kind)
                scores["error_before"] = judge.drop(build(frozenset(), method, deltas))[0]
                scores["error_after"] = judge.drop(build(frozenset(), method, refit_deltas, trial))[
                    0
                ]
                keep = scores["error_after"] < scores["error_before"]
            if keep:
                apply_solutions(graph, solutions)
                deltas = refit_deltas
            result.count("layers_refit", len(solutions) if keep else 0)
            result.details.append({"refit": {"kept": keep, **scores, "layers": records}})
        fallback: FallbackResult | None = None
        if metric is not None and opts.max_drop is not None:
            batches = list(ctx.calibration.batches(opts.fallback_batches))
            evaluator = Evaluator(float_model, batches, metric, scoring_kind)
            fallback = greedy_fallback(
                {k: v for k, v in full.quantized_nodes.items() if k not in mixed},
                lambda excluded: build(excluded, method, deltas),
                evaluator,
                opts.max_drop,
            )
        judged_by = (opts.metric, opts.max_drop)
        if fallback is None and opts.recover:
            fallback = fit_targets(
                float_model,
                {k: v for k, v in full.quantized_nodes.items() if k not in mixed},
                lambda excluded: build_graph(excluded, method, deltas),
                ctx.export,
                list(ctx.calibration.batches(opts.fallback_batches)),
                ctx.targets,
                opts.saturation_policy,
            )
            judged_by = ("task budget share, worst target", 1.0)
        excluded = frozenset(fallback.excluded if fallback else ())
        ann, summary, corrected = materialize(graph, excluded, method, deltas)
        report(
            result,
            ann,
            summary,
            corrected,
            obs,
            fallback,
            opts,
            judged_by,
            (method, corrected_biases),
        )
        result.count("hardswish_split", split)
        for name, reason in mixed.items():
            result.refuse(name, reason)
        result.count("concats_kept_float", len(mixed))
        protect_from_saturation(
            graph,
            ctx,
            result,
            opts.saturation_policy,
            list(ctx.calibration.batches(opts.fallback_batches)),
        )
        return result

    def _annotate(
        self, graph: gs.Graph, scope: Scope, floats: set[str], excluded: frozenset[str]
    ) -> Annotation:
        ann = annotate(graph, scope, floats, excluded, self.options.float_heads)
        if not self.options.per_channel:
            ann.weights = {k: replace(v, axis=None) for k, v in ann.weights.items()}
            ann.biases = {
                k: replace(v, weight=replace(v.weight, axis=None)) for k, v in ann.biases.items()
            }
            ann.tied = {k: replace(v, axis=None) for k, v in ann.tied.items()}
        return ann
