"""int8 emulation: the saturating pair sums against a brute-force loop, and whole QDQ models
against onnxruntime's own integer kernels on this CPU (whichever kind it is), and, where
qemu-x86_64 is installed, against onnxruntime's AVX2 kernels run under ``-cpu Haswell``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.int8_emulation import layer_output, saturating_matmul
from onnxpress.core.int8_layers import IntegerLayer, Quantized, integer_layers
from onnxpress.core.targets import EXACT, PAIR_SATURATING, host_target


def test_saturating_matmul_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(100, 256, (7, 9))
    w = rng.integers(-60, 128, (9, 5))
    padded_x, padded_w = np.pad(x, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    expected = np.zeros((7, 5))
    for pair in range(5):
        rows = slice(2 * pair, 2 * pair + 2)
        expected += np.clip(padded_x[:, rows] @ padded_w[rows], -32768, 32767)
    np.testing.assert_array_equal(saturating_matmul(x, w), expected)
    assert not np.array_equal(expected, x @ w)  # the data does saturate


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def qdq_model(seed: int = 0) -> onnx.ModelProto:
    """Conv (3 input channels, odd, padded, strided) -> Relu -> grouped Conv -> MatMul, all
    int8 with large same-sign weights and bright activations, so AVX2 pairs saturate."""
    rng = np.random.default_rng(seed)

    def weights(shape: tuple[int, ...]) -> np.ndarray:
        magnitude = rng.integers(40, 128, shape)
        sign = np.where(rng.random((shape[0],) + (1,) * (len(shape) - 1)) < 0.5, -1, 1)
        return (magnitude * sign).astype(np.int8)

    inits = [
        _init("s_in", np.array(0.02, np.float32)),
        _init("z_in", np.array(3, np.uint8)),
        _init("w1", weights((8, 3, 3, 3))),
        _init("s_w1", np.full(8, 0.01, np.float32)),
        _init("z_w1", np.zeros(8, np.int8)),
        _init("b1", rng.integers(-500, 500, 8).astype(np.int32)),
        _init("s_b1", np.full(8, 0.0002, np.float32)),
        _init("s_h", np.array(0.5, np.float32)),
        _init("z_h", np.array(0, np.uint8)),
        _init("w2", weights((8, 4, 3, 3))),
        _init("s_w2", np.full(8, 0.004, np.float32)),
        _init("z_w2", np.zeros(8, np.int8)),
        _init("s_g", np.array(0.8, np.float32)),
        _init("z_g", np.array(128, np.uint8)),
        _init("w3", weights((8 * 4 * 4, 6))),
        _init("s_w3", np.full(6, 0.003, np.float32)),
        _init("z_w3", np.zeros(6, np.int8)),
        _init("shape", np.array([0, -1], np.int64)),
    ]
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["x", "s_in", "z_in"], ["xq"]),
        node("DequantizeLinear", ["xq", "s_in", "z_in"], ["xd"]),
        node("DequantizeLinear", ["w1", "s_w1", "z_w1"], ["w1d"], axis=0),
        node("DequantizeLinear", ["b1", "s_b1"], ["b1d"], axis=0),
        node("Conv", ["xd", "w1d", "b1d"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["c1"], ["r1"]),
        node("QuantizeLinear", ["r1", "s_h", "z_h"], ["hq"]),
        node("DequantizeLinear", ["hq", "s_h", "z_h"], ["hd"]),
        node("DequantizeLinear", ["w2", "s_w2", "z_w2"], ["w2d"], axis=0),
        node("Conv", ["hd", "w2d"], ["c2"], name="conv2", group=2, pads=[1, 1, 1, 1]),
        node("QuantizeLinear", ["c2", "s_g", "z_g"], ["gq"]),
        node("DequantizeLinear", ["gq", "s_g", "z_g"], ["gd"]),
        node("Reshape", ["gd", "shape"], ["flat"]),
        node("QuantizeLinear", ["flat", "s_g", "z_g"], ["fq"]),
        node("DequantizeLinear", ["fq", "s_g", "z_g"], ["fd"]),
        node("DequantizeLinear", ["w3", "s_w3", "z_w3"], ["w3d"], axis=1),
        node("MatMul", ["fd", "w3d"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "saturating",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bright_inputs(seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(3.5, 5.0, (2, 3, 8, 8)).astype(np.float32)}


def onnxruntime_default(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feed)[0])


def test_layers_found() -> None:
    layers = integer_layers(qdq_model())
    assert [layer.name for layer in layers] == ["conv1", "conv2", "head"]
    assert layers[0].bias_int32 is not None and layers[1].groups == 2


def test_emulation_of_this_cpu_matches_onnxruntime() -> None:
    """The host's kind (VNNI: exact; AVX2: pair-saturating) within one output step."""
    model, feed = qdq_model(), bright_inputs()
    host = onnxruntime_default(model, feed)
    own = EmulatedRunner(model, host_target().arithmetic)(feed)[0]
    other_kind = PAIR_SATURATING if host_target().arithmetic == EXACT else EXACT
    other = EmulatedRunner(model, other_kind)(feed)[0]
    scale = float(np.abs(host).max())
    step = 2 * 0.8 * 0.003 * 4 * 4 * 4  # a few activation steps through the head
    assert np.abs(own - host).max() <= step
    # the two arithmetics differ by far more on this model: the check above can fail
    assert np.abs(other - host).max() > 0.05 * scale


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-x86_64 not installed")
def test_pair_saturating_emulation_matches_onnxruntime_avx2_under_qemu(tmp_path: Path) -> None:
    """Also: the same layers with u8 weights (fix-saturation{remedy=u8}) run exactly there."""
    model, feed = qdq_model(), bright_inputs()
    widened, _ = onnxpress.optimize(
        model, "fix-saturation{remedy=u8}", [feed], targets=["avx2"], verify="structure"
    )
    assert any(layer.weight.dtype == np.uint8 for layer in integer_layers(widened))
    onnx.save(model, tmp_path / "m.onnx")
    onnx.save(widened, tmp_path / "u8.onnx")
    np.savez(tmp_path / "x.npz", **feed)
    script = (
        "import numpy as np, onnxruntime as ort, sys\n"
        "x = dict(np.load(sys.argv[1]))\n"
        "for path in sys.argv[2:]:\n"
        "    s = ort.InferenceSession(path, providers=['CPUExecutionProvider'])\n"
        "    np.save(path + '.npy', s.run(None, x)[0])\n"
    )
    subprocess.run(
        [
            *("qemu-x86_64", "-cpu", "Haswell", sys.executable, "-c", script),
            *(str(tmp_path / name) for name in ("x.npz", "m.onnx", "u8.onnx")),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    avx2 = np.load(tmp_path / "m.onnx.npy")
    emulated = EmulatedRunner(model, PAIR_SATURATING)(feed)[0]
    exact = EmulatedRunner(model, EXACT)(feed)[0]
    step = 2 * 0.8 * 0.003 * 4 * 4 * 4
    assert np.abs(emulated - avx2).max() <= step
    assert np.abs(exact - avx2).max() > 0.05 * float(np.abs(avx2).max())
    # u8 weights: AVX2's u8 x u8 kernel widens to int16 first, no pair saturates
    assert np.abs(np.load(tmp_path / "u8.onnx.npy") - exact).max() <= step


@pytest.mark.parametrize(
    ("channels", "multiplier", "kernel", "attributes"),
    [
        (8, 1, (3, 3), {"pads": [1, 1, 1, 1]}),
        (6, 2, (3, 3), {"strides": [2, 2], "pads": [0, 1, 1, 0]}),
        (5, 1, (5, 5), {"strides": [2, 2], "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        (4, 1, (3, 3), {"strides": [2, 2], "auto_pad": b"SAME_UPPER"}),
        (3, 3, (1, 3), {"pads": [0, 1, 0, 1]}),
    ],
)
def test_depthwise_taps_match_the_im2col_sums(
    channels: int, multiplier: int, kernel: tuple[int, int], attributes: dict[str, object]
) -> None:
    """Depthwise convs sum tap by tap over shifted images; the general im2col path (the
    property patched off) must give the very same floats, zero points and bias included."""
    rng = np.random.default_rng(channels)
    out = channels * multiplier
    weights = rng.integers(-128, 128, (out, 1, *kernel)).astype(np.int8)
    activation = Quantized(
        "xq", np.array(0.1, np.float32), np.array(7, np.uint8), None, np.dtype(np.uint8)
    )
    weight = Quantized(
        "wq",
        rng.uniform(0.01, 0.02, out).astype(np.float32),
        rng.integers(-3, 3, out).astype(np.int8),
        0,
        np.dtype(np.int8),
        value=weights,
    )
    layer = IntegerLayer(
        helper.make_node("Conv", ["a", "b"], ["y"], name="dw"),
        activation,
        weight,
        bias_int32=rng.integers(-100, 100, out).astype(np.int32),
        attributes={"group": channels, **attributes},
    )
    x = rng.integers(0, 256, (2, channels, 9, 11)).astype(np.uint8)
    assert layer.depthwise
    taps = layer_output(layer, x, None, EXACT)
    im2col = _general_sums(layer, x)
    assert taps.shape == im2col.shape and taps.dtype == np.float32
    np.testing.assert_array_equal(taps, im2col)


def _general_sums(layer: IntegerLayer, x: np.ndarray) -> np.ndarray:
    original = IntegerLayer.depthwise
    IntegerLayer.depthwise = property(lambda self: False)  # type: ignore[assignment,method-assign]
    try:
        return layer_output(layer, x, None, EXACT)
    finally:
        IntegerLayer.depthwise = original  # type: ignore[method-assign]


def test_float32_sums_are_taken_only_where_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact kinds sum in float32 while a bound on every partial sum is below 2**24:
    the same floats as the float64 product, layer by layer, on the whole model."""
    import onnxpress.core.int8_emulation as emulation

    model, feed = qdq_model(), bright_inputs()
    fast = EmulatedRunner(model, EXACT)(feed)[0]
    monkeypatch.setattr(emulation, "FLOAT32_EXACT", 0.0)  # float64 everywhere
    wide = EmulatedRunner(model, EXACT)(feed)[0]
    np.testing.assert_array_equal(fast, wide)
    layers = integer_layers(model)
    x = np.full((2, 3, 8, 8), 255, np.uint8)  # bound 27 * 252 * 127 < 2**24: float32 path
    monkeypatch.setattr(emulation, "FLOAT32_EXACT", float(1 << 24))
    layer_output(layers[0], x, None, EXACT)
    assert "centered32" in layers[0].cache


def test_a_replaced_layer_does_not_inherit_the_cached_weights() -> None:
    """saturation.py tries remedies with dataclasses.replace(layer, weight=...): the copy
    must compute with its own weights, not the matrices cached for the original."""
    import dataclasses

    layer = integer_layers(qdq_model())[0]
    x = bright_inputs()["x"].clip(0, 5).astype(np.uint8)
    before = layer_output(layer, x, None, EXACT)
    assert layer.cache
    assert layer.weight.value is not None
    flipped = dataclasses.replace(
        layer, weight=dataclasses.replace(layer.weight, value=-layer.weight.value)
    )
    assert flipped.cache == {} and flipped.cache is not layer.cache
    after = layer_output(flipped, x, None, EXACT)
    bias = layer_output(
        dataclasses.replace(
            layer, weight=dataclasses.replace(layer.weight, value=np.zeros_like(layer.weight.value))
        ),
        x,
        None,
        EXACT,
    )
    np.testing.assert_allclose(after - bias, -(before - bias), rtol=1e-5, atol=1e-5)
