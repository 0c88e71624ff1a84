"""One-GRU and one-LSTM ONNX model builders shared by the lower-gru/lower-lstm and TVM
loop-GRU tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IN, HID, BATCH = 3, 5, 2


def gru_model(
    steps: int | str = 4,
    *,
    lbr: int = 1,
    direction: str = "forward",
    layout: int = 0,
    initial_h: bool = False,
    bias: bool = True,
    seq_lens: list[int] | None = None,
    outputs: tuple[str, ...] = ("Y", "Y_h"),
    seed: int = 0,
    op: str = "GRU",
    peepholes: bool = False,
    **attrs: Any,
) -> onnx.ModelProto:
    """One GRU (or, with op="LSTM", one LSTM: initial_h brings initial_c, outputs may name
    Y_c, ``peepholes`` adds P; ``lbr`` is then ignored)."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    inits = {
        "W": rng.standard_normal((dirs, gates * HID, IN)).astype(np.float32) * 0.5,
        "R": rng.standard_normal((dirs, gates * HID, HID)).astype(np.float32) * 0.5,
    }
    if bias:
        inits["B"] = rng.standard_normal((dirs, 2 * gates * HID)).astype(np.float32) * 0.5
    if seq_lens is not None:
        inits["lens"] = np.asarray(seq_lens, np.int32)
    x_shape = [BATCH, steps, IN] if layout else [steps, BATCH, IN]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B" if bias else "", "lens" if seq_lens is not None else ""]
    if initial_h:
        h_shape = [BATCH, dirs, HID] if layout else [dirs, BATCH, HID]
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, h_shape))
        names.append("h0")
        if op == "LSTM":
            inputs.append(helper.make_tensor_value_info("c0", TensorProto.FLOAT, h_shape))
            names.append("c0")
    if peepholes:
        inits["P"] = rng.standard_normal((dirs, 3 * HID)).astype(np.float32) * 0.5
        names += [""] * (7 - len(names)) + ["P"]
    while names and not names[-1]:
        names.pop()
    node_outputs = [name if name in outputs else "" for name in ("Y", "Y_h", "Y_c")]
    while node_outputs and not node_outputs[-1]:
        node_outputs.pop()
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(
        op,
        names,
        node_outputs,
        name=op.lower(),
        hidden_size=HID,
        direction=direction,
        layout=layout,
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        "gru",
        inputs,
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)
