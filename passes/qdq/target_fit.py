"""Recovery when the quantized model misses its task budget on a target: float fallback.

The verifier judges ``qdq`` by the task metric (``onnxpress.core.task_metric``) on
onnxruntime's kernels of this CPU and under each target's emulated int8 arithmetic. Before it
can refuse, the pass checks the same on its scoring batches; when the worst output is over
its budget on any of them, the most sensitive layers go back to float (``greedy_fallback``)
until every target is within budget; layers are ranked by the judge that scored the fully
quantized model worst (one judge per candidate, not all of them). Each candidate carries the saturation remedies planned
once for the fully quantized model, so fallback never trades a layer that a remedy fixes.
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
from onnxpress.core.targets import Arithmetic, Target, arithmetics
from onnxpress.core.verify import compare_task

logger = logging.getLogger(__name__)

Planned = list[tuple[IntegerLayer, Remedy, Change]]


def task_fit(inputs: MetricInputs) -> float:
    """Minus the worst output's task metric as a share of its budget (0 = the float model)."""
    cmp = compare_task(inputs.output_names, inputs.reference, inputs.outputs, None)
    return -(cmp.value / cmp.limit) if cmp.limit > 0 else -float(cmp.value > 0)


class TargetEvaluator(Evaluator):
    """Scores a candidate on this CPU's onnxruntime and on each target's emulated arithmetic;
    its drop is the worst of them (1.0 = exactly at the budget)."""

    def __init__(
        self, float_model: onnx.ModelProto, batches: list[Batch], targets: tuple[Target, ...]
    ) -> None:
        super().__init__(float_model, batches, task_fit)
        self.judges: list[Arithmetic | None] = [None, *arithmetics(targets)]  # None: this CPU
        self.worst: Arithmetic | None = None  # the judge of the last drop's worst score

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
        """Layers are ranked by the judge that scored the last candidate worst alone: the
        sensitivity that matters, at a fraction of the cost of every judge."""
        narrowed = copy.copy(self)
        narrowed.judges = [self.worst]
        return narrowed


def with_remedies(model: onnx.ModelProto, planned: Planned) -> onnx.ModelProto:
    """``model`` with the planned saturation remedies of the layers it still quantizes."""
    if not planned:
        return model
    graph = gs.import_onnx(model)
    present = {name for name in graph.tensors()}
    apply(graph, [p for p in planned if p[0].weight.output in present])
    exported = gs.export_onnx(graph)
    exported.opset_import.extend(o for o in model.opset_import if o.domain)
    return exported


def fit_targets(
    float_model: onnx.ModelProto,
    candidates: dict[str, str],
    build: Callable[[frozenset[str]], onnx.ModelProto],
    batches: list[Batch],
    targets: tuple[Target, ...],
    policy: Policy,
) -> FallbackResult | None:
    """Float fallback until every target is within the task budget; None when it already is."""
    saturating = policy.remedy != "off" and any(t.saturates for t in targets)
    planned = plan(build(frozenset()), batches, policy) if saturating else []
    evaluator = TargetEvaluator(float_model, batches, targets)

    def protected(excluded: frozenset[str]) -> onnx.ModelProto:
        return with_remedies(build(excluded), planned)

    drop, _ = evaluator.drop(protected(frozenset()))
    logger.info("qdq: worst task metric at %.2f of its budget over the targets", drop)
    if drop <= 1.0:
        return None
    return greedy_fallback(candidates, protected, evaluator, 1.0)
