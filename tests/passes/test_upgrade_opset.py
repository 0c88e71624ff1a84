"""upgrade-opset: an old model converted by onnx's version converter to a newer opset
(Upsample -> Resize), verified on onnxruntime like any lossless pass; newer models are left
alone, bad options are named, and a model the converter cannot take is refused with its
complaint. The compile-time use (backends/tvm/prepare.py) is tested in
tests/backends/tvm/test_old_opsets.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from old_opsets import run, upsample_model
from onnx import TensorProto, helper, numpy_helper
from onnxpress.passes.upgrade_opset import UpgradeOpset, UpgradeOpsetOptions

import onnxpress
from onnxpress.core.context import PassContext
from onnxpress.core.ir import to_graph


@pytest.mark.parametrize("opset", [7, 8, 9, 10])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_upsample_becomes_resize_with_the_same_outputs(opset: int, mode: str) -> None:
    model = upsample_model(opset, mode)
    upgraded, report = onnxpress.optimize(model, passes="upgrade-opset")  # verified on ORT
    assert [(o.domain, o.version) for o in upgraded.opset_import] == [("", 13)]
    ops = [n.op_type for n in upgraded.graph.node]
    assert "Upsample" not in ops and "Resize" in ops
    result = report.passes[0].result
    assert result.counts == {"upgraded": 1}
    assert result.details == [{"opset_upgraded": {"from": opset, "to": 13}}]
    x = np.random.default_rng(1).normal(size=(1, 3, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(run(upgraded, x), run(model, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_fractional_scales_keep_upsample_s_coordinates(mode: str) -> None:
    """x1.5 and x2.5: nearest rounds the input coordinate x / scale down, as Upsample did."""
    model = upsample_model(9, mode, (1.5, 2.5))
    upgraded, _ = onnxpress.optimize(model, passes="upgrade-opset")
    (resize,) = [n for n in upgraded.graph.node if n.op_type == "Resize"]
    attrs = {a.name: a.s.decode() for a in resize.attribute if a.type == onnx.AttributeProto.STRING}
    assert attrs["coordinate_transformation_mode"] == "asymmetric"
    assert attrs.get("nearest_mode") == ("floor" if mode == "nearest" else None)
    x = np.random.default_rng(2).normal(size=(1, 3, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(run(upgraded, x), run(model, x), rtol=1e-6, atol=1e-6)


def test_models_at_or_above_the_limit_are_left_alone() -> None:
    model = upsample_model(9)
    kept, report = onnxpress.optimize(model, passes="upgrade-opset{below=9}")
    assert [n.op_type for n in kept.graph.node] == ["Conv", "Upsample", "Relu"]
    assert not report.passes[0].result.changed
    newer = helper.make_model(model.graph, opset_imports=[helper.make_opsetid("", 17)])
    graph = to_graph(newer)
    ctx = PassContext(template=newer, original=newer)
    assert not UpgradeOpset(UpgradeOpsetOptions()).run(graph, ctx).changed


def test_a_conversion_the_converter_cannot_make_is_refused() -> None:
    """The version converter starts at opset 7: an opset-6 model is refused, not converted."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    ctx = PassContext(template=model, original=model)
    result = UpgradeOpset(UpgradeOpsetOptions()).run(to_graph(model), ctx)
    assert not result.changed
    assert [r.node for r in result.refusals] == ["<model>"]
    assert "starts at 7" in result.refusals[0].reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("upgrade-opset{to=7}", "to must be an opset in 8.."),
        ("upgrade-opset{to=13,below=14}", "below must be in 0..to"),
        ("upgrade-opset{to=x}", "to"),
    ],
)
def test_bad_options_are_named(text: str, message: str) -> None:
    with pytest.raises(Exception, match=message):
        onnxpress.optimize(upsample_model(9), passes=text)


def test_passes_after_an_upgrade_read_the_new_opset() -> None:
    """Squeeze-9 (axes an attribute) is Squeeze-13 (axes an input) after the upgrade; the
    fold that follows in the same pipeline evaluates it at opset 13 (ctx.opset_of), where
    reading the input model's opset it refused the node."""
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["c"], ["s"], axes=[0]),
            helper.make_node("Add", ["x", "s"], ["y"]),
        ],
        "squeeze",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(np.arange(3, dtype=np.float32).reshape(1, 1, 3), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    out, report = onnxpress.optimize(model, passes="upgrade-opset,fold-constants")
    fold = report.passes[1].result
    assert fold.counts.get("folded") == 1 and not fold.refusals
    assert [n.op_type for n in out.graph.node] == ["Add"]
