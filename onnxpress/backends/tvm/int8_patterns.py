"""The pieces onnxpress.backends.tvm.int8 matches Relax with: what a ``relax.dequantize`` input looks
like (``Dequantized``), the rewrite's record (``Int8Lowering``), a refusal with its reason
(``Refused``), and two small readers of Relax expressions."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Int8Lowering:
    """What the rewrite did: counts of lowered ops and of refusals by reason."""

    kernel: str  # "vnni", "sdot" or "relax"
    lowered: Counter[str] = field(default_factory=Counter)
    kept_float: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "lowered": dict(self.lowered),
            "kept_float": dict(self.kept_float),
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


class Refused(Exception):
    """A quantized op that this rewrite leaves in float (the message is the reason)."""
