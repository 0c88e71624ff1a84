"""The verdict on a lossy pass: this CPU's onnxruntime run and each target's emulated int8.

After a lossy pass the manager runs the model on onnxruntime as users run it (QDQ on this
CPU's integer kernels) and, when the model has integer layers, under an emulation of each
target's int8 arithmetic (``onnxpress.core.int8_emulation``). Every target is judged by its
emulation. This CPU's run judges too, except for an int8 model on a CPU whose arithmetic is
none of the targets': an AVX2 build machine's int16 pair sums would refuse, or push to float,
full 8-bit weights that are exact on the VNNI or ARM CPU the model is built for. That run is
then reported (``VerifyOutcome.host_not_judged``) and the outcome shows the worst target.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.errors import VerificationError
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.report import VerifyOutcome
from onnxpress.core.targets import Target, arithmetics, host_judges, host_target
from onnxpress.core.verify import Comparison, compare_metric, run_all

logger = logging.getLogger(__name__)


def judge_targets(
    model: onnx.ModelProto,
    feeds: list[dict[str, np.ndarray]],
    names: list[str],
    reference: list[list[np.ndarray]],
    metric: str,
    budget: float | None,
    targets: tuple[Target, ...],
) -> dict[str, Comparison]:
    """Per target, the comparison of the model's outputs under its emulated int8 kernels
    (none for a model without integer layers: every target computes it alike)."""
    if not integer_layers(model):
        return {}
    judged: dict[str, Comparison] = {}
    for arithmetic, names_of in arithmetics(targets).items():
        try:
            outputs = run_all(EmulatedRunner(model, arithmetic), feeds)
        except Exception as exc:  # the emulation is ours: a failure is our bug
            logger.warning("int8 emulation (%s) failed: %s", arithmetic, exc)
            continue
        cmp = compare_metric(names, reference, outputs, metric, budget)
        judged.update(dict.fromkeys(names_of, cmp))
    return judged


def _share(cmp: Comparison) -> float:
    """A comparison's value as a share of its limit (NaN and over-limit zeros: infinite)."""
    if cmp.limit > 0 and np.isfinite(cmp.value):
        return float(cmp.value / cmp.limit)
    return 0.0 if cmp.ok else float("inf")


def settle(
    name: str,
    outcome: VerifyOutcome,
    on_host: Comparison,
    judged: dict[str, Comparison],
    quantized: bool,
    targets: tuple[Target, ...],
    hint: str,
) -> None:
    """Record the targets' judgements in ``outcome``; raise VerificationError naming the pass
    and where the model failed (this CPU, or a target's emulated arithmetic)."""
    for target, cmp in judged.items():
        outcome.targets[target] = {
            "metric": cmp.metric,
            "value": cmp.value,
            "limit": cmp.limit,
            "output": cmp.output,
            "emulated": True,
        }
    host = host_target().name
    if quantized and judged and not host_judges(targets):
        outcome.host_not_judged = {
            "target": host,
            "metric": on_host.metric,
            "value": on_host.value,
            "limit": on_host.limit,
            "output": on_host.output,
        }
        worst = max(judged.values(), key=_share)
        logger.info(
            "pass %s: this CPU (%s) is not a target: its onnxruntime run (%s %.3g, limit %.3g) "
            "is reported, not judged",
            *(name, host, on_host.metric, on_host.value, on_host.limit),
        )
        outcome.metric, outcome.value = worst.metric, worst.value
        outcome.limit, outcome.output = worst.limit, worst.output
    elif not on_host.ok:
        where = f" on this CPU ({host})" if quantized else ""
        raise VerificationError(
            name,
            f"output '{on_host.output}'{where} differs from the original model: "
            f"{on_host.metric} {on_host.value:.3g} > {on_host.limit:.3g}{hint}",
        )
    for target, cmp in judged.items():
        if not cmp.ok:
            raise VerificationError(
                name,
                f"output '{cmp.output}' on {target} (its int8 arithmetic emulated) differs "
                f"from the original model: {cmp.metric} {cmp.value:.3g} > {cmp.limit:.3g}{hint}",
            )
