"""Graph preparation for the ``qdq`` pass, before annotation (exact in float):

    HardSwish(x)  ->  Mul(x, HardSigmoid(x; alpha=1/6, beta=0.5))     (``split-hardswish=true``)
    opset < 13    ->  opset 13 by onnx.version_converter                (per-channel weights)

onnxruntime has no int8 HardSwish: it splits the op the same way on CPU, but after
quantization, so the Mul then runs in float between a DequantizeLinear and a QuantizeLinear.
Split first, the Mul of two activations is quantized like any other (QLinearMul on the int8
output of the Conv before it), and only the HardSigmoid stays float; the price is one more
rounding, of the gate. Also: nodes that an earlier pass dropped but left wired are
disconnected, and every node gets a unique name (annotations key on node names).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxpress.core.ir import unique_name


def detach_dead_nodes(graph: gs.Graph) -> None:
    """Disconnect nodes that an earlier pass removed from graph.nodes but left wired to live
    tensors, so that ``tensor.outputs`` lists live consumers only."""
    live = {id(n) for n in graph.nodes}
    for tensor in graph.tensors().values():
        for node in list(tensor.outputs):
            if id(node) not in live:
                node.inputs.clear()
                node.outputs.clear()


def name_nodes(graph: gs.Graph) -> None:
    """Give unnamed or duplicate-named nodes unique names (annotations key on them)."""
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            base = f"{node.op}_{index}"
            name = base
            while name in seen:
                name += "_"
            node.name = name
        seen.add(node.name)


def decompose_hardswish(graph: gs.Graph) -> int:
    """Rewrite every HardSwish as Mul(x, HardSigmoid(x)); returns how many."""
    count = 0
    taken = set(graph.tensors()) | {n.name for n in graph.nodes}
    for node in list(graph.nodes):
        if node.op != "HardSwish" or len(node.inputs) != 1:
            continue
        x = node.inputs[0]
        gate = gs.Variable(unique_name(graph, f"{x.name}_hardsigmoid", taken), dtype=x.dtype)
        sigmoid = gs.Node(
            "HardSigmoid",
            name=unique_name(graph, f"{node.name or 'hardswish'}/hardsigmoid", taken),
            attrs={"alpha": float(np.float32(1.0 / 6.0)), "beta": 0.5},
            inputs=[x],
            outputs=[gate],
        )
        graph.nodes.insert(graph.nodes.index(node), sigmoid)
        node.op = "Mul"
        node.attrs.clear()
        node.inputs.append(gate)
        count += 1
    return count
