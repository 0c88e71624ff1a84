"""Which nodes the ``svd`` pass can factor: ``classify`` turns a node into its linear forms
(see ``layers``), or into the reason why a weight of it cannot be factored: a computed
or non-float weight, a weight of rank other than 2, a computed bias, a constant Gemm A, a
spatial scheme on a non-2-D kernel or with auto_pad SAME_*, a bidirectional GRU, and the
GRU's recurrent weight R, which lives inside the fused op's recurrence.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnxpress.passes.svd.layers import (
    ConvChannel,
    ConvSpatial,
    GemmForm,
    GruInput,
    LinearForm,
    MatMulLeft,
    MatMulRight,
)

Classified = list["LinearForm | tuple[str, str]"]  # forms, or (node name, refusal reason)


def _weight_reason(tensor: gs.Tensor, role: str) -> str | None:
    """Why ``tensor`` cannot be a factored weight, or None for a float constant."""
    if not isinstance(tensor, gs.Constant):
        return f"{role} is computed, not a constant"
    values = np.asarray(tensor.values)
    if not np.issubdtype(values.dtype, np.floating):
        return f"{role} '{tensor.name}' has dtype {values.dtype}; only float weights are factored"
    return None


def _bias_reason(node: gs.Node) -> str | None:
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is None or isinstance(bias, gs.Constant):
        return None
    return "bias is computed, not a constant"


def _matmul(node: gs.Node) -> LinearForm | str:
    a, b = node.inputs
    if isinstance(a, gs.Constant) and isinstance(b, gs.Constant):
        return "both operands are constants (fold them first)"
    if not isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
        return "no constant weight: both operands are computed"
    right = isinstance(b, gs.Constant)
    weight, source = (b, a) if right else (a, b)
    reason = _weight_reason(weight, "weight")
    rank = np.asarray(weight.values).ndim
    if reason is None and rank != 2:
        reason = f"weight '{weight.name}' has rank {rank}; only 2-D weights are factored"
    if reason:
        return reason
    return MatMulRight(node, weight, source) if right else MatMulLeft(node, weight, source)


def _gemm(node: gs.Node) -> LinearForm | str:
    a, b = node.inputs[:2]
    reason = _weight_reason(b, "B") or _bias_reason(node)
    if reason is None and isinstance(a, gs.Constant):
        reason = "A is a constant (only a constant B is factored)"
    return reason or GemmForm(node, b, a)


def _conv(node: gs.Node, scheme: str) -> LinearForm | str:
    x, w = node.inputs[:2]
    reason = _weight_reason(w, "weight") or _bias_reason(node)
    if reason:
        return reason
    if scheme == "channel":
        return ConvChannel(node, w, x)
    kernel_dims = np.asarray(w.values).ndim - 2
    if kernel_dims != 2:
        return f"spatial scheme needs a 2-D kernel; this conv's kernel is {kernel_dims}-D"
    if str(node.attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        return "spatial scheme with auto_pad SAME_*: cannot split the padding per axis"
    return ConvSpatial(node, w, x)


def _gru(node: gs.Node) -> list[LinearForm | str]:
    x, w = node.inputs[:2]
    out: list[LinearForm | str] = []
    if str(node.attrs.get("direction", "forward")) == "bidirectional":
        out.append("bidirectional GRU: W holds two directions; not factored")
    else:
        out.append(_weight_reason(w, "W") or GruInput(node, w, x))
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        out.append(
            f"R '{node.inputs[2].name}' is applied inside the recurrence of the fused GRU op; "
            "factor the unrolled form (MatMul per step) instead"
        )
    return out


def classify(node: gs.Node, scheme: str) -> Classified:
    """The factorable forms of ``node``, or (node, reason) for each weight it cannot factor."""
    found: list[LinearForm | str] = []
    if node.op == "MatMul" and len(node.inputs) == 2:
        found = [_matmul(node)]
    elif node.op == "Gemm":
        found = [_gemm(node)]
    elif node.op == "Conv":
        found = [_conv(node, scheme)]
    elif node.op == "GRU":
        found = _gru(node)
    return [(str(node.name), item) if isinstance(item, str) else item for item in found]
