"""The pieces onnxpress.backends.tvm.int8 matches Relax with: what a ``relax.dequantize`` input looks
like (``Dequantized``), the rewrite's record (``Int8Lowering``), a refusal with its reason
(``Refused``), a convolution's window (``Window``), and two small readers of Relax expressions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np


@dataclass
class Int8Lowering:
    """What the rewrite did: counts of lowered ops and of refusals by reason."""

    kernel: str  # "vnni", "sdot", "avx2" (avx2-u8s8 or avx2-s16 per layer) or "relax"
    lowered: Counter[str] = field(default_factory=Counter)
    kept_float: Counter[str] = field(default_factory=Counter)
    # per lowered conv2d/matmul, in graph order: op, weight shape, the kernel that runs it and
    # the weight pairs that would saturate a pair-saturating kernel (why the exact one runs)
    layers: list[dict[str, Any]] = field(default_factory=list)

    def record(self, op: str, weight: tuple[int, ...], kernel: str, risky: int = 0) -> None:
        """One lowered layer: its op, weight shape, kernel and pairs at risk on that kernel."""
        layer = {"op": op, "weight": [int(d) for d in weight], "kernel": kernel}
        self.layers.append({**layer, "pairs_at_risk": risky})

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "lowered": dict(self.lowered),
            "kept_float": dict(self.kept_float),
            "layers": self.layers,
        }


@dataclass
class Dequantized:
    data: Any  # the integer relax expression
    dtype: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    constant: np.ndarray | None  # the integer values when data is a constant (permuted)

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1 and self.zero_point.size == 1


def op_name(expr: Any) -> str:
    from tvm import relax

    if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
        return str(expr.op.name)
    return ""


def constant_value(expr: Any) -> np.ndarray | None:
    from tvm import ir

    return expr.value.numpy() if isinstance(expr, ir.expr.Constant) else None


class Window(NamedTuple):
    """A convolution's sliding window: padding (top, left, bottom, right), strides, dilation."""

    padding: tuple[int, ...]
    strides: tuple[int, int]
    dilation: tuple[int, int]


class Refused(Exception):
    """A quantized op that this rewrite leaves in float (the message is the reason)."""


def signed_weight(dq: Dequantized) -> Dequantized:
    """u8 weights with zero point 128 (qdq's saturation remedy for onnxruntime) as the int8
    values they hold; any other weight unchanged."""
    if dq.dtype != "uint8" or dq.constant is None or not np.all(dq.zero_point == 128):
        return dq
    return replace(
        dq,
        dtype="int8",
        constant=(dq.constant.astype(np.int16) - 128).astype(np.int8),
        zero_point=np.zeros_like(dq.zero_point, dtype=np.int8),
    )
