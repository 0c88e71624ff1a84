"""The ONNX -> torch converter matches onnxruntime on every op it supports (random inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxpress.core.verify import Runner  # noqa: E402
from onnxpress.train.torch_convert import (  # noqa: E402
    HANDLERS,
    UnsupportedOpsError,
    convert,
    write_back,
)

MODELS = Path(__file__).resolve().parents[2] / "models"
F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def model(
    op: str,
    inputs: dict[str, tuple[int, ...]],
    consts: dict[str, np.ndarray],
    outputs: int = 1,
    opset: int = 17,
    **attrs: object,
) -> onnx.ModelProto:
    names = [*inputs, *consts]
    outs = [f"y{i}" for i in range(outputs)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, F, None) for o in outs],
        [numpy_helper.from_array(v, n) for n, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


X4 = {"x": (2, 3, 8, 8)}
CASES: dict[str, onnx.ModelProto] = {
    "Conv": model("Conv", X4, {"w": w(4, 3, 3, 3), "b": w(4)}, pads=[1, 0, 2, 1], strides=[2, 1]),
    "Conv-group": model("Conv", X4, {"w": w(6, 1, 3, 3)}, group=3, dilations=[2, 2]),
    "Gemm": model("Gemm", {"x": (5, 4)}, {"w": w(3, 4), "c": w(3)}, transB=1, alpha=0.5, beta=2.0),
    "MatMul": model("MatMul", {"x": (2, 5, 4)}, {"w": w(4, 3)}),
    "BatchNormalization": model(
        "BatchNormalization",
        X4,
        {"s": w(3), "b": w(3), "m": w(3), "v": np.abs(w(3)) + 0.5},
        epsilon=1e-3,
    ),
    "LayerNormalization": model("LayerNormalization", {"x": (2, 5, 6)}, {"s": w(6), "b": w(6)}),
    "Softmax": model("Softmax", {"x": (2, 5, 6)}, {}, axis=1),
    "LogSoftmax": model("LogSoftmax", {"x": (2, 6)}, {}),
    "MaxPool": model("MaxPool", X4, {}, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "AveragePool": model("AveragePool", X4, {}, kernel_shape=[2, 2], strides=[2, 2]),
    "GlobalAveragePool": model("GlobalAveragePool", X4, {}),
    "GlobalMaxPool": model("GlobalMaxPool", X4, {}),
    "ReduceMean": model("ReduceMean", {"x": (2, 5, 6)}, {}, axes=[1], keepdims=0),
    "Concat": model("Concat", {"x": (2, 3), "z": (2, 4)}, {}, axis=1),
    "Reshape": model("Reshape", {"x": (2, 3, 4)}, {"s": i64(0, -1)}),
    "Flatten": model("Flatten", X4, {}, axis=2),
    "Transpose": model("Transpose", X4, {}, perm=[0, 2, 3, 1]),
    "Unsqueeze": model("Unsqueeze", {"x": (2, 3)}, {"a": i64(0, 3)}),
    "Squeeze": model("Squeeze", {"x": (2, 1, 3)}, {"a": i64(1)}),
    "Split": model("Split", {"x": (2, 6)}, {"s": i64(2, 4)}, outputs=2, axis=1),
    "Gather": model("Gather", {"x": (5, 4)}, {"i": i64(4, 0, 2)}, axis=0),
    "Slice": model("Slice", {"x": (4, 6)}, {"s": i64(1, 0), "e": i64(3, 100), "a": i64(0, 1)}),
    "Clip": model("Clip", {"x": (3, 4)}, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
    "LeakyRelu": model("LeakyRelu", {"x": (3, 4)}, {}, alpha=0.2),
    "Gelu": model("Gelu", {"x": (3, 4)}, {}, opset=20),
    "GRU": model(
        "GRU",
        {"x": (5, 2, 3)},
        {"W": w(1, 12, 3), "R": w(1, 12, 4), "B": w(1, 24)},
        outputs=2,
        hidden_size=4,
        linear_before_reset=1,
    ),
    "GRU-reset-after": model(
        "GRU",
        {"x": (5, 2, 3)},
        {"W": w(1, 12, 3), "R": w(1, 12, 4), "B": w(1, 24)},
        outputs=2,
        hidden_size=4,
    ),
}
for _op in ("Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Neg", "Abs", "Identity"):
    CASES[_op] = model(_op, {"x": (3, 4)}, {})
for _op in ("Add", "Sub", "Mul", "Div"):
    CASES[_op] = model(_op, {"x": (2, 3, 4)}, {"c": w(3, 4)})


def feeds(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name for t in m.graph.initializer}
    shapes = {
        i.name: [d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in m.graph.input
        if i.name not in inits
    }
    return {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def compare(m: onnx.ModelProto, feed: dict[str, np.ndarray], tolerance: float = 1e-5) -> None:
    expected = Runner(m)(feed)
    with torch.no_grad():
        actual = convert(m)({k: torch.from_numpy(v) for k, v in feed.items()})
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == tuple(a.shape)
        np.testing.assert_allclose(a.numpy(), e, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name: str) -> None:
    compare(CASES[name], feeds(CASES[name]))


def test_every_case_op_is_supported_and_float_weights_train() -> None:
    assert {m.graph.node[0].op_type for m in CASES.values()} <= set(HANDLERS)
    module = convert(CASES["BatchNormalization"])
    assert set(module.param_index) == {"s", "b"}  # running statistics stay buffers


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cnn_mnist", (3, 1, 28, 28)),
        ("transformer_mnist", (3, 28, 28)),
        ("gru_sunspots", (3, 24, 1)),
        ("gru_sunspots_unrolled", (3, 24, 1)),
        ("mlp_digits", (3, 64)),
    ],
)
def test_bundled_models_match_and_write_back_is_identity(name: str, shape: tuple[int, ...]) -> None:
    m = onnx.load(str(MODELS / f"{name}.onnx"))
    compare(m, {"input": RNG.random(shape).astype(np.float32)}, 1e-4)
    rewritten = write_back(m, convert(m))
    assert rewritten.graph.node == m.graph.node
    for a, b in zip(rewritten.graph.initializer, m.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_unsupported_ops_are_listed() -> None:
    m = model("Det", {"x": (3, 3)}, {})
    m.graph.node.append(helper.make_node("NonZero", ["x"], ["nz"]))
    with pytest.raises(UnsupportedOpsError, match="Det, NonZero"):
        convert(m)


def test_frontend_export_checks_and_round_trips(tmp_path: Path) -> None:
    from onnxpress.train.frontend_torch import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    example = torch.randn(4, 6)
    exported = export(net, example, tmp_path / "net.onnx", output_names=["logits"])
    assert (tmp_path / "net.onnx").exists()
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with torch.no_grad():
        expected = net(example).numpy()
        back = convert(exported)({"input": example})[0].numpy()
    np.testing.assert_allclose(back, expected, rtol=1e-5, atol=1e-5)
