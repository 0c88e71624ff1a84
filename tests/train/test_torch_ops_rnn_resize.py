"""The torch converter's GRU/LSTM (every direction) and ConvTranspose/Resize/Upsample handlers
match onnxruntime on random inputs, and gradients reach the weights and the input."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from rnn_exports import bidirectional_loop, masked_loop  # noqa: E402

import onnxpress  # noqa: E402
from onnxpress.core.verify import Runner  # noqa: E402
from onnxpress.train.distill import distill  # noqa: E402
from onnxpress.train.torch_convert import convert  # noqa: E402

RNG = np.random.default_rng(0)
T, B, IN, H = 4, 2, 3, 5


def w(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def one_node(
    op: str,
    inputs: dict[str, list[int]],
    consts: dict[str, np.ndarray],
    order: list[str],
    outputs: int = 1,
    opset: int = 17,
    **attrs: Any,
) -> onnx.ModelProto:
    """One ``op`` node reading ``order`` (graph inputs, constants, or "" for absent ones)."""
    outs = [f"y{k}" for k in range(outputs)]
    graph = helper.make_graph(
        [helper.make_node(op, order, outs, **attrs)],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        [numpy_helper.from_array(v, n) for n, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def rnn(
    op: str,
    direction: str,
    states: bool,
    peepholes: bool = False,
    lengths: list[int] | None = None,
    **attrs: Any,
) -> onnx.ModelProto:
    gates = {"GRU": 3, "LSTM": 4}[op]
    dirs = 2 if direction == "bidirectional" else 1
    consts = {"W": w(dirs, gates * H, IN), "R": w(dirs, gates * H, H), "B": w(dirs, 2 * gates * H)}
    inputs: dict[str, list[int]] = {"X": [T, B, IN]}
    order = ["X", "W", "R", "B", ""]
    if lengths is not None:
        consts["lens"] = np.array(lengths, np.int32)
        order[4] = "lens"
    if states:
        inputs["h0"] = [dirs, B, H]
        order.append("h0")
        if op == "LSTM":
            inputs["c0"] = [dirs, B, H]
            order.append("c0")
    if peepholes:
        consts["P"] = w(dirs, 3 * H)
        order += [""] * (7 - len(order)) + ["P"]
    outputs = 3 if op == "LSTM" else 2
    return one_node(op, inputs, consts, order, outputs, hidden_size=H, direction=direction, **attrs)


CASES = {
    "GRU-reverse": rnn("GRU", "reverse", False, linear_before_reset=1),
    "GRU-bidirectional-states": rnn("GRU", "bidirectional", True),
    "LSTM-forward": rnn("LSTM", "forward", False),
    "LSTM-reverse-states": rnn("LSTM", "reverse", True),
    "LSTM-bidirectional-peepholes": rnn("LSTM", "bidirectional", True, peepholes=True),
    "LSTM-bidirectional-states": rnn("LSTM", "bidirectional", True),
    "GRU-bidirectional-reset-after": rnn("GRU", "bidirectional", False, linear_before_reset=1),
    "GRU-bidirectional-lengths": rnn("GRU", "bidirectional", True, lengths=[T - 1, 0]),
    "LSTM-reverse-lengths": rnn("LSTM", "reverse", False, lengths=[2, T]),
    "LSTM-bidirectional-lengths-states": rnn(
        "LSTM", "bidirectional", True, peepholes=True, lengths=[1, T - 2]
    ),
    "ConvTranspose": one_node(
        "ConvTranspose",
        {"x": [2, 3, 5, 5]},
        {"w": w(3, 4, 3, 3), "b": w(4)},
        ["x", "w", "b"],
        strides=[2, 2],
        pads=[1, 0, 0, 1],
        output_padding=[1, 1],
    ),
    "ConvTranspose-group-dilation": one_node(
        "ConvTranspose",
        {"x": [1, 4, 6]},
        {"w": w(4, 3, 3)},
        ["x", "w"],
        group=2,
        dilations=[2],
        strides=[3],
    ),
    "ConvTranspose-output-shape": one_node(
        "ConvTranspose",
        {"x": [1, 2, 4, 4]},
        {"w": w(2, 2, 3, 3)},
        ["x", "w"],
        strides=[2, 2],
        output_shape=[8, 8],
        auto_pad="SAME_UPPER",
    ),
    "ConvTranspose-same-lower-group": one_node(
        "ConvTranspose",
        {"x": [1, 4, 5, 3]},
        {"w": w(4, 2, 4, 3)},
        ["x", "w"],
        strides=[2, 3],
        group=2,
        output_padding=[1, 0],
        auto_pad="SAME_LOWER",
    ),
    "ConvTranspose-same-upper": one_node(
        "ConvTranspose",
        {"x": [1, 2, 5]},
        {"w": w(2, 3, 4)},
        ["x", "w"],
        strides=[3],
        auto_pad="SAME_UPPER",
    ),
    "ConvTranspose-valid": one_node(
        "ConvTranspose",
        {"x": [1, 2, 4, 4]},
        {"w": w(2, 2, 3, 3)},
        ["x", "w"],
        strides=[2, 2],
        auto_pad="VALID",
    ),
    "Upsample-nearest": one_node(
        "Upsample",
        {"x": [1, 2, 3, 4]},
        {"s": np.array([1, 1, 2, 3], np.float32)},
        ["x", "s"],
        opset=9,
        mode="nearest",
    ),
    "Upsample-linear": one_node(
        "Upsample",
        {"x": [1, 2, 3, 4]},
        {"s": np.array([1, 1, 2, 2], np.float32)},
        ["x", "s"],
        opset=9,
        mode="linear",
    ),
}
SCALES = np.array([1, 1, 2.5, 1.5], np.float32)
for coordinates in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"):
    for rounding in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        CASES[f"Resize-nearest-{coordinates}-{rounding}"] = one_node(
            "Resize",
            {"x": [1, 2, 4, 5]},
            {"s": SCALES},
            ["x", "", "s"],
            mode="nearest",
            coordinate_transformation_mode=coordinates,
            nearest_mode=rounding,
        )
    CASES[f"Resize-linear-{coordinates}"] = one_node(
        "Resize",
        {"x": [1, 2, 4, 5]},
        {"s": SCALES},
        ["x", "", "s"],
        mode="linear",
        coordinate_transformation_mode=coordinates,
    )
CASES["Resize-linear-sizes-shrink"] = one_node(
    "Resize",
    {"x": [1, 2, 7, 5]},
    {"z": np.array([1, 2, 3, 9], np.int64)},
    ["x", "", "", "z"],
    mode="linear",
)
CASES["Resize-nearest-axes"] = one_node(
    "Resize",
    {"x": [1, 2, 3, 4]},
    {"s": np.array([2, 0.5], np.float32)},
    ["x", "", "s"],
    opset=18,
    axes=[2, 3],
    mode="nearest",
)


def feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {
        i.name: RNG.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(
            np.float32
        )
        for i in model.graph.input
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_handler_matches_onnxruntime(name: str) -> None:
    model = CASES[name]
    feed = feeds(model)
    expected = Runner(model)(feed)
    with torch.no_grad():
        actual = convert(model)({k: torch.from_numpy(v) for k, v in feed.items()})
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == tuple(a.shape)
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name", ["LSTM-bidirectional-peepholes", "ConvTranspose", "Resize-linear-half_pixel"]
)
def test_gradients_reach_weights_and_input(name: str) -> None:
    model = CASES[name]
    module = convert(model)
    x_name = model.graph.input[0].name
    feed = {k: torch.from_numpy(v) for k, v in feeds(model).items()}
    feed[x_name].requires_grad_(True)
    sum(out.square().sum() for out in module(feed)).backward()
    assert feed[x_name].grad is not None and float(feed[x_name].grad.abs().sum()) > 0
    for parameter in module.parameters():
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "name", ["LSTM-bidirectional-states", "LSTM-reverse-states", "GRU-bidirectional-reset-after"]
)
def test_fused_kernel_and_step_loop_agree_with_gradients(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ops that run on torch's fused LSTM/GRU kernel give the outputs and the gradients of
    the step-by-step loop (forced by declaring nothing fusable)."""
    from onnxpress.train import torch_ops_rnn

    model = CASES[name]
    x_name = model.graph.input[0].name
    values = feeds(model)
    results = []
    for fusable in (True, False):
        if not fusable:
            monkeypatch.setattr(torch_ops_rnn, "_fusable", lambda a: False)
        module = convert(model)
        feed = {k: torch.from_numpy(v.copy()) for k, v in values.items()}
        feed[x_name].requires_grad_(True)
        outputs = module(feed)
        sum(
            (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum() for out in outputs
        ).backward()
        grads = [feed[x_name].grad] + [p.grad for p in module.parameters()]
        results.append(([o.detach() for o in outputs], grads))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unsupported_attributes_raise_by_name() -> None:
    model = one_node(
        "Resize",
        {"x": [1, 1, 2, 2]},
        {"s": np.array([1, 1, 2, 2], np.float32)},
        ["x", "", "s"],
        mode="cubic",
    )
    with pytest.raises(ValueError, match="Resize: mode 'cubic' is not supported"):
        convert(model)({"x": torch.zeros(1, 1, 2, 2)})
    lstm = rnn("LSTM", "forward", False, input_forget=1)
    with pytest.raises(ValueError, match="input_forget=1 is not supported"):
        convert(lstm)({"X": torch.zeros(T, B, IN)})


@pytest.mark.parametrize("align_corners", [False, True])
def test_torch_unet_round_trips_through_onnx(align_corners: bool) -> None:
    """A small U-Net (a ConvTranspose up-step with a nearest x2 skip of the bottom, then a
    bilinear Resize up-step, with or without align_corners; skip Concats) exported by torch
    and converted back matches torch within max-rel 1e-5."""
    nn = torch.nn

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
            self.down2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
            self.bottom = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
            self.up1 = nn.ConvTranspose2d(8, 8, 2, stride=2)
            self.mix1 = nn.Conv2d(16, 4, 3, padding=1)
            self.mix2 = nn.Conv2d(8, 2, 1)

        def forward(self, x: Any) -> Any:
            a = self.down1(x)
            b = self.down2(a)
            c = self.bottom(b)
            skip = nn.functional.interpolate(c, scale_factor=2, mode="nearest")
            up = torch.relu(self.mix1(torch.cat([self.up1(c) + skip, b], 1)))
            up = nn.functional.interpolate(
                up, scale_factor=2, mode="bilinear", align_corners=align_corners
            )
            return self.mix2(torch.cat([up, a], 1))

    torch.manual_seed(0)
    net = UNet().eval()
    x = torch.randn(2, 1, 16, 16)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"])
    model = onnx.load_from_string(buffer.getvalue())
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    modes = {helper.get_attribute_value(a) for n in resizes for a in n.attribute}
    assert "ConvTranspose" in {n.op_type for n in model.graph.node} and len(resizes) == 2
    wanted = b"align_corners" if align_corners else b"half_pixel"
    assert {b"nearest", b"linear", wanted} <= modes
    with torch.no_grad():
        expected = net(x)
        (actual,) = convert(model)({"x": x})
    error = float((actual - expected).abs().max() / expected.abs().max())
    assert error <= 1e-5


def test_distill_tunes_a_fused_bidirectional_lstm() -> None:
    """The default pipeline fuses two LSTMCell loops into one bidirectional LSTM; distill
    (through the converter's LSTM handler) pulls a perturbed copy back toward it."""
    teacher, _ = onnxpress.optimize(bidirectional_loop("lstm", 4, True, "concat"))
    assert [n.op_type for n in teacher.graph.node].count("LSTM") == 1
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for tensor in student.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32 and values.size > 8:
            noise = RNG.standard_normal(values.shape).astype(np.float32) * 0.3
            tensor.CopyFrom(numpy_helper.from_array(values + noise, tensor.name))
    x = RNG.standard_normal((256, 4, 3)).astype(np.float32)
    _, report = distill(student, teacher, [{"x": x}], epochs=4, lr=0.01, task="regression")
    assert report.metric == "rel-l2" and report.metric_after < 0.6 * report.metric_before


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_fused_masked_loop_converts(kind: str) -> None:
    """A masked bidirectional loop, fused by the default pipeline into one op with
    sequence_lens (Clip(Cast(lens))), runs in torch as on onnxruntime, lengths 0 included."""
    fused, _ = onnxpress.optimize(masked_loop(kind, 4, "bidirectional"))
    assert kind.upper() in {n.op_type for n in fused.graph.node}
    x = RNG.standard_normal((3, 4, 3)).astype(np.float32)
    lens = np.array([4, 0, 2], np.int64)
    expected = Runner(fused)({"x": x, "lens": lens})
    with torch.no_grad():
        actual = convert(fused)({"x": torch.from_numpy(x), "lens": torch.from_numpy(lens)})
    for e, a in zip(expected, actual, strict=True):
        np.testing.assert_allclose(a.numpy(), e, rtol=1e-5, atol=1e-5)
