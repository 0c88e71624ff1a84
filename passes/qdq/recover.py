"""Accuracy-aware fallback and calibration selection for the ``qdq`` pass, and the quality
metrics they are judged by.

Given a budget ``max_drop`` on a quality metric (higher is better; the float model's score
is the reference), fallback measures the drop of the fully quantized model; if it is over
budget it ranks the quantized layers by sensitivity (the drop with only that layer in float;
in a deep model, groups of layers first) and moves the most sensitive ones back to float:
the shortest prefix of that ranking within budget, found by doubling and bisection (the drop
falls as layers go back to float), so a model of n layers costs min(n, ~64) + O(log n)
candidate runs, not up to 2n.

A quality metric is a function of ``MetricInputs`` (the candidate model, the calibration
batches, its outputs and the float model's outputs on them) that returns a score. The
built-in ``agreement`` is the mean, over outputs, of top-1 agreement with the float model
(outputs whose last axis has 2+ entries) or 1 - relative L2 error (other outputs). Register
your own with ``register_metric("name", fn)`` and select it with ``qdq{metric=name}``.
The built-in ``fidelity`` is 1 - relative L2 error of every output (mean over outputs); it
ranks the calibration settings that ``method=auto`` tries (``select_calibration``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxpress.core.calibration_data import Batch
from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.errors import PipelineError
from onnxpress.core.targets import EXACT, Arithmetic, Target, host_target
from onnxpress.core.task_metric import as_array

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricInputs:
    model: onnx.ModelProto  # the candidate (or the float model, for the reference score)
    batches: list[Batch]  # calibration batches, in calibration order
    outputs: list[list[np.ndarray]]  # the candidate's outputs, per batch
    reference: list[list[np.ndarray]]  # the float model's outputs, per batch
    output_names: list[str]


QualityMetric = Callable[[MetricInputs], float]


def _rel_l2(ref: np.ndarray, new: np.ndarray) -> float:
    denom = float(np.linalg.norm(ref.astype(np.float64)))
    return float(np.linalg.norm(ref.astype(np.float64) - new)) / max(denom, 1e-12)


def agreement(inputs: MetricInputs) -> float:
    """Top-1 agreement with the float model for [batch, classes] outputs, else 1 - relative L2
    (on a detector's [batch, 4 + classes, cells] or a segmentation map an argmax over the last
    axis would mean nothing)."""
    scores = []
    for index in range(len(inputs.output_names)):
        refs = [batch[index] for batch in inputs.reference]
        news = [batch[index] for batch in inputs.outputs]
        if refs[0].ndim == 2 and refs[0].shape[-1] >= 2:
            same = sum(
                int(np.sum(np.argmax(r, -1) == np.argmax(n, -1)))
                for r, n in zip(refs, news, strict=True)
            )
            scores.append(same / max(sum(r[..., 0].size for r in refs), 1))
        else:
            ref = np.concatenate([r.ravel() for r in refs])
            new = np.concatenate([n.ravel() for n in news])
            scores.append(1.0 - min(_rel_l2(ref, new), 1.0))
    return float(np.mean(scores)) if scores else 1.0


def fidelity(inputs: MetricInputs) -> float:
    """1 - relative L2 error of each output over all batches, mean over outputs."""
    errors = []
    for index in range(len(inputs.output_names)):
        ref = np.concatenate([batch[index].ravel() for batch in inputs.reference])
        new = np.concatenate([batch[index].ravel() for batch in inputs.outputs])
        errors.append(_rel_l2(ref, new))
    return 1.0 - float(np.mean(errors)) if errors else 1.0


_METRICS: dict[str, QualityMetric] = {"agreement": agreement, "fidelity": fidelity}


def register_metric(name: str, metric: QualityMetric) -> None:
    """Make ``metric`` selectable as ``qdq{metric=name}``; a name can be registered once."""
    if name in _METRICS and _METRICS[name] is not metric:
        raise PipelineError(f"quality metric '{name}' is already registered")
    _METRICS[name] = metric


def get_metric(name: str) -> QualityMetric:
    try:
        return _METRICS[name]
    except KeyError:
        known = ", ".join(sorted(_METRICS))
        raise PipelineError(f"pass 'qdq': unknown metric '{name}' (metrics: {known})") from None


class Evaluator:
    """Scores candidate models on calibration batches with onnxruntime's int8 kernels, or
    with the integer arithmetic ``arithmetic`` emulated (``scoring_arithmetic``)."""

    def __init__(
        self,
        float_model: onnx.ModelProto,
        batches: list[Batch],
        metric: QualityMetric,
        arithmetic: Arithmetic | None = None,
    ):
        self.batches = batches
        self.metric = metric
        self.arithmetic = arithmetic
        self.output_names = [o.name for o in float_model.graph.output]
        self.reference = Evaluator.run(self, float_model, emulate=False)
        self.baseline = metric(
            MetricInputs(float_model, batches, self.reference, self.reference, self.output_names)
        )
        self.evaluations = 0

    def run(self, model: onnx.ModelProto, emulate: bool = True) -> list[list[np.ndarray]]:
        if emulate and self.arithmetic is not None:
            runner = EmulatedRunner(model, self.arithmetic)
            return [[np.asarray(x) for x in runner(b)] for b in self.batches]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = min(2, os.cpu_count() or 1)
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        return [[as_array(x) for x in session.run(None, b)] for b in self.batches]

    def drop(self, model: onnx.ModelProto) -> tuple[float, float]:
        """(metric drop vs the float model, relative L2 of the outputs as a tie-breaker)."""
        self.evaluations += 1
        outputs = self.run(model)
        score = self.metric(
            MetricInputs(model, self.batches, outputs, self.reference, self.output_names)
        )
        error = max(
            _rel_l2(r, n)
            for ref, new in zip(self.reference, outputs, strict=True)
            for r, n in zip(ref, new, strict=True)
        )
        return self.baseline - score, error

    def ranking(self) -> Evaluator:
        """The judge that ranks layers by sensitivity: this one (subclasses narrow it)."""
        return self


@dataclass
class FallbackStep:
    node: str
    op: str
    gain: float  # drop recovered when this layer alone (or its group) is float: sensitivity
    drop_after: float | None  # drop with this and every earlier layer in float, if measured
    group: int = 1  # layers that were in float together when ``gain`` was measured


@dataclass
class FallbackResult:
    excluded: list[str]
    steps: list[FallbackStep]
    initial_drop: float
    final_drop: float
    within_budget: bool
    evaluations: int = 0  # candidate models scored, the ranking included


RANK_ALONE_LIMIT = 64  # up to this many candidate layers, each is ranked alone
RANK_GROUPS = 32  # beyond it, contiguous groups of layers (graph order) are ranked first
REFINED_LAYERS = 32  # then the layers of the most sensitive groups, up to this many, alone


@dataclass(frozen=True)
class Ranked:
    name: str
    gain: float  # drop recovered with it (or its group) in float
    error_gain: float  # the same in the evaluator's relative error: the tie-break
    group: int  # 1: measured alone


def _ranked(names: list[str], gains: list[tuple[float, float]], group: int) -> list[Ranked]:
    return [
        Ranked(name, gain, error, group) for name, (gain, error) in zip(names, gains, strict=True)
    ]


def _by_sensitivity(ranked: list[Ranked]) -> list[Ranked]:
    return sorted(ranked, key=lambda item: (-item.gain, -item.error_gain, item.name))


def rank_layers(
    names: list[str],
    score: Callable[[frozenset[str]], tuple[float, float]],
) -> list[Ranked]:
    """``names`` (graph order), most sensitive first. ``score(in_float)`` is the (drop,
    error) gain with those layers in float. Up to ``RANK_ALONE_LIMIT`` layers, each is scored
    alone. Beyond, the layers are split into ``RANK_GROUPS`` contiguous groups, the groups
    are scored, and the layers of the most sensitive groups (``REFINED_LAYERS`` of them) are
    scored alone and lead the order; the other groups follow by their group's gain, their
    layers in graph order: about 64 candidate runs for any depth (efficientnetv2's 329
    layers cost 329 runs and 6 minutes one by one)."""
    if len(names) <= RANK_ALONE_LIMIT:
        return _by_sensitivity(_ranked(names, [score(frozenset([n])) for n in names], 1))
    size = -(-len(names) // RANK_GROUPS)
    groups = [names[start : start + size] for start in range(0, len(names), size)]
    group_gains = [score(frozenset(group)) for group in groups]
    order = sorted(range(len(groups)), key=lambda g: (-group_gains[g][0], -group_gains[g][1], g))
    refined: list[Ranked] = []
    rest: list[Ranked] = []
    for index in order:
        group = groups[index]
        if not rest and len(refined) + len(group) <= REFINED_LAYERS:
            refined += _ranked(group, [score(frozenset([n])) for n in group], 1)
        else:
            rest += _ranked(group, [group_gains[index]] * len(group), len(group))
    return _by_sensitivity(refined) + rest


def greedy_fallback(
    candidates: dict[str, str],
    build: Callable[[frozenset[str]], onnx.ModelProto],
    evaluator: Evaluator,
    max_drop: float,
    scored: tuple[float, float] | None = None,
) -> FallbackResult:
    """Keep the most sensitive layers (node name -> op) in float until within ``max_drop``.

    Layers are ranked by the drop each recovers in float (``rank_layers``, scored by
    ``evaluator.ranking()``, which may be a cheaper view of the same judge); the shortest
    prefix of that ranking within budget is then found by doubling and bisection, on the
    full judge: O(log n) candidate models instead of up to n. ``scored``: the evaluator's
    (drop, error) of the fully quantized model, when the caller has it already."""
    start = evaluator.evaluations
    initial, initial_error = scored or evaluator.drop(build(frozenset()))
    logger.info("qdq fallback: drop %.4f with every layer quantized", initial)
    if initial <= max_drop:
        return FallbackResult([], [], initial, initial, True, evaluator.evaluations - start)
    ranker = evaluator.ranking()
    ranked_from = ranker.evaluations
    if ranker is not evaluator:
        initial_rank, initial_error = ranker.drop(build(frozenset()))
    else:
        initial_rank = initial

    def gain(in_float: frozenset[str]) -> tuple[float, float]:
        drop, error = ranker.drop(build(in_float))
        return initial_rank - drop, initial_error - error

    ranking = rank_layers(list(candidates), gain)
    order = [item.name for item in ranking]
    tried: dict[int, float] = {0: initial}

    def drop_with(count: int) -> float:
        if count not in tried:
            tried[count] = evaluator.drop(build(frozenset(order[:count])))[0]
            logger.info(
                "qdq fallback: the %d most sensitive layers in float -> drop %.4f",
                count,
                tried[count],
            )
        return tried[count]

    low, high = 0, min(1, len(order))  # drop_with(low) is over budget
    while high < len(order) and drop_with(high) > max_drop:
        low, high = high, min(2 * high, len(order))
    if drop_with(high) <= max_drop:
        while high - low > 1:
            middle = (low + high) // 2
            if drop_with(middle) <= max_drop:
                high = middle
            else:
                low = middle
    steps = [
        FallbackStep(item.name, candidates[item.name], item.gain, tried.get(index + 1), item.group)
        for index, item in enumerate(ranking[:high])
    ]
    final = tried[high]
    evaluations = evaluator.evaluations - start
    if ranker is not evaluator:
        evaluations += ranker.evaluations - ranked_from
    return FallbackResult(order[:high], steps, initial, final, final <= max_drop, evaluations)


@dataclass(frozen=True)
class CalibrationChoice:
    method: str  # activation range method
    bias_correction: bool
    error: float  # 1 - fidelity on the scoring batches: mean relative L2 error of the outputs


def select_calibration(
    settings: list[tuple[str, bool]],
    build: Callable[[str, bool], onnx.ModelProto],
    evaluator: Evaluator,
) -> list[CalibrationChoice]:
    """Score each (method, bias correction) setting's quantized model against the float model;
    return every score, best (lowest error, then the earliest setting) first."""
    scored = []
    for method, corrected in settings:
        error, _ = evaluator.drop(build(method, corrected))
        scored.append(CalibrationChoice(method, corrected, error))
        logger.info(
            "qdq auto: method=%s bias-correction=%s -> rel-L2 %.5f", method, corrected, error
        )
    order = sorted(range(len(scored)), key=lambda i: (scored[i].error, i))
    return [scored[i] for i in order]


def scoring_arithmetic(targets: tuple[Target, ...], saturation: str) -> Arithmetic | None:
    """How calibration candidates are scored: on this CPU's kernels (None), except where this
    CPU sums int16 pairs with saturation and the output will not: when the remedies make its
    layers safe (saturation on) or no target saturates. Then exact int32 sums are emulated,
    so the choice is not made on a loss that the remedies remove afterwards."""
    if not host_target().saturates:
        return None
    if saturation != "off" or not any(t.saturates for t in targets):
        return EXACT
    return None
