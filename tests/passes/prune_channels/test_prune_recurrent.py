"""prune-channels on LSTM hidden units (a bidirectional LSTM with peepholes: both directions
and every gate together; through the Reshape that joins the directions on features) and on
ConvTranspose channels: exact shapes after pruning, and numerics against the original with
the pruned units' weights zeroed (which leaves them at zero from a zero state), to 1e-5 on
onnxruntime."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from channel_graphs import Net
from onnx import TensorProto, helper
from prune_helpers import assert_same, masked, removed
from rnn_exports import export

import onnxpress
from onnxpress import PassContext, PassResult
from onnxpress.core.ir import to_graph, to_model
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.verify import check_structure

HIDDEN = 8


def prune(model: onnx.ModelProto, spec: str) -> tuple[onnx.ModelProto, PassResult]:
    ctx = PassContext(template=model, original=model)
    graph = to_graph(model)
    result = parse_pipeline(spec)[0].run(graph, ctx)
    pruned = to_model(graph, model)
    check_structure(pruned)
    return pruned, result


def shapes(model: onnx.ModelProto, node: str) -> list[tuple[int, ...]]:
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    found = next(n for n in model.graph.node if n.name == node)
    return [inits[i] for i in found.input if i in inits]


def lstm_model() -> onnx.ModelProto:
    """x [T,N,3] -> bidirectional LSTM (H=8, peepholes, zero initial_c) -> Y_h -> sum of the
    directions -> Gemm."""
    net = Net(3)
    h = HIDDEN
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    c0 = net.op("ConstantOfShape", [net.const("c0_shape", [2, 4, h])], "c0", value=zero)
    inputs = [
        "x",
        net.weight("W", (2, 4 * h, 3)),
        net.weight("R", (2, 4 * h, h)),
        net.weight("B", (2, 8 * h)),
        "",
        net.weight("h0", (2, 4, h)),
        c0,
        net.weight("P", (2, 3 * h)),
    ]
    net.op("LSTM", inputs, "lstm", outputs=3, hidden_size=h, direction="bidirectional")
    mean = net.op("ReduceSum", ["lstm_1", net.const("ax", [0])], "mean", keepdims=0)
    net.op("Gemm", [mean, net.weight("head.w", (2, h)), net.weight("head.b", (2,))], "y", transB=1)
    return net.model({"x": [5, 4, 3]}, ["y"])


def test_lstm_hidden_units_in_both_directions() -> None:
    model = lstm_model()
    pruned, result = prune(model, "prune-channels{ratio=0.25}")
    assert shapes(pruned, "lstm") == [(2, 24, 3), (2, 24, 6), (2, 48), (2, 4, 6), (2, 18)]
    assert next(n for n in pruned.graph.node if n.name == "lstm").input[6] == ""  # zeros
    assert shapes(pruned, "y")[0] == (2, 6)
    units = removed(result, "lstm")
    assert len(units) == 2
    rows = (HIDDEN * np.arange(8)[:, None] + units).reshape(-1)
    gates, peepholes = rows[: 4 * len(units)], rows[: 3 * len(units)]
    zeroed = masked(
        model,
        {"W": (1, gates), "R": (1, gates), "B": (1, rows), "P": (1, peepholes), "h0": (2, units)},
    )
    assert_same(zeroed, pruned)


def test_conv_transpose_output_and_input_channels() -> None:
    """conv (8 ch) -> ConvTranspose (8 -> 6, stride 2) -> Relu -> conv: both groups prune."""
    net = Net(5)
    a = net.op("Relu", [net.conv("x", "c1", 3, 8)], "relu1")
    up = net.op(
        "ConvTranspose",
        [a, net.weight("up.w", (8, 6, 2, 2)), net.weight("up.b", (6,))],
        "up",
        strides=[2, 2],
    )
    net.conv(net.op("Relu", [up], "relu2"), "y", 6, 2)
    model = net.model({"x": ["N", 3, 6, 6]}, ["y"])
    pruned, result = prune(model, "prune-channels{ratio=0.5}")
    assert shapes(pruned, "c1") == [(4, 3, 3, 3), (4,)]
    assert shapes(pruned, "up") == [(4, 3, 2, 2), (3,)]
    assert shapes(pruned, "y")[0] == (2, 3, 3, 3)
    gone_c1, gone_up = removed(result, "c1"), removed(result, "up")
    zeroed = masked(model, {"up.w": (0, gone_c1), "y.w": (1, gone_up)})
    assert_same(zeroed, pruned)


def test_torch_bidirectional_lstm_joined_on_features() -> None:
    """torch's nn.LSTM(bidirectional) exports Y [T, 2, N, H] -> Transpose -> Reshape
    [N, T, 2H]: the Reshape lays the units of both directions side by side, and the Linear
    after it loses the rows of the removed units in both halves."""
    torch = pytest.importorskip("torch")

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.LSTM(3, HIDDEN, bidirectional=True, batch_first=True)
            self.fc = torch.nn.Linear(2 * HIDDEN, 5)

        def forward(self, x: Any) -> Any:
            return self.fc(self.rnn(x)[0])

    torch.manual_seed(0)
    model = export(Tagger(), (torch.randn(2, 6, 3),), ["x"], ["y"], {"x": 0})
    model, _ = onnxpress.optimize(model, passes="fold-constants,cleanup")
    pruned, result = prune(model, "prune-channels{ratio=0.25}")
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    units = removed(result, lstm.name)
    assert len(units) == 2 and result.counts["groups_pruned"] == 1
    rows = (HIDDEN * np.arange(8)[:, None] + units).reshape(-1)
    zeros = {
        lstm.input[1]: (1, rows[: 4 * len(units)]),
        lstm.input[2]: (1, rows[: 4 * len(units)]),
        lstm.input[3]: (1, rows),
        matmul.input[1]: (0, np.concatenate([units, HIDDEN + units])),
    }
    assert_same(masked(model, zeros), pruned)
    sizes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    pruned_matmul = next(n for n in pruned.graph.node if n.op_type == "MatMul")
    assert sizes[pruned_matmul.input[1]] == (2 * (HIDDEN - 2), 5)


def test_conv_channels_feeding_a_bidirectional_lstm() -> None:
    """A CRNN's neck as torch exports it: Conv -> Relu -> Squeeze -> Transpose -> LSTM
    (bidirectional, batch-first; the zero initial state sized by Shape -> Gather of the
    batch). The Conv's channels prune through to the LSTM's input columns in both
    directions, the LSTM's units through to the Linear; the Shape reads no channels."""
    torch = pytest.importorskip("torch")

    class Neck(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 6, (3, 1))
            self.rnn = torch.nn.LSTM(6, HIDDEN, bidirectional=True, batch_first=True)
            self.fc = torch.nn.Linear(2 * HIDDEN, 5)

        def forward(self, x: Any) -> Any:
            features = torch.relu(self.conv(x)).squeeze(2).transpose(1, 2)
            return torch.softmax(self.fc(self.rnn(features)[0]), -1)

    torch.manual_seed(0)
    model = export(Neck(), (torch.randn(2, 2, 3, 7),), ["x"], ["y"], {"x": 0})
    assert {"Shape", "LSTM", "Squeeze"} <= {n.op_type for n in model.graph.node}
    pruned, result = prune(model, "prune-channels{ratio=0.25}")
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    lstm = next(n for n in model.graph.node if n.op_type == "LSTM")
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert result.counts["groups_pruned"] == 2
    assert [r.node for r in result.refusals] == [matmul.name]  # the class axis of the Softmax
    gone, units = removed(result, conv.name), removed(result, lstm.name)
    assert len(gone) == 1 and len(units) == 2
    rows = (HIDDEN * np.arange(8)[:, None] + units).reshape(-1)
    zeros = {
        conv.input[1]: (0, gone),
        conv.input[2]: (0, gone),
        lstm.input[1]: (1, rows[: 4 * len(units)]),
        lstm.input[2]: (1, rows[: 4 * len(units)]),
        lstm.input[3]: (1, rows),
        matmul.input[1]: (0, np.concatenate([units, HIDDEN + units])),
    }
    assert_same(masked(model, zeros), pruned)
    kept = HIDDEN - 2
    assert shapes(pruned, conv.name) == [(5, 2, 3, 1), (5,)]
    assert shapes(pruned, lstm.name) == [(2, 4 * kept, 5), (2, 4 * kept, kept), (2, 8 * kept)]
    pruned_matmul = next(n for n in pruned.graph.node if n.op_type == "MatMul")
    sizes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    assert sizes[pruned_matmul.input[1]] == (2 * kept, 5)
