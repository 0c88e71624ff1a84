"""A small pre-norm transformer built node by node, for the residual-width tests.

x [N,5,6] -> embedding MatMul + bias + positional table -> 2 blocks of
(LayerNorm, single-head attention with q/k/v/out MatMuls, residual Add; LayerNorm, ReLU FFN
8->16->8, residual Add) -> LayerNorm -> ReduceMean over the tokens -> Gemm head -> y [N,3].
The residual stream is 8 wide. Single-head attention keeps the graph free of the Reshape /
Transpose head split, so only the width and the FFN neurons are in play.
"""

from __future__ import annotations

import numpy as np
import onnx
from channel_graphs import Net
from onnx import numpy_helper

from onnxpress import CalibrationData, PassContext, PassResult
from onnxpress.core.ir import to_graph, to_model
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.verify import check_structure

WIDTH = 8
TOKENS = 5
FEATURES = 6
HIDDEN = 16
LAYERS = 2
PRODUCERS = ("emb", "b0.out", "b0.fc2", "b1.out", "b1.fc2")
CONSUMERS = ("b0.q", "b0.k", "b0.v", "b0.fc1", "b1.q", "b1.k", "b1.v", "b1.fc1", "y")
NORMS = ("b0.ln1", "b0.ln2", "b1.ln1", "b1.ln2", "final_ln")


def layer_norm(net: Net, x: str, name: str, axis: int = -1, outputs: int = 1) -> str:
    gamma = net.const(f"{name}.gamma", 0.5 + net.rng.random(WIDTH), np.float32)
    beta = net.const(f"{name}.beta", 0.2 * net.rng.standard_normal(WIDTH), np.float32)
    return net.op("LayerNormalization", [x, gamma, beta], name, outputs=outputs, axis=axis)


def linear(net: Net, x: str, name: str, fan_in: int, fan_out: int) -> str:
    y = net.op("MatMul", [x, net.weight(f"{name}.w", (fan_in, fan_out), fan_in**-0.5)], name)
    return net.op("Add", [y, net.weight(f"{name}.b", (fan_out,), 0.1)], f"{name}.bias")


def block(net: Net, stream: str, name: str) -> str:
    h = layer_norm(net, stream, f"{name}.ln1")
    q, k, v = (linear(net, h, f"{name}.{p}", WIDTH, WIDTH) for p in "qkv")
    kt = net.op("Transpose", [k], f"{name}.kt", perm=[0, 2, 1])
    scores = net.op("MatMul", [q, kt], f"{name}.scores")
    scaled = net.op(
        "Mul", [scores, net.const(f"{name}.scale", WIDTH**-0.5, np.float32)], f"{name}.scaled"
    )
    weights = net.op("Softmax", [scaled], f"{name}.softmax", axis=-1)
    context = net.op("MatMul", [weights, v], f"{name}.context")
    stream = net.op(
        "Add", [stream, linear(net, context, f"{name}.out", WIDTH, WIDTH)], f"{name}.res1"
    )
    h = layer_norm(net, stream, f"{name}.ln2")
    h = net.op("Relu", [linear(net, h, f"{name}.fc1", WIDTH, HIDDEN)], f"{name}.relu")
    return net.op("Add", [stream, linear(net, h, f"{name}.fc2", HIDDEN, WIDTH)], f"{name}.res2")


def transformer_model(seed: int = 11, final_axis: int = -1) -> onnx.ModelProto:
    """The model above; ``final_axis`` 1 makes the last LayerNorm span tokens and channels."""
    net = Net(seed)
    stream = linear(net, "x", "emb", FEATURES, WIDTH)
    position = net.weight("pos", (TOKENS, WIDTH), 0.3)
    stream = net.op("Add", [stream, position], "emb.pos")
    for layer in range(LAYERS):
        stream = block(net, stream, f"b{layer}")
    if final_axis == -1:
        normed = layer_norm(net, stream, "final_ln")
    else:
        shape = (TOKENS, WIDTH)
        gamma = net.const("final_ln.gamma", 0.5 + net.rng.random(shape), np.float32)
        beta = net.const("final_ln.beta", np.zeros(shape), np.float32)
        normed = net.op("LayerNormalization", [stream, gamma, beta], "final_ln", axis=final_axis)
    pooled = net.op("ReduceMean", [normed], "pool", axes=[1], keepdims=0)
    head = [pooled, net.weight("head.w", (3, WIDTH)), net.weight("head.b", (3,))]
    net.op("Gemm", head, "y", transB=1)
    return net.model({"x": ["N", TOKENS, FEATURES]}, ["y"])


def inputs(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, TOKENS, FEATURES)).astype(np.float32)


def run_pass(
    model: onnx.ModelProto, spec: str, batches: list[dict[str, np.ndarray]] | None = None
) -> tuple[onnx.ModelProto, PassResult]:
    """One pass on ``model`` (calibrated on ``batches`` if given), structure-checked."""
    ctx = PassContext(
        template=model,
        original=model,
        calibration=CalibrationData.from_batches(batches) if batches else None,
    )
    graph = to_graph(model)
    result = parse_pipeline(spec)[0].run(graph, ctx)
    out = to_model(graph, model)
    check_structure(out)
    return out, result


def node_weights(model: onnx.ModelProto) -> dict[str, list[np.ndarray]]:
    """node name -> shapes of its initializer inputs, in input order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: [inits[i] for i in n.input if i in inits] for n in model.graph.node}
