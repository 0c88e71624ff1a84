"""ir.toposort orders nodes exactly as graphsurgeon's toposort does, in linear time; to_model keeps
the type of a sequence of maps (scikit-learn's ZipMap output), and such a classifier quantizes."""

from __future__ import annotations

import random
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import make_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxpress.core.ir import to_graph, toposort


def _diamonds(blocks: int) -> onnx.ModelProto:
    """x -> [Relu, Sigmoid(Mul(., c))] -> Add -> ..., with a constant chain and a dead Neg."""
    nodes, inits, h = [], [], "x"
    for k in range(blocks):
        inits.append(numpy_helper.from_array(np.full(4, k, np.float32), f"c{k}"))
        nodes += [
            helper.make_node("Relu", [h], [f"r{k}"], name=f"relu{k}"),
            helper.make_node("Mul", [h, f"c{k}"], [f"m{k}"], name=f"mul{k}"),
            helper.make_node("Sigmoid", [f"m{k}"], [f"s{k}"], name=f"sigmoid{k}"),
            helper.make_node("Add", [f"c{k}", f"c{k}"], [f"cc{k}"], name=f"const_add{k}"),
            helper.make_node("Add", [f"r{k}", f"s{k}"], [f"a{k}"], name=f"add{k}"),
            helper.make_node("Add", [f"a{k}", f"cc{k}"], [f"h{k}"], name=f"bias{k}"),
            helper.make_node("Neg", [f"h{k}"], [f"dead{k}"], name=f"neg{k}"),
        ]
        h = f"h{k}"
    graph = helper.make_graph(
        nodes,
        "diamonds",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("model", [make_mlp(), _diamonds(30)], ids=["mlp", "diamonds"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_same_order_as_graphsurgeon(model: onnx.ModelProto, seed: int) -> None:
    ours, theirs = to_graph(model), to_graph(model)
    if seed:  # shuffled: the order then depends on the depth-first search, not the input
        order = list(range(len(ours.nodes)))
        random.Random(seed).shuffle(order)
        ours.nodes = [ours.nodes[i] for i in order]
        theirs.nodes = [theirs.nodes[i] for i in order]
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(max(limit, 10_000))  # graphsurgeon's search is recursive
        theirs.toposort()
    finally:
        sys.setrecursionlimit(limit)
    toposort(ours)
    assert [n.name for n in ours.nodes] == [n.name for n in theirs.nodes]


def test_deep_unsorted_chain_does_not_recurse() -> None:
    graph = to_graph(_diamonds(1500))  # 10500 nodes, deeper than Python's recursion limit
    graph.nodes.reverse()
    toposort(graph)
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        for tensor in node.inputs:
            assert all(position[id(p)] < position[id(node)] for p in tensor.inputs)


def test_cycle_is_an_error() -> None:
    a, b = gs.Variable("a", np.float32), gs.Variable("b", np.float32)
    graph = gs.Graph(
        nodes=[
            gs.Node("Relu", "first", inputs=[b], outputs=[a]),
            gs.Node("Relu", "second", inputs=[a], outputs=[b]),
        ],
        outputs=[b],
    )
    with pytest.raises(ValueError, match="cycle"):
        toposort(graph)


def test_detach_removed_nodes_drops_phantom_consumers() -> None:
    import onnx_graphsurgeon as gs

    from onnxpress.core.ir import detach_removed_nodes

    x = gs.Variable("x", dtype=np.float32, shape=[2])
    a = gs.Variable("a", dtype=np.float32, shape=[2])
    y = gs.Variable("y", dtype=np.float32, shape=[2])
    relu = gs.Node("Relu", "relu", inputs=[x], outputs=[a])
    dead = gs.Node("Sigmoid", "dead", inputs=[a], outputs=[gs.Variable("d", dtype=np.float32)])
    neg = gs.Node("Neg", "neg", inputs=[a], outputs=[y])
    graph = gs.Graph(nodes=[relu, dead, neg], inputs=[x], outputs=[y])
    graph.nodes = [relu, neg]  # removed the way passes do: rebuilding the list
    assert [n.name for n in a.outputs] == ["dead", "neg"]
    assert detach_removed_nodes(graph) == 1
    assert [n.name for n in a.outputs] == ["neg"]
    assert detach_removed_nodes(graph) == 0


def test_remove_dead_nodes_is_linear_with_a_widely_shared_weight() -> None:
    """20k dead readers of one weight: graphsurgeon's cleanup is quadratic here."""
    import time

    import onnx_graphsurgeon as gs

    from onnxpress.core.ir import remove_dead_nodes

    x = gs.Variable("x", dtype=np.float32, shape=[2])
    w = gs.Constant("w", np.ones(2, np.float32))
    y = gs.Variable("y", dtype=np.float32, shape=[2])
    live = gs.Node("Add", "live", inputs=[x, w], outputs=[y])
    dead = [
        gs.Node("Mul", f"dead{i}", inputs=[x, w], outputs=[gs.Variable(f"d{i}", dtype=np.float32)])
        for i in range(20_000)
    ]
    graph = gs.Graph(nodes=[live, *dead], inputs=[x], outputs=[y])
    start = time.perf_counter()
    assert remove_dead_nodes(graph) == 20_000
    assert time.perf_counter() - start < 5
    assert [n.name for n in graph.nodes] == ["live"]
    assert [n.name for n in w.outputs] == ["live"] and [n.name for n in x.outputs] == ["live"]


def zipmap_classifier() -> onnx.ModelProto:
    """A scikit-learn-style classifier: MatMul -> Softmax -> ai.onnx.ml ZipMap, whose output
    is a sequence of {class: probability} maps, and an ArgMax label beside it."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(8, 3)).astype(np.float32), "w")
    seq_of_maps = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(1, None))
    )
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["scores"], name="matmul"),
            helper.make_node("Softmax", ["scores"], ["p"], axis=1, name="softmax"),
            helper.make_node("ArgMax", ["p"], ["label"], axis=1, keepdims=0, name="argmax"),
            helper.make_node(
                "ZipMap",
                ["p"],
                ["probabilities"],
                domain="ai.onnx.ml",
                classlabels_int64s=[4, 1, 7],
            ),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
            helper.make_value_info("probabilities", seq_of_maps),
        ],
        [weights],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)],
    )


def test_a_sequence_of_maps_keeps_its_type() -> None:
    # graphsurgeon exports it as a sequence of UNDEFINED tensors, which shape inference
    # rejected after every pass ("type case mismatch ... inferred=map_type")
    from onnxpress.core.ir import to_model

    model = zipmap_classifier()
    result = to_model(to_graph(model), model)
    assert result.graph.output[1].type == model.graph.output[1].type
    onnx.checker.check_model(result, full_check=True)


def test_optimize_quantizes_a_classifier_with_a_zipmap_output() -> None:
    import onnxpress

    model = zipmap_classifier()
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(size=(16, 8)).astype(np.float32)} for _ in range(4)]
    result, report = onnxpress.optimize(model, calibration=batches)  # verified, task metric
    (qdq,) = [p for p in report.passes if p.name == "qdq"]
    assert qdq.result.counts["nodes_quantized"] == 1
    assert result.graph.output[1].type == model.graph.output[1].type
