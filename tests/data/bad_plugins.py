"""Plugins that misbehave: one raises inside run(), one returns an invalid graph, one is slow."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import onnx_graphsurgeon as gs

from onnxpress import NoOptions, Pass, PassContext, PassResult, register_pass


@register_pass("explode")
class Explode(Pass[NoOptions]):
    """Raises while rewriting."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise RuntimeError("boom in the user's pass")


@register_pass("break-graph")
class BreakGraph(Pass[NoOptions]):
    """Adds a Relu that reads a tensor nobody produces."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        ghost = gs.Variable("ghost", dtype=graph.outputs[0].dtype)
        out = gs.Variable("ghost_out", dtype=graph.outputs[0].dtype)
        graph.nodes.append(gs.Node("Relu", "orphan", inputs=[ghost], outputs=[out]))
        graph.outputs.append(out)
        result = PassResult()
        result.count("broken")
        return result


@register_pass("wrong-values")
class WrongValues(Pass[NoOptions]):
    """Claims to be lossless but negates the first initializer it finds."""

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.values.size > 1:
                tensor.values = -tensor.values
                break
        return PassResult({"negated": 1})


@dataclass(frozen=True)
class SleepOptions:
    marker: str = ""
    seconds: float = 60.0


@register_pass("sleep")
class Sleep(Pass[SleepOptions]):
    """Writes a marker file, then sleeps (for the Ctrl-C test)."""

    options_type = SleepOptions

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if self.options.marker:
            Path(self.options.marker).write_text(str(os.getpid()))
        time.sleep(self.options.seconds)
        return PassResult()
