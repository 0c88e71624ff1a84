"""A BERT-style encoder compiles: its token_type_ids index a 2-row embedding, so random
verification inputs must stay in [0, 2) (found from the Gather that reads them), and
``--no-verify`` runs nothing on onnxruntime, the prepare pipeline included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.runtime import run_compiled
from onnxpress.core import manager
from onnxpress.core.random_inputs import random_inputs
from onnxpress.core.verify import Runner

VOCAB, TYPES, HIDDEN, SEQ = 50, 2, 16, 8


def bert_encoder() -> onnx.ModelProto:
    """input_ids, attention_mask, token_type_ids [batch, seq] -> one self-attention layer."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    inits = [
        weight("word_embeddings", VOCAB, HIDDEN),
        weight("token_type_embeddings", TYPES, HIDDEN),
        weight("wq", HIDDEN, HIDDEN),
        weight("wk", HIDDEN, HIDDEN),
        weight("wv", HIDDEN, HIDDEN),
        numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(HIDDEN**-0.5, np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Gather", ["word_embeddings", "input_ids"], ["words"]),
        helper.make_node("Gather", ["token_type_embeddings", "token_type_ids"], ["types"]),
        helper.make_node("Add", ["words", "types"], ["h"]),
        helper.make_node("MatMul", ["h", "wq"], ["q"]),
        helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("MatMul", ["h", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores0"]),
        helper.make_node("Mul", ["scores0", "scale"], ["scores1"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "maskf"], ["inv"]),
        helper.make_node("Mul", ["inv", "neg"], ["bias0"]),
        helper.make_node("Unsqueeze", ["bias0", "axis1"], ["bias"]),
        helper.make_node("Add", ["scores1", "bias"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["last_hidden_state"]),
    ]
    ids = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", SEQ])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    out = helper.make_tensor_value_info(
        "last_hidden_state", TensorProto.FLOAT, ["batch", SEQ, HIDDEN]
    )
    graph = helper.make_graph(nodes, "bert", ids, [out], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_random_token_type_ids_stay_in_the_embedding() -> None:
    for feed in random_inputs(bert_encoder(), seed=0):
        assert feed["token_type_ids"].min() >= 0 and feed["token_type_ids"].max() < TYPES
        assert feed["input_ids"].max() < VOCAB and feed["input_ids"].max() >= TYPES
        Runner(bert_encoder())(feed)  # onnxruntime accepts them


@pytest.mark.parametrize("verify", [True, False])
def test_bert_encoder_compiles(
    tmp_path: Path, verify: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions: list[int] = []
    real = manager.verification_runner
    monkeypatch.setattr(
        manager, "verification_runner", lambda m, o=False: sessions.append(1) or real(m, o)
    )
    result = compile_model(bert_encoder(), "x86", tmp_path / "bert", verify=verify)
    assert (sessions != []) == verify  # --no-verify: the prepare step runs nothing either
    assert (result.manifest["verification"] is not None) == verify
    feed = {
        n: np.zeros((1, SEQ), np.int64) for n in ("input_ids", "attention_mask", "token_type_ids")
    }
    feed["token_type_ids"][0, SEQ // 2 :] = 1
    got = run_compiled(tmp_path / "bert", feed)["last_hidden_state"]
    np.testing.assert_allclose(got, Runner(bert_encoder())(feed)[0], rtol=1e-4, atol=1e-5)
