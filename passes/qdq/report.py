"""What the ``qdq`` pass reports: counts, refusals, the calibration it chose, the float
fallback (by ``max-drop`` or by the task budget on the targets) and every quantized node."""

from __future__ import annotations

from typing import TYPE_CHECKING

from onnxpress.passes.qdq.annotate import Annotation
from onnxpress.passes.qdq.calibrate import Observations
from onnxpress.passes.qdq.convert import ConvertSummary
from onnxpress.passes.qdq.recover import FallbackResult

from onnxpress.core.pass_base import PassResult

if TYPE_CHECKING:
    from onnxpress.passes.qdq import QdqOptions


def report(
    result: PassResult,
    ann: Annotation,
    summary: ConvertSummary,
    corrected: int,
    obs: Observations,
    fallback: FallbackResult | None,
    opts: QdqOptions,
    judged_by: tuple[str, float | None],
    chosen: tuple[str, bool],
) -> None:
    metric, budget = judged_by
    result.count("nodes_quantized", len(ann.quantized_nodes))
    result.count("activation_qdq_pairs", summary.activations)
    result.count("weights_int8", summary.weights)
    result.count("weights_int8_weight_only", summary.weight_only)
    result.count("biases_int32", summary.biases)
    result.count("biases_corrected", corrected)
    result.count("fallback_layers", len(fallback.excluded) if fallback else 0)
    for node, reason in ann.refusals:
        if reason.endswith("accuracy fallback"):
            continue
        result.refuse(node, reason)
    result.details.append(
        {
            "calibration": {
                "method": chosen[0],
                "bias_correction": chosen[1],
                "requested": opts.method,
                "batches": obs.batches,
                "tensors": len(obs.ranges),
                "observer_bytes": obs.nbytes,
            }
        }
    )
    if fallback is not None:
        result.details.append(
            {
                "fallback": {
                    "metric": metric,
                    "max_drop": budget,
                    "initial_drop": fallback.initial_drop,
                    "final_drop": fallback.final_drop,
                    "within_budget": fallback.within_budget,
                    "evaluations": fallback.evaluations,
                }
            }
        )
        kept = len(fallback.steps)
        for rank, step in enumerate(fallback.steps, 1):
            measured = (
                f"drop {step.drop_after:.4f} with it and the layers before it in float"
                if step.drop_after is not None
                else f"drop {fallback.final_drop:.4f} with the {kept} most sensitive in float"
            )
            alone = "alone" if step.group == 1 else f"with its group of {step.group} layers"
            reason = (
                f"accuracy fallback: rank {rank}, {alone} in float it recovers {step.gain:.4f} "
                f"of {metric}; {measured} (budget {budget})"
            )
            result.refuse(step.node, reason)
            result.details.append(
                {
                    "node": step.node,
                    "op": step.op,
                    "fallback": True,
                    "sensitivity": step.gain,
                    "sensitivity_group": step.group,
                    "drop_after": step.drop_after,
                }
            )
    for name, op in ann.quantized_nodes.items():
        result.details.append({"node": name, "op": op, "quantized": True})
