"""fix-saturation: make a QDQ model's int8 weights safe on targets that saturate int16 pairs.

    DQ(W_int8) -> Conv/MatMul/Gemm  ->  DQ(W'_int8) -> Conv/MatMul/Gemm   (W' reround, 7-bit or u8)

For models quantized by any tool (onnxruntime's ``quantize_static``, NNCF, onnxpress): on x86
without VNNI onnxruntime's u8 x s8 kernels add adjacent products into int16 with saturation,
and layers whose weight pairs can pass 32767 lose accuracy there only. Each such layer gets
a remedy chosen as ``qdq{saturation=auto}`` does (``passes/qdq/saturation.py``): the closer
of re-rounding and 7-bit weights where it stays within the tolerance of exact int32
arithmetic on calibration data, u8 weights (exact, slower kernels) elsewhere; without data,
the smaller weight change for activation bytes up to 255. No
recalibration: scales of untouched layers, activations and the graph stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx_graphsurgeon as gs
from onnxpress.passes.qdq.saturation import Policy, protect_from_saturation

from onnxpress.core.context import PassContext
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass


@dataclass(frozen=True)
class FixSaturationOptions:
    remedy: Literal["auto", "reround", "narrow", "u8"] = "auto"
    margin: float = 1.25  # headroom over the activation bytes seen in calibration data
    tolerance: float = 0.002  # auto: rel-L2 a fast remedy may add to a layer before u8
    batches: int = 8  # calibration batches measured

    def __post_init__(self) -> None:
        if not 1.0 <= self.margin <= 255.0:
            raise ValueError(f"margin must be in [1, 255], not {self.margin}")
        if self.batches < 1:
            raise ValueError(f"batches must be >= 1, not {self.batches}")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, not {self.tolerance}")


@register_pass("fix-saturation")
class FixSaturation(Pass[FixSaturationOptions]):
    """Int8 weights of a QDQ model made safe from int16 pair saturation on the targets."""

    options_type = FixSaturationOptions
    lossless = False
    metric = "task"
    default_budget = None

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        model = ctx.export(graph)
        if not integer_layers(model):
            result.refuse("<model>", "no int8 Conv/MatMul/Gemm layers (not a QDQ model)")
            return result
        batches = (
            list(ctx.calibration.batches(self.options.batches))
            if ctx.calibration is not None
            else None
        )
        opts = self.options
        policy = Policy(opts.remedy, opts.margin, opts.tolerance)
        protect_from_saturation(graph, ctx, result, policy, batches)
        if not result.counts.get("layers_saturation_safe"):
            targets = ", ".join(t.name for t in ctx.targets)
            result.refuse("<model>", f"no int8 layer can saturate on {targets}")
        return result
