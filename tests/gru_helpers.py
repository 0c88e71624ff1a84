"""A one-GRU ONNX model builder shared by the lower-gru and TVM loop-GRU tests."""

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
    **attrs: Any,
) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    inits = {
        "W": rng.standard_normal((dirs, 3 * HID, IN)).astype(np.float32) * 0.5,
        "R": rng.standard_normal((dirs, 3 * HID, HID)).astype(np.float32) * 0.5,
    }
    if bias:
        inits["B"] = rng.standard_normal((dirs, 6 * HID)).astype(np.float32) * 0.5
    if seq_lens is not None:
        inits["lens"] = np.asarray(seq_lens, np.int32)
    x_shape = [BATCH, steps, IN] if layout else [steps, BATCH, IN]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B" if bias else "", "lens" if seq_lens is not None else ""]
    if initial_h:
        h_shape = [BATCH, dirs, HID] if layout else [dirs, BATCH, HID]
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, h_shape))
        names.append("h0")
    while names and not names[-1]:
        names.pop()
    node_outputs = [name if name in outputs else "" for name in ("Y", "Y_h")]
    node = helper.make_node(
        "GRU",
        names,
        node_outputs,
        name="gru",
        hidden_size=HID,
        linear_before_reset=lbr,
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
