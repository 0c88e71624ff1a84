"""fold-constants: constant subgraphs and static shapes become initializers; bombs are refused."""

from __future__ import annotations

import time
import tracemalloc
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxpress.passes import fold_constants
from onnxpress.passes.fold_constants import FoldConstants, FoldConstantsOptions

import onnxpress
from onnxpress import PassContext
from onnxpress.core.errors import PipelineError
from onnxpress.core.pipeline import parse_pipeline

node = helper.make_node


def test_constant_chain_folds_to_one_initializer(kit: SimpleNamespace) -> None:
    # y = x + sqrt(a * b) - concat(split(c)), where a is a Constant node: only x's ops stay.
    model = kit.model(
        [
            kit.const("a", [1.0, 4.0, 9.0, 16.0]),
            node("Mul", ["a", "b"], ["ab"], name="mul"),
            node("Sqrt", ["ab"], ["root"], name="sqrt"),  # reference evaluator path
            node("Add", ["x", "root"], ["xr"], name="add_x"),
            node("Split", ["c", "sizes"], ["c0", "c1"], axis=0, name="split"),
            node("Concat", ["c1", "c0"], ["cc"], axis=0, name="concat"),
            node("Sub", ["xr", "cc"], ["y"], name="sub_x"),
        ],
        inputs={"x": [2, 4]},
        outputs={"y": [2, 4]},
        initializers={
            "b": np.full(4, 4.0, np.float32),
            "c": np.arange(4, dtype=np.float32),
            "sizes": np.array([1, 3], np.int64),
        },
    )
    folded, report = onnxpress.optimize(model, passes="fold-constants")  # verified on ORT
    result = report.passes[0].result
    assert kit.ops(folded) == ["Add", "Sub"]
    assert result.counts == {"constant_nodes": 1, "folded": 4}
    assert result.refusals == []
    np.testing.assert_allclose(kit.initializer(folded, "root"), [2.0, 4.0, 6.0, 8.0])
    np.testing.assert_array_equal(kit.initializer(folded, "cc"), [1.0, 2.0, 3.0, 0.0])
    kit.same_outputs(model, folded)


@pytest.mark.parametrize("opset", [11, 17])
def test_shape_chain_folds_into_reshape(kit: SimpleNamespace, opset: int) -> None:
    # Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])) with x of static shape [2, 3, 4].
    unsqueeze = (
        node("Unsqueeze", ["d0"], ["d0u"], axes=[0], name="unsqueeze")
        if opset < 13
        else node("Unsqueeze", ["d0", "axes"], ["d0u"], name="unsqueeze")
    )
    model = kit.model(
        [
            node("Shape", ["x"], ["shape"], name="shape"),
            node("Gather", ["shape", "zero"], ["d0"], axis=0, name="gather"),
            unsqueeze,
            node("Concat", ["d0u", "minus_one"], ["target"], axis=0, name="concat"),
            node("Reshape", ["x", "target"], ["y"], name="reshape"),
        ],
        inputs={"x": [2, 3, 4]},
        outputs={"y": [2, 12]},
        initializers={"zero": np.array(0, np.int64), "minus_one": np.array([-1], np.int64)}
        | ({"axes": np.array([0], np.int64)} if opset >= 13 else {}),
        opset=opset,
    )
    folded, report = onnxpress.optimize(model, passes="fold-constants")
    assert kit.ops(folded) == ["Reshape"]
    assert report.passes[0].result.counts == {"shapes_folded": 1, "folded": 3}
    np.testing.assert_array_equal(kit.initializer(folded, "target"), [2, -1])
    inferred = onnx.shape_inference.infer_shapes(folded, data_prop=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 12]
    kit.same_outputs(model, folded)


def test_dynamic_batch_folds_only_the_static_slice(kit: SimpleNamespace) -> None:
    # Shape(x, start=1) of x[N, 3, 4] is static; the full Shape(x) is not and is left quietly.
    model = kit.model(
        [
            node("Shape", ["x"], ["tail"], start=1, name="tail_shape"),
            node("ReduceProd", ["tail"], ["features"], keepdims=1, name="prod"),
            node("Concat", ["minus_one", "features"], ["target"], axis=0, name="concat"),
            node("Reshape", ["x", "target"], ["y"], name="reshape"),
            node("Shape", ["x"], ["full"], name="full_shape"),
            node("Cast", ["full"], ["full_float"], to=TensorProto.FLOAT, name="cast"),
            node("ReduceSum", ["full_float"], ["z"], keepdims=0, name="sum"),
        ],
        inputs={"x": ["N", 3, 4]},
        outputs={"y": None, "z": None},
        initializers={"minus_one": np.array([-1], np.int64)},
    )
    folded, report = onnxpress.optimize(model, passes="fold-constants")
    result = report.passes[0].result
    assert sorted(kit.ops(folded)) == ["Cast", "ReduceSum", "Reshape", "Shape"]
    assert result.counts == {"shapes_folded": 1, "folded": 2}
    assert result.refusals == []
    np.testing.assert_array_equal(kit.initializer(folded, "target"), [-1, 12])
    kit.same_outputs(model, folded)


def test_folded_graph_output_keeps_its_name(kit: SimpleNamespace) -> None:
    model = kit.model(
        [
            kit.const("c1", [1.0, 2.0]),
            node("Add", ["x", "c1"], ["y"], name="add_x"),
            node("Mul", ["c1", "c2"], ["z"], name="mul_consts"),
        ],
        inputs={"x": [2]},
        outputs={"y": [2], "z": [2]},
        initializers={"c2": np.array([3.0, 5.0], np.float32)},
    )
    folded, report = onnxpress.optimize(model, passes="fold-constants")
    assert kit.ops(folded) == ["Add"]
    assert [o.name for o in folded.graph.output] == ["y", "z"]
    np.testing.assert_array_equal(kit.initializer(folded, "z"), [3.0, 10.0])
    assert report.passes[0].result.counts == {"constant_nodes": 1, "folded": 1}
    kit.same_outputs(model, folded)


def test_constant_node_attribute_forms_become_initializers(kit: SimpleNamespace) -> None:
    model = kit.model(
        [
            node("Constant", [], ["ints"], value_ints=[2, 2], name="k_ints"),
            node("Constant", [], ["scalar"], value_float=0.5, name="k_float"),
            node("Reshape", ["x", "ints"], ["x22"], name="reshape"),
            node("Mul", ["x22", "scalar"], ["y"], name="scale"),
        ],
        inputs={"x": [4]},
        outputs={"y": [2, 2]},
    )
    folded, report = onnxpress.optimize(model, passes="fold-constants")
    assert kit.ops(folded) == ["Reshape", "Mul"]
    assert report.passes[0].result.counts == {"constant_nodes": 2}
    assert kit.initializer(folded, "ints").dtype == np.int64
    assert (
        kit.initializer(folded, "scalar").dtype == np.float32
        and kit.initializer(folded, "scalar") == 0.5
    )
    kit.same_outputs(model, folded)


BOMBS = {
    "ConstantOfShape": (
        [node("ConstantOfShape", ["dims"], ["big"], name="bomb")],
        {"dims": np.array([50_000, 60_000], np.int64)},
        3 * 10**9,
    ),
    "Expand": (
        [node("Expand", ["one", "dims"], ["big"], name="bomb")],
        {"one": np.ones((1, 1), np.float32), "dims": np.array([50_000, 50_000], np.int64)},
        50_000**2,
    ),
    "Tile": (
        [node("Tile", ["one", "dims"], ["big"], name="bomb")],
        {"one": np.ones((2, 2), np.float32), "dims": np.array([30_000, 30_000], np.int64)},
        60_000**2,
    ),
    "Range": (
        [node("Range", ["start", "limit", "delta"], ["big"], name="bomb")],
        {
            "start": np.array(0, np.int64),
            "limit": np.array(10**10, np.int64),
            "delta": np.array(3, np.int64),
        },
        -(-(10**10) // 3),
    ),
}  # op -> (nodes, initializers, predicted element count); under the model check's limit
# (core/model_checks.py refuses a whole model whose node would make over 2**32 elements)


@pytest.mark.parametrize("op", sorted(BOMBS))
def test_size_bombs_are_refused_without_allocating(
    kit: SimpleNamespace, op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object) -> None:  # a bomb must be refused before it is evaluated
        raise AssertionError(f"{op} reached the evaluator")

    monkeypatch.setattr(fold_constants, "ReferenceEvaluator", never)
    nodes, initializers, elements = BOMBS[op]
    model = kit.model(nodes, inputs={}, outputs={"big": None}, initializers=initializers)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        folded, report = onnxpress.optimize(model, passes="fold-constants", verify="structure")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5.0 and peak < 64 << 20
    assert kit.ops(folded) == [op]
    [refusal] = report.passes[0].result.refusals
    assert refusal.node == "bomb"
    assert f"({elements} elements of" in refusal.reason
    assert refusal.reason.endswith("> max-bytes 64.0 MiB")


def test_growth_budget_refuses_then_allows_a_large_fill(kit: SimpleNamespace) -> None:
    # ConstantOfShape([1024, 1024]) is 4 MiB from 16 bytes of input: over the 1 MiB default.
    model = kit.model(
        [
            node("ConstantOfShape", ["dims"], ["fill"], name="fill",
                 value=numpy_helper.from_array(np.array([2.0], np.float32))),
            node("Mul", ["x", "fill"], ["y"], name="scale"),
        ],
        inputs={"x": [1024, 1024]},
        outputs={"y": None},
        initializers={"dims": np.array([1024, 1024], np.int64)},
    )  # fmt: skip
    kept, report = onnxpress.optimize(model, passes="fold-constants")
    assert kit.ops(kept) == ["ConstantOfShape", "Mul"]
    [refusal] = report.passes[0].result.refusals
    assert refusal.node == "fill" and "max-growth-bytes 1.0 MiB" in refusal.reason
    folded, report = onnxpress.optimize(model, passes="fold-constants{max-growth-bytes=8388608}")
    assert kit.ops(folded) == ["Mul"] and report.passes[0].result.refusals == []
    assert kit.initializer(folded, "fill").shape == (1024, 1024)
    kit.same_outputs(model, folded)


def test_random_and_dequantize_are_refused_with_reasons(kit: SimpleNamespace) -> None:
    model = kit.model(
        [
            node("RandomNormalLike", ["c"], ["noise"], name="noise"),
            node("DequantizeLinear", ["q", "q_scale"], ["w"], name="dq"),
            node("Add", ["x", "noise"], ["xn"], name="add_noise"),
            node("Mul", ["xn", "w"], ["y"], name="mul_w"),
        ],
        inputs={"x": [3]},
        outputs={"y": [3]},
        initializers={
            "c": np.zeros(3, np.float32),
            "q": np.array([1, 2, 3], np.int8),
            "q_scale": np.array(0.5, np.float32),
        },
    )
    folded, result = kit.run_pass(FoldConstants(), model)
    assert kit.ops(folded) == kit.ops(model)
    reasons = {r.node: r.reason for r in result.refusals}
    assert set(reasons) == {"noise", "dq"}  # no refusal for nodes reading variables
    assert "non-deterministic" in reasons["noise"]
    assert "quantized weight" in reasons["dq"]


def test_options_are_validated_and_parsed(kit: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="max-bytes"):
        FoldConstantsOptions(max_bytes=-1)
    with pytest.raises(PipelineError, match="max-growth-bytes"):
        parse_pipeline("fold-constants{max-growth-bytes=-5}")
    [pass_] = parse_pipeline("fold-constants{max-bytes=1024,fold-shapes=false}")
    assert pass_.options == FoldConstantsOptions(max_bytes=1024, fold_shapes=False)
    assert pass_.spec() == "fold-constants{max-bytes=1024,fold-shapes=false}"


def test_large_graph_is_linear() -> None:
    # 80k nodes: 40k foldable Adds that all read one shared constant, and a 40k-node chain of
    # Adds on the input that reads their results. A quadratic pass would take minutes.
    count = 40_000
    one, x = gs.Constant("one", np.array(1.0, np.float32)), gs.Variable("x", np.float32, [1])
    nodes, prev = [], x
    for i in range(count):
        k, folded = gs.Constant(f"k{i}", np.array(float(i), np.float32)), gs.Variable(f"c{i}")
        nodes.append(gs.Node("Add", f"fold{i}", inputs=[one, k], outputs=[folded]))
        out = gs.Variable(f"h{i}", np.float32, [1])
        nodes.append(gs.Node("Add", f"chain{i}", inputs=[prev, folded], outputs=[out]))
        prev = out
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[prev], opset=17)
    template = helper.make_model(
        helper.make_graph([], "template", [], []), opset_imports=[helper.make_opsetid("", 17)]
    )
    started = time.perf_counter()
    result = FoldConstants().run(graph, PassContext(template=template, original=template))
    assert time.perf_counter() - started < 30.0  # measured ~3 s; quadratic takes hours
    assert result.counts == {"folded": count} and result.refusals == []
    assert [n.name for n in graph.nodes] == [f"chain{i}" for i in range(count)]
    assert one.outputs == [] and all(len(n.inputs[1].outputs) == 1 for n in graph.nodes)
    assert graph.nodes[-1].inputs[1].values == count


def test_a_fold_that_makes_a_shape_static_triggers_another_round() -> None:
    """Max(consts) folds into Reshape's shape; only then is Shape(reshaped) static."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    import onnxpress

    graph = helper.make_graph(
        [
            helper.make_node("Max", ["c1", "c2"], ["shp"]),
            helper.make_node("Reshape", ["x", "shp"], ["r"]),
            helper.make_node("Shape", ["r"], ["s"]),
            helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT),
            helper.make_node("Relu", ["r"], ["z"]),
        ],
        "rounds",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3]),
        ],
        [
            numpy_helper.from_array(np.array([2, 1], np.int64), "c1"),
            numpy_helper.from_array(np.array([1, 3], np.int64), "c2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, report = onnxpress.optimize(model, passes="fold-constants")
    counts = report.passes[0].result.counts
    assert counts["folded"] == 2 and counts["shapes_folded"] == 1  # Max, Cast; Shape
    assert [n.op_type for n in out.graph.node] == ["Reshape", "Relu"]
    y = next(t for t in out.graph.initializer if t.name == "y")
    np.testing.assert_array_equal(numpy_helper.to_array(y), [2.0, 3.0])


def test_a_chain_of_shuffles_folds_one_block_a_round() -> None:
    """Twelve channel shuffles as torch exports them with a dynamic batch (shufflenet_v2 at
    opset 11): each Reshape's shape is computed from Shape of the block before, so each
    round of inference makes one more block static. All of them fold; at four rounds, the
    Shape ops of the later blocks stayed and TVM's importer failed on them."""
    nodes, inits, h = [], [], "x"
    for block in range(12):
        p = f"b{block}"
        inits += [
            numpy_helper.from_array(np.array([0], np.int64), f"{p}_i"),
            numpy_helper.from_array(np.array([2, 4, 5], np.int64), f"{p}_rest"),
            numpy_helper.from_array(np.array([8, 5], np.int64), f"{p}_flat"),
        ]
        nodes += [
            helper.make_node("Shape", [h], [f"{p}_s"]),
            helper.make_node("Gather", [f"{p}_s", f"{p}_i"], [f"{p}_n"], axis=0),
            helper.make_node("Concat", [f"{p}_n", f"{p}_rest"], [f"{p}_shape"], axis=0),
            helper.make_node("Reshape", [h, f"{p}_shape"], [f"{p}_r"]),
            helper.make_node("Transpose", [f"{p}_r"], [f"{p}_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Concat", [f"{p}_n", f"{p}_flat"], [f"{p}_shape2"], axis=0),
            helper.make_node("Reshape", [f"{p}_t", f"{p}_shape2"], [f"{p}_out"]),
        ]
        h = f"{p}_out"
    nodes.append(helper.make_node("Relu", [h], ["y"]))
    graph = helper.make_graph(
        nodes,
        "shuffles",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    out, report = onnxpress.optimize(model, passes="fold-constants")  # verified on ORT
    assert report.passes[0].result.counts["shapes_folded"] == 12
    assert {n.op_type for n in out.graph.node} == {"Reshape", "Transpose", "Relu"}


def test_static_dims_of_a_partly_symbolic_shape_fold(kit: SimpleNamespace) -> None:
    """x [batch, 6, 4]: Gather(Shape, 1), Gather(Shape, [2, 1]) and Slice(Shape, 1:) pick
    static dims and fold; Gather(Shape, 0) and a Slice over the batch stay."""
    model = kit.model(
        [
            node("Shape", ["x"], ["shape"], name="shape"),
            node("Gather", ["shape", "one"], ["d1"], axis=0, name="dim1"),
            node("Gather", ["shape", "two_one"], ["d21"], axis=0, name="dims21"),
            node("Slice", ["shape", "start1", "end_max"], ["tail"], name="tail"),
            node("Gather", ["shape", "zero"], ["d0"], axis=0, name="batch"),
            node("Slice", ["shape", "start0", "end_max"], ["all"], name="all"),
            node("Div", ["d1", "two"], ["half"], name="half"),  # folds once d1 is constant
            node("Unsqueeze", ["half", "zero_1d"], ["half_1d"], name="half_1d"),
            node("Slice", ["x", "zero_1d", "half_1d", "one_1d"], ["y"], name="chunk"),
        ],
        inputs={"x": ["batch", 6, 4]},
        outputs={"y": None, "d21": None, "tail": None, "d0": None, "all": None},
        initializers={
            "one": np.array(1, np.int64),
            "two": np.array(2, np.int64),
            "zero": np.array(0, np.int64),
            "two_one": np.array([2, 1], np.int64),
            "start1": np.array([1], np.int64),
            "start0": np.array([0], np.int64),
            "end_max": np.array([np.iinfo(np.int64).max], np.int64),
            "zero_1d": np.array([0], np.int64),
            "one_1d": np.array([1], np.int64),
        },
    )
    folded, report = onnxpress.optimize(model, passes="fold-constants,cleanup")
    result = report.passes[0].result
    assert result.counts["shape_dims_folded"] == 3 and "shapes_folded" not in result.counts
    assert sorted(kit.ops(folded)) == ["Gather", "Shape", "Slice", "Slice"]
    np.testing.assert_array_equal(kit.initializer(folded, "d21"), [4, 6])
    np.testing.assert_array_equal(kit.initializer(folded, "tail"), [6, 4])
    np.testing.assert_array_equal(kit.initializer(folded, "half_1d"), [3])
    kit.same_outputs(model, folded)


def test_gather_elements_folds_with_indices_smaller_than_the_data(kit: SimpleNamespace) -> None:
    # BertModel's position ids: GatherElements(buffer [1, 512], ids [1, 128]); onnx.reference
    # fails there (it reshapes a scalar), numpy folds it. Here also a row the indices skip
    # and negative indices, which count from the end.
    data = np.arange(15, dtype=np.int64).reshape(3, 5)
    model = kit.model(
        [
            node("GatherElements", ["data", "ids"], ["picked"], axis=1, name="gather"),
            node("Cast", ["picked"], ["picked_f"], to=TensorProto.FLOAT, name="cast"),
            node("Add", ["x", "picked_f"], ["y"], name="add_x"),
        ],
        inputs={"x": [2, 3]},
        outputs={"y": [2, 3]},
        initializers={"data": data, "ids": np.array([[0, 4, -1], [2, -5, 1]], np.int64)},
    )
    folded, report = onnxpress.optimize(model, passes="fold-constants")  # verified on ORT
    assert report.passes[0].result.refusals == []
    assert kit.ops(folded) == ["Add"]
    np.testing.assert_array_equal(kit.initializer(folded, "picked_f"), [[0, 4, 4], [7, 5, 6]])
    kit.same_outputs(model, folded)
