"""``prune-heads`` on a hand-built two-block encoder in the torch legacy export form, and in
transformers' BertModel form (Reshape [.., -1, Dh], Mul by 1/√Dh, an attention mask added,
equal q/k biases shared by the exporter): the equivalence check (a head zeroed beforehand is
removed and the outputs stay exact), the exact structure after the pass, importance on
calibration data, the refit, and refusals."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
from onnx import helper
from onnxpress.passes.prune_heads import PruneHeads, PruneHeadsOptions

import onnxpress

HEADS, HEAD_DIM, SEQ = 4, 3, 5
D = HEADS * HEAD_DIM
node = helper.make_node


def attention_model(
    kit: SimpleNamespace,
    seed: int = 0,
    zero_head: int | None = None,
    zero_dim: int | None = None,
    bert: bool = False,
    mask_heads: int = 1,
) -> onnx.ModelProto:
    """x [n, SEQ, D] -> two residual multi-head attention blocks -> y; ``bert``: the
    transformers form, with a mask input [n, mask_heads, 1, SEQ] added to the scores."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], {}, "x"
    inits["split"] = np.array(
        [0, SEQ, -1, HEAD_DIM] if bert else [-1, SEQ, HEADS, HEAD_DIM], np.int64
    )
    inits["merge"] = np.array([-1, SEQ, D], np.int64)
    inits["scale"] = np.array(1 / np.sqrt(HEAD_DIM) if bert else np.sqrt(HEAD_DIM), np.float32)
    for b in range(2):
        p = f"b{b}"
        heads = {}
        for t, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            weight = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
            bias = (rng.standard_normal(D) * 0.1).astype(np.float32)
            if t == "v" and zero_head is not None and b == 0:
                weight[:, zero_head * HEAD_DIM : (zero_head + 1) * HEAD_DIM] = 0
                bias[zero_head * HEAD_DIM : (zero_head + 1) * HEAD_DIM] = 0
            if t in ("q", "v") and zero_dim is not None:  # that dimension of every head
                weight[:, zero_dim::HEAD_DIM] = 0
                bias[zero_dim::HEAD_DIM] = 0
            inits[f"{p}.{t}.w"] = weight
            bias_name = "qk.b" if bert and t in ("q", "k") else f"{p}.{t}.b"  # one shared bias
            inits[bias_name] = np.zeros(D, np.float32) if bias_name == "qk.b" else bias
            nodes += [
                node("MatMul", [current, f"{p}.{t}.w"], [f"{p}.{t}.mm"], name=f"{p}/{t}/MatMul"),
                node("Add", [bias_name, f"{p}.{t}.mm"], [f"{p}.{t}.lin"], name=f"{p}/{t}/Add"),
                node(
                    "Reshape", [f"{p}.{t}.lin", "split"], [f"{p}.{t}.4d"], name=f"{p}/{t}/Reshape"
                ),
                node("Transpose", [f"{p}.{t}.4d"], [f"{p}.{t}.h"], name=f"{p}/{t}/T", perm=perm),
            ]
            heads[t] = f"{p}.{t}.h"
        inits[f"{p}.o.w"] = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
        inits[f"{p}.o.b"] = (rng.standard_normal(D) * 0.1).astype(np.float32)
        scaled = [node("Div", [f"{p}.s", "scale"], [f"{p}.ss"], name=f"{p}/scale")]
        if bert:
            scaled = [
                node("Mul", [f"{p}.s", "scale"], [f"{p}.sm"], name=f"{p}/scale"),
                node("Add", [f"{p}.sm", "mask"], [f"{p}.ss"], name=f"{p}/mask"),
            ]
        nodes += [
            node("MatMul", [heads["q"], heads["k"]], [f"{p}.s"], name=f"{p}/scores"),
            *scaled,
            node("Softmax", [f"{p}.ss"], [f"{p}.p"], name=f"{p}/softmax", axis=-1),
            node("MatMul", [f"{p}.p", heads["v"]], [f"{p}.c"], name=f"{p}/context"),
            node("Transpose", [f"{p}.c"], [f"{p}.ct"], name=f"{p}/back", perm=[0, 2, 1, 3]),
            node("Reshape", [f"{p}.ct", "merge"], [f"{p}.m"], name=f"{p}/merge"),
            node("MatMul", [f"{p}.m", f"{p}.o.w"], [f"{p}.o"], name=f"{p}/out/MatMul"),
            node("Add", [f"{p}.o", f"{p}.o.b"], [f"{p}.ob"], name=f"{p}/out/Add"),
            node("Add", [current, f"{p}.ob"], [f"{p}.r"], name=f"{p}/residual"),
        ]
        current = f"{p}.r"
    nodes[-1].output[0] = "y"
    inputs: dict[str, list[int | str]] = {"x": ["n", SEQ, D]}
    if bert:
        inputs["mask"] = ["n", mask_heads, 1, SEQ]
    return kit.model(nodes, inputs, {"y": None}, inits)


def calibration(seed: int = 1) -> onnxpress.CalibrationData:
    rng = np.random.default_rng(seed)
    return onnxpress.CalibrationData.from_batches(
        [{"x": rng.standard_normal((64, SEQ, D)).astype(np.float32)} for _ in range(2)]
    )


def test_a_zeroed_head_is_removed_exactly(kit: SimpleNamespace) -> None:
    model = attention_model(kit, zero_head=2)
    out, report = onnxpress.optimize(
        model,
        passes=f"prune-heads{{keep={7 / 8},refit=false}}",
        calibration=calibration(),
        verify="off",
    )
    details = report.passes[0].result.details
    assert details[0]["importance"][2] == 0.0
    assert [d["kept"] for d in details] == [[0, 1, 3], [0, 1, 2, 3]]
    x = np.random.default_rng(5).standard_normal((3, SEQ, D)).astype(np.float32)
    np.testing.assert_allclose(
        kit.run_ort(out, {"x": x})["y"], kit.run_ort(model, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )
    # the structure: q/k/v lose that head's columns, the output projection its rows
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    for t in ("q", "k", "v"):
        assert weights[f"b0.{t}.w"].shape == (D, 3 * HEAD_DIM)
        assert weights[f"b0.{t}.b"].shape == (3 * HEAD_DIM,)
        assert weights[f"b1.{t}.w"].shape == (D, D)
    assert weights["b0.o.w"].shape == (3 * HEAD_DIM, D)
    shapes = {n.name: n.input[1] for n in out.graph.node if n.op_type == "Reshape"}
    assert list(weights[shapes["b0/q/Reshape"]]) == [-1, SEQ, 3, HEAD_DIM]
    assert list(weights[shapes["b0/merge"]]) == [-1, SEQ, 3 * HEAD_DIM]
    assert shapes["b1/q/Reshape"] == "split"


def test_zeroed_head_dimensions_are_removed_exactly(kit: SimpleNamespace) -> None:
    model = attention_model(kit, zero_dim=1)
    text = "prune-heads{keep=1.0,qk-dims=0.67,vo-dims=0.67,refit=false}"
    out, report = onnxpress.optimize(model, passes=text, verify="off")
    assert report.passes[0].result.counts["blocks_pruned"] == 2
    x = np.random.default_rng(6).standard_normal((3, SEQ, D)).astype(np.float32)
    np.testing.assert_allclose(
        kit.run_ort(out, {"x": x})["y"], kit.run_ort(model, {"x": x})["y"], rtol=1e-5, atol=1e-5
    )
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    for t in ("q", "k", "v"):
        assert weights[f"b1.{t}.w"].shape == (D, HEADS * 2)
    assert weights["b1.o.w"].shape == (HEADS * 2, D)
    shapes = {n.name: list(weights[n.input[1]]) for n in out.graph.node if n.op_type == "Reshape"}
    assert shapes["b0/k/Reshape"] == [-1, SEQ, HEADS, 2]
    assert shapes["b0/merge"] == [-1, SEQ, HEADS * 2]


def test_refit_recovers_the_output_of_a_removed_head(kit: SimpleNamespace) -> None:
    model = attention_model(kit, seed=3)
    x = np.random.default_rng(9).standard_normal((16, SEQ, D)).astype(np.float32)
    reference = kit.run_ort(model, {"x": x})["y"]
    errors = {}
    for refit in ("true", "false"):
        out, report = onnxpress.optimize(
            model,
            passes=f"prune-heads{{keep=0.75,refit={refit}}}",
            calibration=calibration(),
            verify="off",
        )
        assert report.passes[0].result.counts["heads_pruned"] == 2
        got = kit.run_ort(out, {"x": x})["y"]
        errors[refit] = np.linalg.norm(got - reference) / np.linalg.norm(reference)
    assert 0 < errors["true"] < errors["false"]


def test_least_important_heads_go_first_and_each_block_keeps_one(kit: SimpleNamespace) -> None:
    model = attention_model(kit, seed=4)
    _, result = kit.run_pass(PruneHeads(PruneHeadsOptions(keep=0.01)), model)
    assert [len(d["kept"]) for d in result.details] == [1, 1]  # min-heads
    for d in result.details:  # without data: magnitude, the largest kept
        assert d["kept"] == [int(np.argmax(d["importance"]))]


def test_a_softmax_outside_attention_is_refused_with_its_reason(kit: SimpleNamespace) -> None:
    model = kit.model(
        [node("Softmax", ["x"], ["y"], name="probabilities", axis=-1)],
        {"x": ["n", 4]},
        {"y": None},
    )
    _, result = kit.run_pass(PruneHeads(PruneHeadsOptions()), model)
    assert [(r.node, r.reason) for r in result.refusals] == [
        ("probabilities", "not Softmax(q·kᵀ) read by one MatMul with the values")
    ]


def test_the_transformers_form_with_a_mask_prunes_exactly(kit: SimpleNamespace) -> None:
    model = attention_model(kit, zero_head=1, bert=True)
    rng = np.random.default_rng(2)
    mask = np.where(rng.random((64, 1, 1, SEQ)) < 0.3, -1e4, 0).astype(np.float32)
    data = onnxpress.CalibrationData.from_batches(
        [{"x": rng.standard_normal((64, SEQ, D)).astype(np.float32), "mask": mask}]
    )
    text = f"prune-heads{{keep={7 / 8},refit=false}}"
    out, report = onnxpress.optimize(model, passes=text, calibration=data)
    result = report.passes[0].result
    assert result.refusals == [] and result.counts["heads_pruned"] == 1
    assert [d["kept"] for d in result.details] == [[0, 2, 3], [0, 1, 2, 3]]
    feed = {"x": rng.standard_normal((3, SEQ, D)).astype(np.float32), "mask": mask[:3]}
    np.testing.assert_allclose(
        kit.run_ort(out, feed)["y"], kit.run_ort(model, feed)["y"], rtol=1e-5, atol=1e-5
    )
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    biases = {n.name: n.input[0] for n in out.graph.node if n.name.endswith("/Add")}
    assert weights[biases["b0/q/Add"]].shape == (3 * HEAD_DIM,)  # its own pruned copy
    assert biases["b1/q/Add"] == biases["b1/k/Add"] == "qk.b"  # block 1 keeps every head
    assert weights["qk.b"].shape == (D,)


def test_a_mask_that_differs_per_head_is_refused(kit: SimpleNamespace) -> None:
    model = attention_model(kit, bert=True, mask_heads=HEADS)
    _, result = kit.run_pass(PruneHeads(PruneHeadsOptions()), model)
    assert [r.reason for r in result.refusals] == [
        "the mask 'mask' added to the scores is not known to be equal for every head"
    ] * 2
