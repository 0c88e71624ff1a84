"""Serialized size and digest without encoding the weights (onnxpress.core.sizing)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxpress.core import sizing
from onnxpress.core.sizing import model_digest, serialized_size, tensor_size


def _varied_model() -> onnx.ModelProto:
    """Raw tensors across varint length boundaries, a float_data tensor, an external
    reference, a subgraph with its own initializer, metadata and doc strings."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal(count).astype(np.float32), f"w{count}")
        for count in (1, 31, 32, 4095, 4096, 70_000)
    ]
    listed = helper.make_tensor("listed", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    external = helper.make_tensor("far", TensorProto.FLOAT, [4], [0.0] * 4)
    external.ClearField("float_data")
    external.data_location = TensorProto.EXTERNAL
    external.external_data.add(key="location", value="weights.bin")
    branch = helper.make_graph(
        [helper.make_node("Add", ["x", "inner"], ["y_then"])],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1])],
        [numpy_helper.from_array(np.ones(1000, np.float32)[:1], "inner")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1])],
    )
    nodes = [
        helper.make_node("Greater", ["x", "w1"], ["cond_v"]),
        helper.make_node("ReduceMin", ["cond_v"], ["cond"], keepdims=0),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "varied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [*inits, listed, external],
        doc_string="a graph",
    )
    model = helper.make_model(graph, producer_name="test", doc_string="a model")
    helper.set_model_props(model, {"author": "onnxpress"})
    return model


def test_serialized_size_is_byte_size() -> None:
    for model in (make_mlp(), _varied_model(), onnx.ModelProto(ir_version=8)):
        assert serialized_size(model) == model.ByteSize()
    for tensor in _varied_model().graph.initializer:
        assert tensor_size(tensor) == tensor.ByteSize()


def test_serialized_size_is_exact_with_a_large_weight() -> None:
    """A 200 MB weight: the length varint takes 4 bytes, the graph's and model's too."""
    model = make_mlp()
    big = numpy_helper.from_array(np.zeros(50_000_000, np.float32), "big")
    model.graph.initializer.append(big)
    expected = model.ByteSize()
    assert serialized_size(model) == expected


def test_model_digest_sees_weights_and_structure_without_serializing_them_whole() -> None:
    model = make_mlp()
    same = onnx.ModelProto()
    same.CopyFrom(model)
    assert model_digest(model) == model_digest(same)
    weight = same.graph.initializer[0]
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0  # one value of one weight
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    assert model_digest(model) != model_digest(same)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[0].name = "other"
    assert model_digest(model) != model_digest(renamed)


def test_too_large_to_serialize_counts_tensor_bytes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_mlp()
    size = model.ByteSize()
    assert not sizing.too_large_to_serialize(model)
    monkeypatch.setattr(sizing, "EXTERNAL_DATA_THRESHOLD", size - 1)  # then the exact size
    assert sizing.too_large_to_serialize(model)
    assert sizing.model_digest(model) is None
    monkeypatch.setattr(sizing, "EXTERNAL_DATA_THRESHOLD", size + 1)
    assert not sizing.too_large_to_serialize(model)


def test_tensor_bytes_reads_shapes_and_subgraphs() -> None:
    model = _varied_model()
    values = sum(
        4 * int(np.prod(t.dims)) for t in model.graph.initializer
    )  # every initializer is float
    inner = 4 + 1024  # the subgraph's one-element weight and its node
    nodes = 1024 * len(model.graph.node) + 1024  # the else branch's node
    assert sizing.tensor_bytes(model.graph) == values + inner + nodes
