"""A user pass written the way the README shows: Mul(x, alpha) inserted before every output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress import Pass, PassContext, PassResult, register_pass


@dataclass(frozen=True)
class ScaleOutputsOptions:
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.alpha == 0:
            raise ValueError("alpha must be non-zero")


@register_pass("scale-outputs")
class ScaleOutputs(Pass[ScaleOutputsOptions]):
    """Multiply every graph output by alpha (a lossy test pass)."""

    options_type = ScaleOutputsOptions
    lossless = False
    metric = "max-rel"
    default_budget = 10.0

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        for i, out in enumerate(list(graph.outputs)):
            inner = gs.Variable(f"{out.name}_unscaled", dtype=out.dtype, shape=out.shape)
            producer = out.inputs[0]
            producer.outputs[producer.outputs.index(out)] = inner
            alpha = gs.Constant(f"{out.name}_alpha", np.array(self.options.alpha, dtype=np.float32))
            graph.nodes.append(gs.Node("Mul", f"scale_{i}", inputs=[inner, alpha], outputs=[out]))
            result.count("scaled")
        return result
