"""Small multi-head attention graphs in each exported form, for the prune-channels tests.

``Attention`` writes one self-attention block x [n, SEQ, D] -> y [n, SEQ, D] (y = x + the
output projection of the attention) with HEADS heads of HEAD_DIM, in the form asked for:

* ``legacy``: torch's legacy export, MatMul + Add + Reshape [0, SEQ, H, -1] + Transpose,
  kᵀ by Transpose [0,2,3,1], Div by √Dh, Softmax, MatMul, Transpose, Reshape, MatMul + Add;
* ``dynamo``: torch.onnx.export(dynamo=True) of the same module at opset 18 with a dynamic
  batch: Reshape(allowzero=1) by one shape constant [-1, SEQ, H, Dh] shared by q, k and v;
* ``dynamo-sdpa``: dynamo=True at opset 23 of scaled_dot_product_attention with dynamic
  batch and sequence: the shapes are Concat(Shape(x)[0:1], Shape(x)[1:2], [H], [Dh]), and the
  attention is the opset-23 ``Attention`` op on [n, H, SEQ, Dh];
* ``attention23``: the opset-23 ``Attention`` op on 3-D q, k, v (q_num_heads);
* ``mha``: com.microsoft ``MultiHeadAttention`` on 3-D q, k, v with its packed bias;
* ``fused``: com.microsoft ``Attention``, one [D, 3·H·Dh] weight and bias.

``zero_head`` zeroes that head's value columns (and bias), ``zero_dim`` that dimension of
the query and value columns in every head: their removal is then exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HEADS, HEAD_DIM, SEQ = 4, 4, 5
D = HEADS * HEAD_DIM
FORMS = ("legacy", "dynamo", "dynamo-sdpa", "attention23", "mha", "fused")


class Attention:
    def __init__(
        self, form: str, seed: int = 0, zero_head: int | None = None, zero_dim: int | None = None
    ):
        self.form = form
        self.rng = np.random.default_rng(seed)
        self.zero_head, self.zero_dim = zero_head, zero_dim
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, values: Any, dtype: Any = np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, domain=domain, **attrs))
        return name

    def projection(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        weight = (self.rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
        bias = (self.rng.standard_normal(D) * 0.1).astype(np.float32)
        if role == "v" and self.zero_head is not None:
            weight[:, self.zero_head * HEAD_DIM : (self.zero_head + 1) * HEAD_DIM] = 0
            bias[self.zero_head * HEAD_DIM : (self.zero_head + 1) * HEAD_DIM] = 0
        if role in ("q", "k", "v") and self.zero_dim is not None:
            weight[:, self.zero_dim :: HEAD_DIM] = 0
            bias[self.zero_dim :: HEAD_DIM] = 0
        return weight, bias

    def linear(self, x: str, role: str) -> str:
        weight, bias = self.projection(role)
        product = self.op("MatMul", [x, self.init(f"{role}.w", weight)], f"{role}/MatMul")
        return self.op("Add", [product, self.init(f"{role}.b", bias)], f"{role}/Add")

    def split(self, x: str, role: str, shape: str, perm: list[int]) -> str:
        allowzero = {"allowzero": 1} if self.form.startswith("dynamo") else {}
        four = self.op("Reshape", [x, shape], f"{role}/Reshape", **allowzero)
        return self.op("Transpose", [four], f"{role}/Transpose", perm=perm)

    def context(self) -> str:
        """The merged context [n, SEQ, D] that the output projection reads."""
        form = self.form
        if form in ("legacy", "dynamo", "dynamo-sdpa"):
            if form == "dynamo-sdpa":
                batch = self.op("Shape", ["x"], "shape/batch", start=0, end=1)
                seq = self.op("Shape", ["x"], "shape/seq", start=1, end=2)
                tail = self.init("heads_dims", [HEADS, HEAD_DIM], np.int64)
                split = self.op("Concat", [batch, seq, tail], "shape/split", axis=0)
                merged = self.op(
                    "Concat", [batch, seq, self.init("width", [D], np.int64)], "shape/merge", axis=0
                )
            else:
                legacy = self.form == "legacy"  # view(x.size(0), t, h, -1) -> [0, t, h, -1]
                prefix, dim = (0, -1) if legacy else (-1, HEAD_DIM)
                split = self.init("split_shape", [prefix, SEQ, HEADS, dim], np.int64)
                merged = self.init("merge_shape", [-1, SEQ, D], np.int64)
            k_perm = [0, 2, 1, 3] if form == "dynamo-sdpa" else [0, 2, 3, 1]
            q = self.split(self.linear("x", "q"), "q", split, [0, 2, 1, 3])
            k = self.split(self.linear("x", "k"), "k", split, k_perm)
            v = self.split(self.linear("x", "v"), "v", split, [0, 2, 1, 3])
            if form == "dynamo-sdpa":
                heads = self.op("Attention", [q, k, v], "attention")
            else:
                scores = self.op("MatMul", [q, k], "scores")
                scaled = self.op("Div", [scores, self.init("sqrt_dim", np.sqrt(HEAD_DIM))], "scale")
                probs = self.op("Softmax", [scaled], "softmax", axis=-1)
                heads = self.op("MatMul", [probs, v], "context")
            back = self.op("Transpose", [heads], "back", perm=[0, 2, 1, 3])
            allowzero = {"allowzero": 1} if form.startswith("dynamo") else {}
            return self.op("Reshape", [back, merged], "merge", **allowzero)
        if form == "fused":
            weights, biases = zip(*(self.projection(r) for r in ("q", "k", "v")), strict=True)
            w = self.init("qkv.w", np.concatenate(weights, axis=1))
            b = self.init("qkv.b", np.concatenate(biases))
            return self.op("Attention", ["x", w, b], "attention", "com.microsoft", num_heads=HEADS)
        q, k, v = (self.linear("x", r) for r in ("q", "k", "v"))
        if form == "mha":
            return self.op(
                "MultiHeadAttention", [q, k, v], "attention", "com.microsoft", num_heads=HEADS
            )
        return self.op("Attention", [q, k, v], "attention", q_num_heads=HEADS, kv_num_heads=HEADS)

    def model(self) -> onnx.ModelProto:
        context = self.context()
        out = self.linear(context, "o")
        self.nodes.append(helper.make_node("Add", ["x", out], ["y"], name="residual"))
        opset = 23 if self.form in ("dynamo-sdpa", "attention23") else 18
        imports = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
        graph = helper.make_graph(
            self.nodes,
            self.form,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", SEQ, D])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", SEQ, D])],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=imports)
        model.ir_version = 10
        return model


def attention_model(form: str, **kwargs: Any) -> onnx.ModelProto:
    return Attention(form, **kwargs).model()
