"""``EmulatedRunner``: a QDQ model run with its integer layers computed as a target computes.

The integer layers (``int8_layers``) are cut out of the graph: each one's output becomes an
input of the remaining graph and each one's 8-bit operand becomes an output. onnxruntime
(optimizations off) runs the rest; ``int8_emulation.layer_output`` computes the layers from
the operands it returns, one level at a time: a layer's level is one more than the deepest
integer layer upstream of it, so after the layers of level L go back in, the operands of
level L + 1 are final. Each layer is computed once; onnxruntime runs depth + 1 times.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxpress.core.int8_emulation import Batch, layer_output
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.targets import Arithmetic
from onnxpress.core.verify import session_threads

logger = logging.getLogger(__name__)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = session_threads()
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


class EmulatedRunner:
    """Runs ``model`` with its integer layers computed in ``arithmetic``."""

    def __init__(self, model: onnx.ModelProto, arithmetic: Arithmetic) -> None:
        self.arithmetic = arithmetic
        self.layers = integer_layers(model)
        self.output_names = [o.name for o in model.graph.output]
        graph_inputs = {i.name for i in model.graph.input}
        self._operands = sorted(
            {
                name
                for layer in self.layers
                for name in (layer.activation.tensor, layer.weight.tensor)
                if (layer is not None and name not in graph_inputs)
                and not (name == layer.weight.tensor and layer.weight.value is not None)
            }
        )
        self._cut = {layer.node.output[0] for layer in self.layers}
        self.levels = _levels(model, self._cut)
        self._first = _session(self._with_outputs(model, [*self._operands, *sorted(self._cut)]))
        self._rest = _session(self._cut_model(model)) if self.layers else None

    def _with_outputs(self, model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
        extended = onnx.ModelProto()
        extended.CopyFrom(model)
        have = {o.name for o in extended.graph.output}
        for name in names:
            if name not in have:
                extended.graph.output.append(helper.ValueInfoProto(name=name))
        return extended

    def _cut_model(self, model: onnx.ModelProto) -> onnx.ModelProto:
        cut = onnx.ModelProto()
        cut.CopyFrom(model)
        graph = cut.graph
        kept = [onnx.NodeProto() for n in graph.node if not (n.output and n.output[0] in self._cut)]
        for copy, node in zip(
            kept,
            (n for n in graph.node if not (n.output and n.output[0] in self._cut)),
            strict=True,
        ):
            copy.CopyFrom(node)
        del graph.node[:]
        graph.node.extend(kept)
        for name in sorted(self._cut):
            graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        outputs = [o for o in graph.output if o.name not in self._cut]
        del graph.output[:]
        graph.output.extend(outputs)
        for name in self._operands:
            graph.output.append(helper.ValueInfoProto(name=name))
        if not graph.output:
            graph.output.append(helper.ValueInfoProto(name=next(iter(self._cut))))
        return cut

    def __call__(self, feed: Batch) -> list[np.ndarray]:
        first_names = [o.name for o in self._first.get_outputs()]
        values = {**feed, **dict(zip(first_names, self._first.run(None, feed), strict=True))}
        if self._rest is None:
            return [np.asarray(values[name]) for name in self.output_names]
        rest_names = [o.name for o in self._rest.get_outputs()]
        injected: dict[str, np.ndarray] = {}
        for level in sorted({self.levels[layer.node.output[0]] for layer in self.layers}):
            for layer in self.layers:
                if self.levels[layer.node.output[0]] == level:
                    injected[layer.node.output[0]] = layer_output(
                        layer,
                        values[layer.activation.tensor],
                        None if layer.weight.value is not None else values[layer.weight.tensor],
                        self.arithmetic,
                    )
            if len(injected) < len(self.layers):  # the first run's outputs stand in until then
                missing = {n: values[n] for n in self._cut if n not in injected}
            else:
                missing = {}
            run = self._rest.run(None, {**feed, **missing, **injected})
            values.update(dict(zip(rest_names, run, strict=True)))
        values.update(injected)
        return [np.asarray(values[name]) for name in self.output_names]


def _levels(model: onnx.ModelProto, cut: set[str]) -> dict[str, int]:
    """Integer-layer output -> 1 + the deepest integer layer upstream of it."""
    depth: dict[str, int] = {}
    for node in model.graph.node:
        level = max((depth.get(name, 0) for name in node.input), default=0)
        if node.output and node.output[0] in cut:
            level += 1
        for name in node.output:
            depth[name] = level
    return {name: depth[name] for name in cut}
