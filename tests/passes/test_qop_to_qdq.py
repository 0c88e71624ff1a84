"""qop-to-qdq: onnxruntime's QOperator int8 ops (QLinearConv, QLinearAdd,
QLinearGlobalAveragePool, QGemm) become DequantizeLinear -> float op -> QuantizeLinear.
onnxruntime fuses the groups back into its integer kernels, so the result is bit-identical
run as users run it (the pass's verification) and one quantization step away without the
fusions (why the pass runs its checks optimized); a channels-last pool is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxpress.passes.qop_to_qdq import MS, QopToQdq, QopToQdqOptions
from qop_models import SHAPE, qoperator_net

import onnxpress
from onnxpress.core import manager
from onnxpress.core.context import PassContext
from onnxpress.core.ir import to_graph
from onnxpress.core.targets import TARGETS, host_target


def run(
    model: onnx.ModelProto, x: np.ndarray, optimized: bool = True, exact_int8: bool = False
) -> np.ndarray:
    options = ort.SessionOptions()
    if exact_int8:  # onnxruntime's u8 x u8 kernels where its u8 x s8 ones saturate int16 pairs
        options.add_session_config_entry("session.x64quantprecision", "1")
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_quantized_operators_become_qdq_groups_with_identical_outputs(tmp_path: Path) -> None:
    model = qoperator_net(tmp_path)
    converted, report = onnxpress.optimize(model, passes="qop-to-qdq")  # verified
    result = report.passes[0].result
    assert result.counts == {
        "QLinearConv": 2,
        "QLinearAdd": 1,
        "QLinearGlobalAveragePool": 1,
        "QGemm": 1,
        "MaxPool on bytes": 1,
    }
    ops = [n.op_type for n in converted.graph.node]
    assert [n.op_type for n in model.graph.node].count("MaxPool") == 1
    (pool,) = [n for n in converted.graph.node if n.op_type == "MaxPool"]
    producers = {o: n.op_type for n in converted.graph.node for o in n.output}
    consumers = [n.op_type for n in converted.graph.node if pool.output[0] in n.input]
    assert producers[pool.input[0]] == "DequantizeLinear" and consumers == ["QuantizeLinear"]
    assert not [op for op in ops if op.startswith("QLinear") or op == "QGemm"]
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 1
    weight_dq = [
        n for n in converted.graph.node if n.op_type == "DequantizeLinear" and "_dq" in n.name
    ]
    assert any(a.name == "axis" for n in weight_dq for a in n.attribute)  # per-channel weights
    x = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
    # on x86 without VNNI, onnxruntime runs the s8 QOperator ops exactly but the QDQ form on
    # its u8 x s8 kernels, whose int16 pair sums saturate: identical on its exact kernels
    exact = host_target().saturates
    np.testing.assert_array_equal(run(converted, x, exact_int8=exact), run(model, x))
    assert [o.name for o in converted.graph.output] == ["y"]


def test_per_tensor_weights_convert(tmp_path: Path) -> None:
    """A QLinearConv with one weight scale: its bias scale (x_scale * w_scale) came out a numpy
    scalar, which onnx-graphsurgeon refused, and the pass failed on every such model."""
    model = qoperator_net(tmp_path, per_channel=False)
    converted, report = onnxpress.optimize(model, passes="qop-to-qdq")  # verified
    assert report.passes[0].result.counts["QLinearConv"] == 2
    x = np.random.default_rng(5).normal(size=SHAPE).astype(np.float32)
    exact = host_target().saturates  # as in the first test
    np.testing.assert_array_equal(run(converted, x, exact_int8=exact), run(model, x))


def test_where_int8_kernels_saturate_the_check_runs_onnxruntimes_exact_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On x86 without VNNI, onnxruntime picks its kernels by format: the QDQ form of an s8
    QOperator model ran 2.3% away from it (saturated pair sums), and compile refused the model
    there. The check compares both on exact kernels; on any CPU it holds as if it were one."""
    monkeypatch.setattr(manager, "host_target", lambda: TARGETS["avx2"])
    model = qoperator_net(tmp_path)
    _, report = onnxpress.optimize(model, passes="qop-to-qdq")
    assert report.passes[0].verification.value == 0.0


def test_without_onnxruntime_s_fusions_the_qdq_form_is_fake_quant(tmp_path: Path) -> None:
    """Why the pass is checked optimized: unfused, QDQ rounds in float (a step off)."""
    model = qoperator_net(tmp_path)
    converted, _ = onnxpress.optimize(model, passes="qop-to-qdq")
    x = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
    reference = run(model, x)
    unfused = run(converted, x, optimized=False)
    assert np.abs(unfused - reference).max() <= 0.05 * np.abs(reference).max()


def one_op_model(
    op: str, inputs: list[str], shapes: tuple[list[int], list[int]], **attrs: object
) -> onnx.ModelProto:
    """x -> QuantizeLinear (s, z) -> a com.microsoft ``op`` -> DequantizeLinear (s2, z2) -> y."""
    node = helper.make_node
    inits = {
        "s": np.array(0.05, np.float32),
        "z": np.array(128, np.uint8),
        "s2": np.array(0.1, np.float32),
        "z2": np.array(0, np.uint8),
    }
    graph = helper.make_graph(
        [
            node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            node(op, inputs, ["m"], domain="com.microsoft", name="op", **attrs),
            node("DequantizeLinear", ["m", "s2", "z2"], ["y"]),
        ],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shapes[0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shapes[1])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    imports = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=imports)


def test_a_channels_last_pool_is_refused() -> None:
    model = one_op_model(
        "QLinearGlobalAveragePool",
        ["q", "s", "z", "s2", "z2"],
        ([1, 4, 4, 3], [1, 1, 1, 3]),
        channels_last=1,
    )
    ctx = PassContext(template=model, original=model)
    result = QopToQdq(QopToQdqOptions()).run(to_graph(model), ctx)
    assert not result.changed
    assert [(r.node, r.reason) for r in result.refusals] == [
        ("op", "channels_last=1 (a channels-last pool)")
    ]


def test_a_tensor_taken_twice_gets_two_dequantizes() -> None:
    """QLinearMul(q, q): a square; each operand's DequantizeLinear has its own name."""
    model = one_op_model("QLinearMul", ["q", "s", "z", "q", "s", "z", "s2", "z2"], ([2, 16],) * 2)
    converted, report = onnxpress.optimize(model, passes="qop-to-qdq")  # verified
    assert report.passes[0].result.counts == {"QLinearMul": 1}
    names = [n.name for n in converted.graph.node if n.op_type == "DequantizeLinear"]
    assert len(names) == len(set(names)) == 3  # two operands and the output's


def resize_on_bytes(mode: str) -> onnx.ModelProto:
    """x -> QuantizeLinear -> Resize x2 (``mode``) on the uint8 bytes -> DequantizeLinear."""
    node = helper.make_node
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "z"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    graph = helper.make_graph(
        [
            node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            node("Resize", ["q", "", "scales"], ["r"], mode=mode, name="up"),
            node("DequantizeLinear", ["r", "s", "z"], ["y"]),
        ],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_nearest_resize_on_bytes_is_wrapped_and_a_linear_one_refused() -> None:
    converted, report = onnxpress.optimize(resize_on_bytes("nearest"), passes="qop-to-qdq")
    assert report.passes[0].result.counts == {"Resize on bytes": 1}
    ops = [n.op_type for n in converted.graph.node]
    quantize, dequantize = "QuantizeLinear", "DequantizeLinear"
    assert ops == [quantize, dequantize, "Resize", quantize, dequantize]
    x = np.random.default_rng(5).normal(size=(1, 3, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(
        run(converted, x, optimized=False), run(resize_on_bytes("nearest"), x)
    )
    linear = resize_on_bytes("linear")
    ctx = PassContext(template=linear, original=linear)
    result = QopToQdq(QopToQdqOptions()).run(to_graph(linear), ctx)
    assert not result.changed
    assert [r.reason for r in result.refusals] == [
        "a Resize on quantized bytes that is not nearest"
    ]


@pytest.mark.parametrize(("opset", "axis"), [(11, 1), (13, 1), (11, -1)])
def test_qlinear_softmax_keeps_the_meaning_of_the_softmax_it_replaced(
    opset: int, axis: int
) -> None:
    """Before opset 13 a Softmax over axis 1 of a [2, 3, 4] input normalizes each row of 12
    (the input flattened at axis 1); from 13 on, each column of 3. The converted model (graph
    opset 17) computes what onnxruntime's QLinearSoftmax did, within one output step."""
    model = one_op_model(
        "QLinearSoftmax", ["q", "s", "z", "s2", "z2"], ([2, 3, 4], [2, 3, 4]),
        opset=opset, axis=axis,
    )  # fmt: skip
    model.graph.initializer[2].CopyFrom(
        numpy_helper.from_array(np.array(1 / 256, np.float32), "s2")
    )
    converted, report = onnxpress.optimize(model, passes="qop-to-qdq")  # verified
    assert report.passes[0].result.counts == {"QLinearSoftmax": 1}
    ops = [n.op_type for n in converted.graph.node]
    assert ("Flatten" in ops) == (opset == 11 and axis == 1)
    x = np.random.default_rng(6).normal(size=(2, 3, 4)).astype(np.float32) * 2
    got, expected = run(converted, x, optimized=False), run(model, x)
    assert np.abs(got - expected).max() <= 1 / 256 + 1e-7
    rows = expected.reshape(2, 12).sum(axis=1) if opset == 11 and axis == 1 else None
    if rows is not None:  # each flattened row sums to 1 (within the output steps)
        np.testing.assert_allclose(rows, 1.0, atol=12 / 256)


def test_an_opset_11_model_with_per_channel_weights_is_upgraded_first(tmp_path: Path) -> None:
    """quantize_static keeps an opset-11 model at 11 (QLinearConv takes per-channel scales
    there); the per-channel DequantizeLinear needs 13, so the pass upgrades the model before
    it rewrites a node (afterwards, the rewritten nodes broke the upgrade's export)."""
    model = qoperator_net(tmp_path, opset=11)
    assert model.opset_import[0].version == 11
    converted, report = onnxpress.optimize(model, passes="qop-to-qdq")  # verified
    assert report.passes[0].result.counts["QLinearConv"] == 2
    assert {o.domain: o.version for o in converted.opset_import}[""] == 13
    x = np.random.default_rng(7).normal(size=SHAPE).astype(np.float32)
    exact = host_target().saturates  # as in the first test
    np.testing.assert_array_equal(run(converted, x, exact_int8=exact), run(model, x))


def test_unnamed_nodes_get_distinct_names() -> None:
    """Two unnamed QLinearMul (dynamo exports leave quantized ops unnamed): each group's
    tensors are named apart (both had written 'QLinearMul/float')."""
    model = one_op_model("QLinearMul", ["q", "s", "z", "q", "s", "z", "s2", "z2"], ([2, 16],) * 2)
    first = model.graph.node[1]
    first.name = ""
    second = onnx.NodeProto()
    second.CopyFrom(first)
    second.input[0], second.input[3] = "m", "m"
    second.input[1], second.input[2] = "s2", "z2"
    second.output[0] = "m2"
    model.graph.node.insert(2, second)
    model.graph.node[3].input[0] = "m2"
    converted, report = onnxpress.optimize(model, passes="qop-to-qdq")  # verified
    assert report.passes[0].result.counts == {"QLinearMul": 2}
    outputs = [o for n in converted.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))


def pool_chain() -> onnx.ModelProto:
    """x -> Q -> DQ -> MaxPool (a) -> MaxPool (b) -> Q -> DQ -> y1, and a -> Q -> DQ -> y2:
    onnxruntime's QOperator googlenet pools this way (a float pool feeding another pool)."""
    node = helper.make_node
    pool = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    graph = helper.make_graph(
        [
            node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            node("MaxPool", ["d"], ["a"], name="a", **pool),
            node("MaxPool", ["a"], ["b"], name="b", **pool),
            node("QuantizeLinear", ["b", "s", "z"], ["qb"]),
            node("DequantizeLinear", ["qb", "s", "z"], ["y1"]),
            node("QuantizeLinear", ["a", "s", "z"], ["qa"]),
            node("DequantizeLinear", ["qa", "s", "z"], ["y2"]),
        ],
        "pools",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 6, 6]) for y in ("y1", "y2")],
        [
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(120, np.uint8), "z"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_float_pool_feeding_a_pool_is_requantized_exactly() -> None:
    model = pool_chain()
    converted, report = onnxpress.optimize(model, passes="qop-to-qdq")  # verified
    assert report.passes[0].result.counts == {"MaxPool requantized": 1}
    producers = {o: n.op_type for n in converted.graph.node for o in n.output}
    pools = [n for n in converted.graph.node if n.op_type == "MaxPool"]
    assert [producers[p.input[0]] for p in pools] == ["DequantizeLinear"] * 2
    x = np.random.default_rng(8).normal(size=(1, 4, 6, 6)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def outputs(m: onnx.ModelProto) -> list[np.ndarray]:
        session = ort.InferenceSession(m.SerializeToString(), options, ["CPUExecutionProvider"])
        return [np.asarray(y) for y in session.run(None, {"x": x})]

    for got, expected in zip(outputs(converted), outputs(model), strict=True):
        np.testing.assert_array_equal(got, expected)  # fake-quant too: exact


def conv_pair_qdq(folder: Path) -> tuple[onnx.ModelProto, np.ndarray]:
    """Conv 128 -> 128 -> Relu -> Conv 128 -> 128 at 16 x 16, quantized by quantize_static in
    its QDQ format, and an input on which its float fake-quant run (graph optimizations off)
    differs from its integer kernels."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(10)
    shape = (1, 128, 16, 16)

    def weight(name: str) -> onnx.TensorProto:
        values = rng.normal(size=(128, 128, 3, 3)) / np.sqrt(9 * 128)
        return numpy_helper.from_array(values.astype(np.float32), name)

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        [weight("w1"), weight("w2")],
    )
    source, target = folder / "pair.onnx", folder / "pair.qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = 4

        def get_next(self) -> dict[str, np.ndarray] | None:
            self.left -= 1
            return None if self.left < 0 else {"x": rng.normal(size=shape).astype(np.float32)}

    quantize_static(source, target, Batches(), quant_format=QuantFormat.QDQ, per_channel=True)
    return onnx.load(target), rng.normal(size=shape).astype(np.float32)


def test_a_qdq_model_is_checked_against_its_input_as_users_run_it(tmp_path: Path) -> None:
    """quantize_static's QDQ format through the pass (compile runs it on every model): the
    pass is checked optimized, and so is its input. Run unoptimized, the input is float
    fake-quant, a step away in places; the check had compared against that and refused
    onnxruntime's own QDQ resnet18 in compile (docs/BENCHMARKS.md, run 27)."""
    model, x = conv_pair_qdq(tmp_path)
    assert np.abs(run(model, x, optimized=False) - run(model, x)).max() > 0
    converted, _ = onnxpress.optimize(model, passes="qop-to-qdq", calibration=[{"x": x}])
    np.testing.assert_array_equal(run(converted, x), run(model, x))


def contrib_qdq_conv(bits: int, opset: int) -> onnx.ModelProto:
    """x -> com.microsoft Q/DQ (uint{bits} activations) -> Conv of com.microsoft-dequantized
    per-channel int8 weights -> com.microsoft Q/DQ -> y, as onnxruntime's quantizer writes
    16-bit models below opset 21 (UseQDQContribOps)."""
    rng = np.random.default_rng(0)
    act = np.uint16 if bits == 16 else np.uint8
    weights = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.float32(0.02 if bits == 8 else 0.0001), "xs"),
        numpy_helper.from_array(act(2**bits // 2), "xz"),
        numpy_helper.from_array(weights, "wq"),
        numpy_helper.from_array(rng.uniform(0.001, 0.01, 4).astype(np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
        numpy_helper.from_array(np.float32(0.05 if bits == 8 else 0.0004), "ys"),
        numpy_helper.from_array(act(2**bits // 2), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], domain=MS, name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xf"], domain=MS, name="dq_x"),
        helper.make_node(
            "DequantizeLinear", ["wq", "ws", "wz"], ["w"], domain=MS, axis=0, name="dq_w"
        ),
        helper.make_node("Conv", ["xf", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"], domain=MS, name="q_c"),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"], domain=MS, name="dq_c"),
    ]
    graph = helper.make_graph(
        nodes,
        "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("bits,opset,upgraded", [(16, 17, 21), (8, 17, 17), (16, 21, 21)])
def test_contrib_quantizers_become_onnx_ones(bits: int, opset: int, upgraded: int) -> None:
    model = contrib_qdq_conv(bits, opset)
    result, report = onnxpress.optimize(model, passes="qop-to-qdq")  # verified: exact
    counts = report.passes[0].result.counts
    assert counts == {f"{MS} QuantizeLinear": 2, f"{MS} DequantizeLinear": 3}
    assert not any(n.domain for n in result.graph.node)
    assert {o.domain: o.version for o in result.opset_import}[""] == upgraded
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run(result, x), run(model, x))
