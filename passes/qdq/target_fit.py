"""Recovery when the quantized model misses its task budget on a target: float fallback.

The verifier judges ``qdq`` by the task metric (``onnxpress.core.task_metric``) on
onnxruntime's kernels of this CPU (where they sum as a target's do) and under each target's
emulated int8 arithmetic. Before it can refuse, the pass checks the same on its scoring
batches; when the worst output is over its budget on any of them, the most sensitive layers
go back to float (``greedy_fallback``) until every target is within budget; layers are
ranked by the judge that scored the fully quantized model worst (one judge per candidate,
not all of them). Each candidate carries the
saturation remedies planned once for the fully quantized model, so fallback never trades a
layer that a remedy fixes. A candidate is scored on all the scoring batches and on the first
``MAX_CALIBRATION_BATCHES`` alone, the ones the verifier judges, worse of the two: a model
within budget over eight batches can be over it on the verifier's four.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxpress.passes.qdq.recover import Evaluator, FallbackResult, MetricInputs, greedy_fallback
from onnxpress.passes.qdq.saturation import Change, Policy, Remedy, apply, plan

from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.int8_emulation import Batch
from onnxpress.core.int8_layers import IntegerLayer
from onnxpress.core.targets import Arithmetic, Target, arithmetics, host_judges
from onnxpress.core.verify import MAX_CALIBRATION_BATCHES, compare_task

logger = logging.getLogger(__name__)

Planned = list[tuple[IntegerLayer, Remedy, Change]]
HOST_RANKING_SHARE = 0.9  # rank on this CPU when its drop is this share of the worst judge's


def task_fit(inputs: MetricInputs) -> float:
    """Minus the worst output's task metric as a share of its budget (0 = the float model),
    over all batches and over the verifier's first ``MAX_CALIBRATION_BATCHES``, the worse."""
    spans = [len(inputs.outputs)]
    if len(inputs.outputs) > MAX_CALIBRATION_BATCHES:
        spans.append(MAX_CALIBRATION_BATCHES)
    worst = 0.0
    for span in spans:
        cmp = compare_task(
            inputs.output_names, inputs.reference[:span], inputs.outputs[:span], None
        )
        worst = max(worst, cmp.value / cmp.limit if cmp.limit > 0 else float(cmp.value > 0))
    return -worst


class TargetEvaluator(Evaluator):
    """Scores a candidate on this CPU's onnxruntime and on each target's emulated arithmetic;
    its drop is the worst of them (1.0 = exactly at the budget)."""

    def __init__(
        self, float_model: onnx.ModelProto, batches: list[Batch], targets: tuple[Target, ...]
    ) -> None:
        super().__init__(float_model, batches, task_fit)
        # None: this CPU's onnxruntime, a judge where it sums as one of the targets does
        host: list[Arithmetic | None] = [None] if host_judges(targets) else []
        self.judges: list[Arithmetic | None] = [*host, *arithmetics(targets)]
        self.worst: Arithmetic | None = None  # the judge of the last drop's worst score
        self.drops: dict[Arithmetic | None, float] = {}  # the last drop, per judge

    def drop(self, model: onnx.ModelProto) -> tuple[float, float]:
        self.evaluations += 1
        worst, error = -np.inf, 0.0
        for judge in self.judges:
            if judge is None:
                outputs = self.run(model, emulate=False)
            else:
                runner = EmulatedRunner(model, judge)
                outputs = [runner(batch) for batch in self.batches]
            score = task_fit(
                MetricInputs(model, self.batches, outputs, self.reference, self.output_names)
            )
            self.drops[judge] = self.baseline - score
            if self.baseline - score > worst:
                worst, self.worst = self.baseline - score, judge
                error = max(
                    (
                        float(
                            np.linalg.norm(n.astype(np.float64) - r) / max(np.linalg.norm(r), 1e-12)
                        )
                        for ref, new in zip(self.reference, outputs, strict=True)
                        for r, n in zip(ref, new, strict=True)
                        if np.issubdtype(r.dtype, np.floating)
                    ),
                    default=0.0,
                )
        return float(worst), error

    def ranking(self) -> Evaluator:
        """Layers are ranked by one judge: the sensitivity that matters, at a fraction of the
        cost of every judge. That is the judge that scored the last candidate worst, or this
        CPU's onnxruntime (real integer kernels, ~10x faster than an emulation) when its drop
        is within ``HOST_RANKING_SHARE`` of the worst: the error is then the quantization's
        own, common to every arithmetic, not a target's saturation."""
        narrowed = copy.copy(self)
        host = self.drops.get(None, -np.inf)
        worst = self.drops.get(self.worst, -np.inf)
        use_host = None in self.judges and (
            self.worst is None or (worst > 0 and host >= HOST_RANKING_SHARE * worst)
        )
        narrowed.judges = [None if use_host else self.worst]
        narrowed.drops = {}
        return narrowed


def with_remedies(graph: gs.Graph, planned: Planned) -> gs.Graph:
    """``graph`` (a candidate) with the planned saturation remedies of the layers it still
    quantizes, applied in place: one export per candidate, not an import and export more."""
    if planned:
        apply(graph, planned)
    return graph


def fit_targets(
    float_model: onnx.ModelProto,
    candidates: dict[str, str],
    build: Callable[[frozenset[str]], gs.Graph],
    export: Callable[[gs.Graph], onnx.ModelProto],
    batches: list[Batch],
    targets: tuple[Target, ...],
    policy: Policy,
) -> FallbackResult | None:
    """Float fallback until every target is within the task budget; None when it already is.
    ``build(excluded)``: a new candidate graph with those layers in float."""
    saturating = policy.remedy != "off" and any(t.saturates for t in targets)
    planned = plan(export(build(frozenset())), batches, policy) if saturating else []
    evaluator = TargetEvaluator(float_model, batches, targets)

    def protected(excluded: frozenset[str]) -> onnx.ModelProto:
        return export(with_remedies(build(excluded), planned))

    scored = evaluator.drop(protected(frozenset()))
    logger.info("qdq: worst task metric at %.2f of its budget over the targets", scored[0])
    if scored[0] <= 1.0:
        return None
    return greedy_fallback(candidates, protected, evaluator, 1.0, scored)
