"""The converter's mobile/OCR ops (``torch_ops_mobile``) and Conv/pool ``auto_pad`` modes
match onnxruntime, one single-node graph per case; float ops pass gradients. The ops the
converter still refuses are exactly those listed in docs/DISTILL.md."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxpress.core.verify import Runner  # noqa: E402
from onnxpress.train.torch_convert import HANDLERS, convert  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "DISTILL.md"
RNG = np.random.default_rng(3)
FLOAT, BOOL, INT64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def graph(
    op: str,
    inputs: dict[str, np.ndarray],
    consts: dict[str, np.ndarray] | None = None,
    out: int = FLOAT,
    opset: int = 18,
    indices: bool = False,
    **attrs: object,
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One ``op`` node over graph inputs (fed) and initializers; returns (model, feeds)."""
    consts = consts or {}
    outputs = ["y", "indices"] if indices else ["y"]
    node = helper.make_node(op, [*inputs, *consts], outputs, **attrs)
    types = {np.dtype(np.float32): FLOAT, np.dtype(np.bool_): BOOL, np.dtype(np.int64): INT64}
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, types[v.dtype], v.shape) for n, v in inputs.items()],
        [helper.make_tensor_value_info("y", out, None)]
        + [helper.make_tensor_value_info("indices", INT64, None)] * indices,
        [numpy_helper.from_array(v, n) for n, v in consts.items()],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), inputs


X4 = rand(2, 4, 7, 9)
X3 = rand(2, 5, 6)
CASES = {
    "HardSigmoid": graph("HardSigmoid", {"x": X3 * 4}, alpha=0.3, beta=0.4),
    "HardSwish": graph("HardSwish", {"x": X3 * 4}),
    "PRelu": graph("PRelu", {"x": X4}, {"s": rand(4, 1, 1)}),
    "Elu": graph("Elu", {"x": X3}, alpha=0.7),
    "Selu": graph("Selu", {"x": X3}),
    "Celu": graph("Celu", {"x": X3}, alpha=1.5),
    "Softplus": graph("Softplus", {"x": X3}),
    "Softsign": graph("Softsign", {"x": X3}),
    "Mish": graph("Mish", {"x": X3}),
    "ThresholdedRelu": graph("ThresholdedRelu", {"x": X3}, alpha=0.5),
    "Floor": graph("Floor", {"x": X3 * 3}),
    "Ceil": graph("Ceil", {"x": X3 * 3}),
    "Round": graph("Round", {"x": np.array([0.5, 1.5, -2.5, 2.4], np.float32)}),
    "Sign": graph("Sign", {"x": X3}),
    "Sin": graph("Sin", {"x": X3}),
    "Cos": graph("Cos", {"x": X3}),
    "Not": graph("Not", {"x": X3 > 0}, out=BOOL),
    "IsNaN": graph("IsNaN", {"x": np.array([1.0, np.nan], np.float32)}, out=BOOL),
    "Max": graph("Max", {"a": X3, "b": rand(6), "c": rand(5, 1)}),
    "Min": graph("Min", {"a": X3, "b": rand(6)}),
    "Sum": graph("Sum", {"a": X3, "b": rand(6), "c": rand(5, 1)}),
    "Mean": graph("Mean", {"a": X3, "b": rand(6)}),
    "Equal": graph("Equal", {"a": X3.round(), "b": rand(6).round()}, out=BOOL),
    "Less": graph("Less", {"a": X3, "b": rand(6)}, out=BOOL),
    "Greater": graph("Greater", {"a": X3, "b": rand(6)}, out=BOOL),
    "LessOrEqual": graph("LessOrEqual", {"a": X3, "b": rand(6)}, out=BOOL),
    "GreaterOrEqual": graph("GreaterOrEqual", {"a": X3, "b": rand(6)}, out=BOOL),
    "And": graph("And", {"a": X3 > 0, "b": X3 > 0.5}, out=BOOL),
    "Or": graph("Or", {"a": X3 > 0, "b": X3 > 0.5}, out=BOOL),
    "Xor": graph("Xor", {"a": X3 > 0, "b": X3 > 0.5}, out=BOOL),
    "Where": graph("Where", {"c": X3 > 0, "a": X3, "b": rand(6)}),
    "Mod": graph("Mod", {"a": X3 * 5, "b": np.full(6, 1.5, np.float32)}, fmod=1),
    "ReduceMin": graph("ReduceMin", {"x": X3}, {"a": ints(1)}, keepdims=0),
    "ReduceProd": graph("ReduceProd", {"x": X3}, {"a": ints(0, 2)}),
    "ReduceL1": graph("ReduceL1", {"x": X3}, {"a": ints(-1)}),
    "ReduceL2": graph("ReduceL2", {"x": X3}, {"a": ints(1)}),
    "ReduceSumSquare": graph("ReduceSumSquare", {"x": X3}),
    "ReduceLogSumExp": graph("ReduceLogSumExp", {"x": X3}, {"a": ints(2)}, keepdims=0),
    "ReduceLogSum": graph("ReduceLogSum", {"x": np.abs(X3) + 0.1}, {"a": ints(1)}),
    "ArgMax": graph("ArgMax", {"x": X3}, out=INT64, axis=2, keepdims=0),
    "ArgMin-last": graph("ArgMin", {"x": X3.round()}, out=INT64, axis=1, select_last_index=1),
    "InstanceNormalization": graph(
        "InstanceNormalization", {"x": X4}, {"s": rand(4), "b": rand(4)}
    ),
    "GroupNormalization": graph(
        "GroupNormalization", {"x": X4}, {"s": rand(4), "b": rand(4)}, opset=21, num_groups=2
    ),
    "LpNormalization": graph("LpNormalization", {"x": X3}, axis=1, p=1),
    "Pad-constant": graph(
        "Pad", {"x": X4}, {"p": ints(0, 0, 1, 2, 0, 0, 3, 0), "v": np.float32(0.5)}
    ),
    "Pad-reflect": graph("Pad", {"x": X4}, {"p": ints(0, 0, 2, 1, 0, 0, 1, 3)}, mode="reflect"),
    "Pad-edge-axes": graph(
        "Pad", {"x": X4}, {"p": ints(2, 1), "v": np.float32(0), "a": ints(-1)}, mode="edge"
    ),
    "Tile": graph("Tile", {"x": X3}, {"r": ints(1, 2, 3)}),
    "DepthToSpace-DCR": graph("DepthToSpace", {"x": rand(2, 8, 3, 4)}, blocksize=2),
    "DepthToSpace-CRD": graph("DepthToSpace", {"x": rand(2, 8, 3, 4)}, blocksize=2, mode="CRD"),
    "SpaceToDepth": graph("SpaceToDepth", {"x": rand(2, 3, 4, 6)}, blocksize=2),
    "Einsum": graph("Einsum", {"a": X3, "b": rand(2, 6, 3)}, equation="bij, bjk -> bik"),
    "Range": graph("Range", {}, {"s": np.float32(1), "l": np.float32(7), "d": np.float32(1.5)}),
    "CumSum": graph("CumSum", {"x": X3}, {"a": ints(1)}),
    "CumSum-reverse-exclusive": graph("CumSum", {"x": X3}, {"a": ints(2)}, reverse=1, exclusive=1),
    "GatherElements": graph(
        "GatherElements", {"x": X3}, {"i": RNG.integers(-6, 6, (2, 5, 3))}, axis=2
    ),
}
for _op in ("Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Atanh"):
    CASES[_op] = graph(_op, {"x": np.tanh(X3) * 0.9})
CASES["Acosh"] = graph("Acosh", {"x": np.abs(X3) + 1.5})
CASES["Shrink"] = graph("Shrink", {"x": X3}, lambd=0.4, bias=0.1)
CASES["Hardmax"] = graph("Hardmax", {"x": X3}, axis=1)
CASES["TopK"] = graph("TopK", {"x": X3}, {"k": ints(3)}, indices=True, axis=1)
CASES["LRN"] = graph("LRN", {"x": X4}, size=3, alpha=1e-2, beta=0.7, bias=1.5)
CASES["Trilu"] = graph("Trilu", {"x": X3}, {"k": ints(1)}, upper=0)
CONV = {"w": rand(3, 4, 3, 3), "b": rand(3)}
for _mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
    for _strides in ([1, 1], [2, 3]):
        _key = f"{_mode}-{_strides[0]}x{_strides[1]}"
        CASES[f"Conv-{_key}"] = graph("Conv", {"x": X4}, CONV, auto_pad=_mode, strides=_strides)
        CASES[f"MaxPool-{_key}"] = graph(
            "MaxPool",
            {"x": X4},
            kernel_shape=[3, 2 if _strides == [1, 1] else 3],
            auto_pad=_mode,
            strides=_strides,
        )
        CASES[f"AveragePool-{_key}"] = graph(
            "AveragePool", {"x": X4}, kernel_shape=[3, 3], auto_pad=_mode, strides=_strides
        )
CASES["AveragePool-asymmetric-pads"] = graph(
    "AveragePool", {"x": X4}, kernel_shape=[3, 3], pads=[0, 1, 2, 1]
)


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name: str) -> None:
    model, feeds = CASES[name]
    assert model.graph.node[0].op_type in HANDLERS
    expected, *others = Runner(model)(feeds)
    floats = {
        k: torch.from_numpy(v).requires_grad_(v.dtype == np.float32) for k, v in feeds.items()
    }
    actual, *more = convert(model)(floats)
    for e, a in zip(others, more, strict=True):
        np.testing.assert_array_equal(a.numpy(), e)
    assert tuple(actual.shape) == expected.shape, name
    np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    if actual.requires_grad:
        actual.sum().backward()
        grads = [t.grad for t in floats.values() if t.requires_grad]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), name


def refused_ops() -> list[str]:
    """Float-capable ai.onnx ops of the latest opset that the converter has no handler for."""
    names = {
        schema.name
        for schema in onnx.defs.get_all_schemas()
        if schema.domain == "" and not schema.deprecated
    }
    return sorted(names - set(HANDLERS))


def test_the_docs_list_exactly_the_refused_ops() -> None:
    section = DOC.read_text().split("## Ops the converter refuses", 1)[1].split("\n## ", 1)[0]
    listed = sorted(re.findall(r"`([A-Za-z0-9]+)`", section))
    assert listed == refused_ops(), (
        "docs/DISTILL.md is out of date; the refused ops are: "
        + ", ".join(f"`{n}`" for n in refused_ops())
    )
