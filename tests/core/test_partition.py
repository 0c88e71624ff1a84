"""Chunked onnxruntime execution gives exactly the outputs of one session."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_mlp
from onnx import TensorProto, helper, numpy_helper

import onnxpress
import onnxpress.core.verify as verify
from onnxpress.core.partition import NotPartitionable, PartitionedRunner
from onnxpress.core.verify import Runner


def _residual_chain(blocks: int) -> onnx.ModelProto:
    """x -> blocks of MatMul/Add/Relu with a long skip from x, plus a second output mid-way."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(blocks):
        inits.append(
            numpy_helper.from_array(rng.standard_normal((6, 6)).astype(np.float32) * 0.4, f"w{i}")
        )
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", "x"], [f"a{i}"]),  # x is read by every block
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
        ]
        prev = f"r{i}"
    inits.append(numpy_helper.from_array(np.arange(3, dtype=np.float32), "const_out"))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
        [
            helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["n", 6]),
            helper.make_tensor_value_info("r3", TensorProto.FLOAT, ["n", 6]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6]),
            helper.make_tensor_value_info("const_out", TensorProto.FLOAT, [3]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("chunk", [1, 2, 7, 1000])
def test_chunks_match_one_session(chunk: int) -> None:
    model = _residual_chain(20)
    feed = {"x": np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)}
    whole = Runner(model)
    parts = PartitionedRunner(model, Runner, chunk_nodes=chunk)
    assert parts.output_names == whole.output_names
    for a, b in zip(whole(feed), parts(feed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(parts._chunks) == -(-60 // chunk)


def test_subgraphs_are_not_partitioned() -> None:
    model = make_mlp()
    branch = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["z"])],
        "b",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
    )
    model.graph.node.append(
        helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)
    )
    with pytest.raises(NotPartitionable, match="subgraph"):
        PartitionedRunner(model, Runner, chunk_nodes=2)


def test_manager_verifies_large_graphs_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[PartitionedRunner] = []
    original = verify.PartitionedRunner

    def spy(*args: object, **kwargs: object) -> PartitionedRunner:
        runner = original(*args, **kwargs)  # type: ignore[arg-type]
        made.append(runner)
        return runner

    monkeypatch.setattr(verify, "CHUNK_NODES", 10)
    monkeypatch.setattr(verify, "PartitionedRunner", spy)
    _, report = onnxpress.optimize(_residual_chain(20), passes="cleanup")
    assert made, "the verifier did not partition a 60-node graph with 10-node chunks"
    assert report.passes[0].verification.value == 0.0
