"""Build a GRU regressor as an ONNX graph of primitive ops, one cell per time step.

The graph computes exactly what ``torch.nn.GRU`` (one layer, batch_first) followed by
``nn.Linear(hidden, 1)`` on the last hidden state computes, with torch's gate order
(r, z, n) and torch's "linear before reset" form. For every step t = 0 .. steps-1:

    x_t      = Gather(input, t, axis=1)                        [batch, input_size]
    gi       = Add(MatMul(x_t, W_ih^T), b_ih)                  [batch, 3H]
    gh       = Add(MatMul(h, W_hh^T), b_hh)                    [batch, 3H]
    i_r, i_z, i_n = Split(gi);  h_r, h_z, h_n = Split(gh)      each [batch, H]
    r        = Sigmoid(Add(i_r, h_r))
    z        = Sigmoid(Add(i_z, h_z))
    n        = Tanh(Add(i_n, Mul(r, h_n)))
    h'       = Add(Mul(Sub(1, z), n), Mul(z, h))

The initial state is zeros [batch, H] from Shape -> Concat -> ConstantOfShape, and the
output is Gemm(h_last, head.weight, head.bias, transB=1). All steps share the same weight
initializers; node names are ``step{t}/<role>`` so a GRU-fusion pass (and a person) can
see the structure. Needs only numpy and onnx.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _cell(step: int, state: str, nodes: list[onnx.NodeProto]) -> str:
    """Append the nodes of one GRU step; return the name of the new hidden state."""

    def node(op: str, inputs: list[str], role: str, **attributes: Any) -> str:
        output = f"step{step}/{role}"
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    x_t = node("Gather", ["input", f"step{step}_index"], "x", axis=1)
    gi = node("Add", [node("MatMul", [x_t, "W_ih_T"], "x_proj"), "b_ih"], "gates_x")
    gh = node("Add", [node("MatMul", [state, "W_hh_T"], "h_proj"), "b_hh"], "gates_h")
    gi_parts = [f"step{step}/gates_x_{gate}" for gate in "rzn"]
    gh_parts = [f"step{step}/gates_h_{gate}" for gate in "rzn"]
    nodes.append(
        helper.make_node("Split", [gi, "gate_sizes"], gi_parts, name=f"step{step}/split_x", axis=1)
    )
    nodes.append(
        helper.make_node("Split", [gh, "gate_sizes"], gh_parts, name=f"step{step}/split_h", axis=1)
    )
    reset = node("Sigmoid", [node("Add", [gi_parts[0], gh_parts[0]], "r_sum")], "r")
    update = node("Sigmoid", [node("Add", [gi_parts[1], gh_parts[1]], "z_sum")], "z")
    gated = node("Mul", [reset, gh_parts[2]], "r_h_n")
    candidate = node("Tanh", [node("Add", [gi_parts[2], gated], "n_sum")], "n")
    keep_new = node("Mul", [node("Sub", ["one", update], "one_minus_z"), candidate], "new_part")
    keep_old = node("Mul", [update, state], "old_part")
    return node("Add", [keep_new, keep_old], "h")


def build_unrolled_gru(
    weights: Mapping[str, np.ndarray], *, steps: int, hidden: int
) -> onnx.ModelProto:
    """Unrolled GRU + linear head from a torch ``state_dict`` (as numpy arrays).

    Expects keys ``gru.weight_ih_l0`` [3H,I], ``gru.weight_hh_l0`` [3H,H],
    ``gru.bias_ih_l0`` [3H], ``gru.bias_hh_l0`` [3H], ``head.weight`` [1,H], ``head.bias`` [1].
    """
    w_ih = np.asarray(weights["gru.weight_ih_l0"], dtype=np.float32)
    input_size = w_ih.shape[1]
    f32 = np.float32
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(w_ih.T), "W_ih_T"),
        numpy_helper.from_array(
            np.ascontiguousarray(np.asarray(weights["gru.weight_hh_l0"], dtype=f32).T), "W_hh_T"
        ),
        numpy_helper.from_array(np.asarray(weights["gru.bias_ih_l0"], dtype=f32), "b_ih"),
        numpy_helper.from_array(np.asarray(weights["gru.bias_hh_l0"], dtype=f32), "b_hh"),
        numpy_helper.from_array(np.asarray(weights["head.weight"], dtype=f32), "head.weight"),
        numpy_helper.from_array(np.asarray(weights["head.bias"], dtype=f32), "head.bias"),
        numpy_helper.from_array(np.full(3, hidden, dtype=np.int64), "gate_sizes"),
        numpy_helper.from_array(np.array([hidden], dtype=np.int64), "hidden_size"),
        numpy_helper.from_array(np.array(1.0, dtype=f32), "one"),
    ]
    initializers += [
        numpy_helper.from_array(np.array(t, dtype=np.int64), f"step{t}_index") for t in range(steps)
    ]
    nodes = [
        helper.make_node(
            "Shape", ["input"], ["batch_size"], name="init/batch_size", start=0, end=1
        ),
        helper.make_node(
            "Concat", ["batch_size", "hidden_size"], ["init/h_shape"], name="init/h_shape", axis=0
        ),
        helper.make_node(
            "ConstantOfShape",
            ["init/h_shape"],
            ["init/h"],
            name="init/h",
            value=numpy_helper.from_array(np.zeros(1, dtype=f32)),
        ),
    ]
    state = "init/h"
    for step in range(steps):
        state = _cell(step, state, nodes)
    nodes.append(
        helper.make_node(
            "Gemm", [state, "head.weight", "head.bias"], ["prediction"], name="head/Gemm", transB=1
        )
    )
    graph = helper.make_graph(
        nodes,
        "gru_sunspots_unrolled",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", steps, input_size])],
        [helper.make_tensor_value_info("prediction", TensorProto.FLOAT, ["batch", 1])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxpress-models"
    )
    model.ir_version = 8
    model.doc_string = (
        f"GRU(hidden {hidden}) unrolled over {steps} steps into primitive ops, "
        "then Linear(hidden->1); same weights as gru_sunspots.onnx"
    )
    return model
