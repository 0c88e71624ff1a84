"""lower-einsum: Einsum becomes Transpose/Reshape/MatMul/ReduceSum, contracted pairwise with
the smallest intermediate first; results match onnxruntime's Einsum and numpy's einsum
(batched, attention-shaped, three operands with a constant, ellipses, implicit outputs,
outer products, sums, a plain transpose, float16 and float64); diagonals, broadcasting
letters and unknown shapes are refused with a reason."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnxpress.passes.lower_einsum import LowerEinsum, LowerEinsumOptions, parse_equation

import onnxpress

node = helper.make_node

# equation, input shapes, a constant input (index) or None, MatMuls after lowering
CASES = [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], None, 1),
    ("bihd,bjhd->bhij", [(1, 7, 4, 8), (1, 6, 4, 8)], None, 1),  # attention scores
    ("bhij,bjhd,hde->bie", [(1, 4, 6, 6), (1, 6, 4, 8), (4, 8, 5)], 2, 2),  # and readout
    ("...ij,...jk->...ik", [(2, 3, 4, 5), (2, 3, 5, 6)], None, 1),
    ("ij,jk", [(3, 4), (4, 5)], 1, 1),  # implicit output: ik
    ("i,j->ij", [(3,), (4,)], None, 1),  # an outer product (K = 1)
    ("bij,jk->bki", [(2, 3, 4), (4, 6)], 1, 1),  # a linear layer, transposed result
    ("abc,cd->", [(2, 3, 4), (4, 5)], None, 1),  # everything summed
    ("ijk->kj", [(2, 3, 4)], None, 0),  # a sum and a transpose
    ("ij->ij", [(3, 4)], None, 0),  # nothing to do: an Identity
]


def einsum_model(
    kit: SimpleNamespace,
    equation: str,
    shapes: list[tuple[int, ...]],
    constant: int | None,
    elem: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    names = [f"x{i}" for i in range(len(shapes))]
    inputs = {
        n: list(s) for i, (n, s) in enumerate(zip(names, shapes, strict=True)) if i != constant
    }
    inits = None
    if constant is not None:
        inits = {names[constant]: rng.standard_normal(shapes[constant]).astype(dtype)}
    return kit.model(
        [node("Einsum", names, ["y"], equation=equation, name="es")],
        inputs,
        {"y": None},
        inits,
        opset=17,
        input_type=elem,
    )


@pytest.mark.parametrize(("equation", "shapes", "constant", "matmuls"), CASES)
def test_lowered_einsum_matches_onnxruntime_and_numpy(
    kit: SimpleNamespace,
    equation: str,
    shapes: list[tuple[int, ...]],
    constant: int | None,
    matmuls: int,
) -> None:
    model = einsum_model(kit, equation, shapes, constant)
    lowered, report = onnxpress.optimize(model, passes="lower-einsum")  # verified on ORT
    assert "Einsum" not in kit.ops(lowered)
    assert kit.ops(lowered).count("MatMul") == matmuls
    assert report.passes[0].result.counts == {"einsum_lowered": 1, "matmuls": matmuls}
    kit.same_outputs(model, lowered)
    feeds = kit.feeds(model)
    values = [feeds.get(f"x{i}") for i in range(len(shapes))]
    if constant is not None:
        values[constant] = kit.initializer(model, f"x{constant}")
    (got,) = kit.run_ort(lowered, feeds).values()
    np.testing.assert_allclose(got, np.einsum(equation, *values), rtol=1e-4, atol=1e-5)


def test_opset_12_sums_with_reduce_sum_s_attribute(kit: SimpleNamespace) -> None:
    model = kit.model(
        [node("Einsum", ["x0", "x1"], ["y"], equation="abc,cd->ad")],
        {"x0": [2, 3, 4], "x1": [4, 5]},
        {"y": None},
        opset=12,
    )
    lowered, _ = onnxpress.optimize(model, passes="lower-einsum")
    (reduce,) = [n for n in lowered.graph.node if n.op_type == "ReduceSum"]
    assert len(reduce.input) == 1 and [a.name for a in reduce.attribute] == ["axes", "keepdims"]
    kit.same_outputs(model, lowered)


def test_the_smallest_intermediate_is_contracted_first(kit: SimpleNamespace) -> None:
    """x0 [64, 2] . x1 [2, 64] . x2 [64, 3]: (x1 x2) is 2 x 3, (x0 x1) would be 64 x 64."""
    model = einsum_model(kit, "ij,jk,kl->il", [(64, 2), (2, 64), (64, 3)], None)
    lowered, _ = onnxpress.optimize(model, passes="lower-einsum")
    first = next(n for n in lowered.graph.node if n.op_type == "MatMul")
    assert list(first.input) == ["x1", "x2"]
    kit.same_outputs(model, lowered, rtol=1e-5)


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_other_float_types(kit: SimpleNamespace, elem: int) -> None:
    model = einsum_model(kit, "bhij,bjhd,hde->bie", CASES[2][1], 2, elem)
    lowered, _ = onnxpress.optimize(model, passes="lower-einsum")
    assert "Einsum" not in kit.ops(lowered)
    kit.same_outputs(model, lowered, rtol=5e-3 if elem == TensorProto.FLOAT16 else 1e-9)


@pytest.mark.parametrize(
    ("equation", "shapes", "reason"),
    [
        ("ii->i", [(3, 3)], "repeated letter"),
        ("ij,ij->ij", [(3, 4), (1, 4)], "broadcasting"),
        ("ij,jk->ik", [("n", 4), (4, 5)], "no static shape"),
    ],
)
def test_refusals_name_the_reason(
    kit: SimpleNamespace, equation: str, shapes: list[tuple[object, ...]], reason: str
) -> None:
    model = kit.model(
        [node("Einsum", [f"x{i}" for i in range(len(shapes))], ["y"], equation=equation)],
        {f"x{i}": list(s) for i, s in enumerate(shapes)},
        {"y": None},
    )
    lowered, result = kit.run_pass(LowerEinsum(LowerEinsumOptions()), model)
    assert kit.ops(lowered) == ["Einsum"]
    assert [r.node for r in result.refusals] == [model.graph.node[0].name]
    assert reason in result.refusals[0].reason


def test_parse_equation_expands_ellipses_and_implicit_outputs() -> None:
    assert parse_equation("...ij,...jk->...ik", [4, 3]) == (["ABij", "Bjk"], "ABik")
    assert parse_equation("ij,jk", [2, 2]) == (["ij", "jk"], "ik")
    assert parse_equation("b i d , b j d -> b i j", [3, 3]) == (["bid", "bjd"], "bij")
    with pytest.raises(ValueError, match="does not match"):
        parse_equation("ij->i", [3])
