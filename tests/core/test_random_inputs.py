"""Verification inputs the model accepts, and a lossless tolerance that fits the dtype."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.cli.main import main
from onnxpress.core.errors import OnnxpressError
from onnxpress.core.random_inputs import NeedsRealDataError, random_inputs
from onnxpress.core.verify import Runner, compare_lossless, lossless_tolerance

INT = TensorProto.INT64


def model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def vi(name: str, dtype: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


CONSUMERS = {
    "gather-embedding": (
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        [vi("ids", INT, ["b", 5])],
        [const("table", np.ones((3, 4), np.float32))],
        lambda a: 0 <= a.min() and a.max() < 3,
    ),
    "gather-axis-1": (
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=1)],
        [vi("ids", INT, [6])],
        [const("table", np.ones((9, 2), np.float32))],
        lambda a: a.max() < 2,
    ),
    "gathernd-columns": (
        [helper.make_node("GatherND", ["table", "ids"], ["y"])],
        [vi("ids", INT, [6, 2])],
        [const("table", np.ones((2, 5), np.float32))],
        lambda a: a[:, 0].max() < 2 and a[:, 1].max() < 5,
    ),
    "div-divisor": (
        [helper.make_node("Div", ["n", "ids"], ["y"])],
        [vi("ids", INT, [50])],
        [const("n", np.array(7, np.int64))],
        lambda a: a.min() >= 1,
    ),
    "expand-shape": (
        [helper.make_node("Expand", ["t", "ids"], ["y"])],
        [vi("ids", INT, [2])],
        [const("t", np.ones((3, 1), np.float32))],
        lambda a: list(a) == [1, 1],
    ),
    "reshape-shape": (
        [helper.make_node("Reshape", ["t", "ids"], ["y"])],
        [vi("ids", INT, [3])],
        [const("t", np.ones((3, 4), np.float32))],
        lambda a: list(a) == [-1, 1, 1],
    ),
    "cumsum-axis-through-cast": (
        [
            helper.make_node("Cast", ["ids"], ["i64"], to=INT),
            helper.make_node("CumSum", ["t", "i64"], ["y"]),
        ],
        [vi("ids", TensorProto.INT32, [])],
        [const("t", np.ones((3, 4), np.float32))],
        lambda a: 0 <= int(a) < 2,
    ),
    "onehot-indices": (
        [helper.make_node("OneHot", ["ids", "depth", "values"], ["y"])],
        [vi("ids", INT, [20])],
        [const("depth", np.array([3], np.int64)), const("values", np.array([0, 1], np.float32))],
        lambda a: a.min() >= 0 and a.max() < 3,
    ),
}


@pytest.mark.parametrize("name", sorted(CONSUMERS))
def test_integer_inputs_follow_their_consumers(name: str) -> None:
    nodes, inputs, inits, accepted = CONSUMERS[name]
    out = INT if name == "div-divisor" else TensorProto.FLOAT
    m = model(nodes, inputs, [vi("y", out, None)], inits)
    for feed in random_inputs(m, seed=1):
        assert accepted(feed["ids"]), feed["ids"]
        Runner(m)(feed)  # onnxruntime accepts them


def test_unconstrained_integers_keep_the_old_range(mlp_model: onnx.ModelProto) -> None:
    m = model(
        [helper.make_node("Neg", ["ids"], ["y"])], [vi("ids", INT, [100])], [vi("y", INT, [100])]
    )
    ids = random_inputs(m, seed=0)[0]["ids"]
    assert ids.min() == 0 and ids.max() == 3


def test_a_string_input_needs_real_data() -> None:
    m = model(
        [helper.make_node("Identity", ["s"], ["y"])],
        [vi("s", TensorProto.STRING, [2])],
        [vi("y", TensorProto.STRING, [2])],
    )
    with pytest.raises(NeedsRealDataError, match=r"input 's' is a string tensor.*--calibration"):
        random_inputs(m, seed=0)


def test_a_model_random_inputs_break_names_the_input_to_give() -> None:
    # The Squeeze axis must name a size-1 dim; no consumer rule makes one for 'n'.
    m = model(
        [helper.make_node("Squeeze", ["t", "n"], ["y"])],
        [vi("n", INT, [1])],
        [vi("y", TensorProto.FLOAT, ["d"])],
        [const("t", np.ones((2, 3), np.float32))],
    )
    with pytest.raises(OnnxpressError, match=r"input 'n'.*--calibration"):
        onnxpress.optimize(m, passes="cleanup")


def test_fp16_tolerance_is_the_dtype_rounding() -> None:
    assert lossless_tolerance(np.dtype(np.float32)) == 1e-5
    assert 1e-3 < lossless_tolerance(np.dtype(np.float16)) < 3e-3
    ref = np.linspace(-4, 4, 64).astype(np.float16)
    rounded = (ref.astype(np.float32) * (1 + 4e-4)).astype(np.float16)  # about one ulp
    assert compare_lossless(["y"], [[ref]], [[rounded]]).ok
    assert not compare_lossless(["y"], [[ref]], [[(ref * np.float16(1.01))]]).ok


BAD_FP16_PASS = '''
import numpy as np
import onnx_graphsurgeon as gs
from onnxpress import NoOptions, Pass, PassResult, register_pass

@register_pass("nudge-fp16-weight")
class Nudge(Pass[NoOptions]):
    """Claims to be lossless, but scales the largest fp16 weight by 1.01."""

    def run(self, graph, ctx):
        weight = graph.tensors()["w"]
        values = weight.values.copy()
        index = np.unravel_index(np.argmax(np.abs(values)), values.shape)
        values[index] = values[index] * np.float16(1.01)
        weight.values = values
        return PassResult({"nudged": 1})
'''


def fp16_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4)).astype(np.float16)
    w[3, 1] = 8.0  # the weight the bad pass changes dominates output column 1
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    return model(
        nodes,
        [vi("x", TensorProto.FLOAT16, ["b", 16])],
        [vi("y", TensorProto.FLOAT16, ["b", 4])],
        [const("w", w)],
    )


def test_one_fp16_weight_off_by_one_percent_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fp16.onnx"
    onnx.save(fp16_model(), str(path))
    (tmp_path / "bad.py").write_text(BAD_FP16_PASS)
    code = main(
        [
            "--plugin",
            str(tmp_path / "bad.py"),
            "optimize",
            str(path),
            "--passes",
            "fold-constants,nudge-fp16-weight",
            "-o",
            str(tmp_path / "o.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "verification failed after pass 'nudge-fp16-weight'" in err
    assert not (tmp_path / "o.onnx").exists()
    # the lossless default pipeline itself passes on the fp16 model
    assert main(["optimize", str(path), "-o", str(tmp_path / "ok.onnx")]) == 0
