"""Small graphs with coupled channels, shared by the channel-group and prune-channels tests.

``Net`` writes nodes and initializers in a few lines; each ``*_model`` function builds one
coupling kind. Weights are seeded, so channel norms (and hence L1 choices) are fixed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Net:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.5) -> str:
        values = (scale * self.rng.standard_normal(shape)).astype(np.float32)
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def const(self, name: str, values: Any, dtype: Any = np.int64) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attrs: Any) -> str:
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0]

    def conv(
        self,
        x: str,
        name: str,
        c_in: int,
        c_out: int,
        k: int = 3,
        group: int = 1,
        bias: bool = True,
    ) -> str:
        inputs = [x, self.weight(f"{name}.w", (c_out, c_in // group, k, k))]
        if bias:
            inputs.append(self.weight(f"{name}.b", (c_out,)))
        return self.op("Conv", inputs, name, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, name: str, channels: int) -> str:
        gamma = self.const(f"{name}.gamma", 0.5 + self.rng.random(channels), np.float32)
        beta = self.const(f"{name}.beta", self.rng.standard_normal(channels), np.float32)
        mean = self.const(f"{name}.mean", 0.1 * self.rng.standard_normal(channels), np.float32)
        var = self.const(f"{name}.var", 0.5 + self.rng.random(channels), np.float32)
        return self.op("BatchNormalization", [x, gamma, beta, mean, var], name)

    def model(
        self, inputs: dict[str, list[Any]], outputs: list[str], opset: int = 17
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "channels",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_empty_tensor_value_info(n) for n in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model


IMAGE = {"x": ["N", 3, 8, 8]}


def chain_model() -> onnx.ModelProto:
    """conv1(8) -> BN -> Relu -> MaxPool -> Pad(spatial) -> Resize(x2) -> conv2 -> y."""
    net = Net()
    h = net.bn(net.conv("x", "conv1", 3, 8), "bn1", 8)
    h = net.op(
        "MaxPool", [net.op("Relu", [h], "relu1")], "pool", kernel_shape=[2, 2], strides=[2, 2]
    )
    h = net.op("Pad", [h, net.const("pads", [0, 0, 1, 1, 0, 0, 1, 1])], "pad")
    scales = net.const("scales", [1.0, 1.0, 2.0, 2.0], np.float32)
    h = net.op("Resize", [h, "", scales], "resize", mode="nearest")
    net.conv(h, "y", 8, 4)
    return net.model(IMAGE, ["y"])


def residual_se_model() -> onnx.ModelProto:
    """Residual block with a squeeze-excitation gate (Mul) and InstanceNormalization."""
    net = Net(1)
    s = net.op("Relu", [net.conv("x", "stem", 3, 8)], "stem_relu")
    h = net.op("Relu", [net.conv(s, "c1", 8, 8)], "c1_relu")
    h = net.conv(h, "c2", 8, 8)
    gate = net.op("GlobalAveragePool", [h], "se_pool")
    gate = net.op("Relu", [net.conv(gate, "se_reduce", 8, 4, k=1)], "se_relu")
    gate = net.op("Sigmoid", [net.conv(gate, "se_expand", 4, 8, k=1)], "se_gate")
    h = net.op("Mul", [h, gate], "se_mul")
    h = net.op("Add", [s, h], "residual")
    scale = net.const("in.scale", 1 + 0.1 * np.arange(8), np.float32)
    h = net.op(
        "InstanceNormalization", [h, scale, net.const("in.b", np.zeros(8), np.float32)], "inorm"
    )
    net.conv(h, "y", 8, 2)
    return net.model(IMAGE, ["y"])


def block_model() -> onnx.ModelProto:
    """Concat + depthwise + residual in one block::

    s = relu(stem(x)) [8];  cat = Concat(conv_a(s) [4], conv_b(s) [4])
    d = relu(depthwise3x3(cat));  y = head(s + conv_p(d))
    """
    net = Net(2)
    s = net.op("Relu", [net.conv("x", "stem", 3, 8)], "stem_relu")
    cat = net.op(
        "Concat", [net.conv(s, "conv_a", 8, 4), net.conv(s, "conv_b", 8, 4)], "cat", axis=1
    )
    d = net.op("Relu", [net.conv(cat, "dw", 8, 8, group=8)], "dw_relu")
    h = net.op("Add", [s, net.conv(d, "conv_p", 8, 8)], "residual")
    net.conv(h, "y", 8, 2)
    return net.model(IMAGE, ["y"])


def grouped_model() -> onnx.ModelProto:
    """conv1(8) -> Relu -> grouped conv (group 2, 8 -> 6) -> Relu -> conv3 -> y."""
    net = Net(3)
    h = net.op("Relu", [net.conv("x", "conv1", 3, 8)], "relu1")
    h = net.op("Relu", [net.conv(h, "gconv", 8, 6, group=2)], "relu2")
    net.conv(h, "y", 6, 2)
    return net.model(IMAGE, ["y"])


def flatten_model(reshape: bool = False) -> onnx.ModelProto:
    """conv(4) [N,4,4,4] -> Relu -> Flatten (or Reshape [N,-1]) -> Gemm / MatMul -> y [N,5]."""
    net = Net(4)
    h = net.op("Relu", [net.conv("x", "conv", 3, 4)], "relu")
    if reshape:
        h = net.op("Reshape", [h, net.const("shape", [0, -1])], "reshape")
        net.op("MatMul", [h, net.weight("fc.w", (64, 5))], "y")
    else:
        h = net.op("Flatten", [h], "flatten", axis=1)
        net.op("Gemm", [h, net.weight("fc.w", (5, 64)), net.weight("fc.b", (5,))], "y", transB=1)
    return net.model({"x": ["N", 3, 4, 4]}, ["y"])


def split_slice_model() -> onnx.ModelProto:
    """conv(8) -> Split [3, 5] on channels; a = Relu(first); b = Slice(second)[1:5]
    -> Concat(a, b) [7] -> conv_y."""
    net = Net(5)
    h = net.conv("x", "conv", 3, 8)
    first = net.op("Split", [h, net.const("sizes", [3, 5])], "split", outputs=2, axis=1)
    a = net.op("Relu", [first], "relu")
    b = net.op(
        "Slice",
        ["split_1", net.const("starts", [1]), net.const("ends", [5]), net.const("axes", [1])],
        "slice",
    )
    cat = net.op("Concat", [a, b], "cat", axis=1)
    net.conv(cat, "y", 7, 2)
    return net.model(IMAGE, ["y"])


def ffn_model() -> onnx.ModelProto:
    """x [N,T,8] -> MatMul W1[8,16] -> Add b1 -> Relu -> MatMul W2[16,8] -> Add b2 -> y."""
    net = Net(6)
    h = net.op("MatMul", ["x", net.weight("w1", (8, 16))], "fc1")
    h = net.op("Relu", [net.op("Add", [net.weight("b1", (16,)), h], "fc1_bias")], "relu")
    h = net.op("MatMul", [h, net.weight("w2", (16, 8))], "fc2")
    net.op("Add", [h, net.weight("b2", (8,))], "y")
    return net.model({"x": ["N", 5, 8]}, ["y"])


def gru_model() -> onnx.ModelProto:
    """x [T,N,3] -> GRU(H=8, zero initial_h from ConstantOfShape) -> Y_h -> Squeeze -> Gemm."""
    net = Net(7)
    hidden = 8
    batch = net.op("Gather", [net.op("Shape", ["x"], "shape"), net.const("one", 1)], "batch")
    dims = net.op(
        "Concat",
        [
            net.const("d0", [1]),
            net.op("Unsqueeze", [batch, net.const("ax0", [0])], "batch1"),
            net.const("dh", [hidden]),
        ],
        "h0_shape",
        axis=0,
    )
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    h0 = net.op("ConstantOfShape", [dims], "h0", value=zero)
    w, r = net.weight("W", (1, 3 * hidden, 3)), net.weight("R", (1, 3 * hidden, hidden))
    b = net.weight("B", (1, 6 * hidden))
    net.op(
        "GRU", ["x", w, r, b, "", h0], "gru", outputs=2, hidden_size=hidden, linear_before_reset=1
    )
    h = net.op("Squeeze", ["gru_1", net.const("ax", [0])], "last")
    net.op(
        "Gemm", [h, net.weight("head.w", (2, hidden)), net.weight("head.b", (2,))], "y", transB=1
    )
    return net.model({"x": [6, "N", 3]}, ["y"])
