"""svd with calibration data: whitening, the layer-wise refit against the teacher, waves in
topological order, streaming moments and the per-layer output error it reports."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxpress.passes.svd import Svd, SvdOptions

import onnxpress
from onnxpress import CalibrationData, PassContext, PassError
from onnxpress.analysis.refit import Tap, collect_moments, layer_waves
from onnxpress.core.ir import to_graph, to_model

node = helper.make_node
SIZE = 16


def anisotropic_batches(count: int = 4, rows: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Inputs whose features have very different scales, so whitening matters."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.01, SIZE)
    return [
        {"x": (rng.standard_normal((rows, SIZE)) * scales).astype(np.float32)} for _ in range(count)
    ]


def two_layers(kit: SimpleNamespace, seed: int = 0, rank: int = SIZE) -> onnx.ModelProto:
    """x -> fc1 -> Tanh -> fc2 -> y, random weights of the given rank plus a little noise."""
    rng = np.random.default_rng(seed)
    w1, w2 = (
        (
            rng.standard_normal((SIZE, rank)) @ rng.standard_normal((rank, SIZE)) / np.sqrt(rank)
            + 0.01 * rng.standard_normal((SIZE, SIZE))
        ).astype(np.float32)
        for _ in range(2)
    )
    return kit.model(
        [
            node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            node("Tanh", ["h"], ["t"], name="tanh"),
            node("MatMul", ["t", "W2"], ["y"], name="fc2"),
        ],
        {"x": ["batch", SIZE]},
        {"y": None},
        {"W1": w1, "W2": w2},
    )


def run_with_data(
    model: onnx.ModelProto,
    batches: list[dict[str, Any]],
    teacher: onnx.ModelProto | None = None,
    **options: Any,
) -> tuple[onnx.ModelProto, Any]:
    ctx = PassContext(
        template=model, original=teacher or model, calibration=CalibrationData.from_batches(batches)
    )
    graph = to_graph(model)
    result = Svd(SvdOptions(min_params=0, **options)).run(graph, ctx)
    return to_model(graph, model), result


def measured_error(
    kit: SimpleNamespace,
    ref: onnx.ModelProto,
    new: onnx.ModelProto,
    batches: list[dict[str, Any]],
    name: str = "y",
) -> float:
    diff = total = 0.0
    for batch in batches:
        want, got = kit.run_ort(ref, batch)[name], kit.run_ort(new, batch)[name]
        diff += float(np.sum((got.astype(np.float64) - want) ** 2))
        total += float(np.sum(want.astype(np.float64) ** 2))
    return float(np.sqrt(diff / total))


def test_whitening_minimises_the_error_on_real_inputs(kit: SimpleNamespace) -> None:
    batches = anisotropic_batches()
    rng = np.random.default_rng(1)
    model = kit.model(
        [node("MatMul", ["x", "W"], ["y"], name="fc")],
        {"x": ["batch", SIZE]},
        {"y": None},
        {"W": rng.standard_normal((SIZE, SIZE)).astype(np.float32)},
    )
    plain, plain_result = run_with_data(model, batches, rank=3, whiten=False, refit=False)
    white, white_result = run_with_data(model, batches, rank=3, refit=False, damping=1e-9)
    plain_error = plain_result.details[0]["output_error"]
    white_error = white_result.details[0]["output_error"]
    assert white_error < 0.5 * plain_error
    # The reported error is the error of the factored model on the calibration data ...
    assert measured_error(kit, model, white, batches) == pytest.approx(white_error, rel=1e-3)
    assert measured_error(kit, model, plain, batches) == pytest.approx(plain_error, rel=1e-3)
    # ... and whitening reaches the optimum: the best rank-3 map for these inputs.
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    w = np.asarray(onnx.numpy_helper.to_array(model.graph.initializer[0]), np.float64)
    s = np.linalg.svd(x @ w, compute_uv=False)
    best = np.linalg.norm(s[3:]) / np.linalg.norm(s)
    assert white_error == pytest.approx(best, rel=1e-4)


def test_later_layers_see_the_student_inputs(kit: SimpleNamespace) -> None:
    model, batches = two_layers(kit), anisotropic_batches()
    no_refit, first = run_with_data(model, batches, rank=4, refit=False)
    refit, second = run_with_data(model, batches, rank=4)
    fc2_before, fc2_after = first.details[1], second.details[1]
    assert fc2_before["nodes"] == fc2_after["nodes"] == ["fc2"]
    # fc2 saw the student's inputs (fc1 already factored): the upstream error is not 0.
    assert fc2_after["upstream_error"] > 0.1 and fc2_after["refit"] is True
    assert fc2_after["output_error"] < fc2_before["output_error"]
    end_to_end = measured_error(kit, model, refit, batches)
    assert end_to_end == pytest.approx(fc2_after["output_error"], rel=1e-3)
    assert end_to_end < measured_error(kit, model, no_refit, batches)


def test_refit_reproduces_the_teacher(kit: SimpleNamespace) -> None:
    # The teacher's weight has rank 4; the student's is a perturbed copy (as an earlier lossy
    # pass would leave it). Refitting V brings the factored layer back to the teacher.
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((SIZE, 4)) @ rng.standard_normal((4, SIZE))).astype(np.float32)
    noisy = (w + 0.3 * np.std(w) * rng.standard_normal(w.shape)).astype(np.float32)

    def layer(weight: np.ndarray) -> onnx.ModelProto:
        return kit.model(
            [node("MatMul", ["x", "W"], ["y"], name="fc")],
            {"x": ["batch", SIZE]},
            {"y": None},
            {"W": weight},
        )

    teacher, student, batches = layer(w), layer(noisy), anisotropic_batches()
    _, plain = run_with_data(student, batches, teacher=teacher, rank=4, refit=False)
    refit, fitted = run_with_data(student, batches, teacher=teacher, rank=4)
    assert 0.1 < plain.details[0]["upstream_error"] < 0.5
    assert fitted.details[0]["output_error"] < 0.2 * plain.details[0]["output_error"]
    assert measured_error(kit, teacher, refit, batches) == pytest.approx(
        fitted.details[0]["output_error"], rel=1e-3
    )


def test_refit_is_skipped_with_a_reason_when_the_teacher_differs(kit: SimpleNamespace) -> None:
    model, batches = two_layers(kit), anisotropic_batches()
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[0].output[0] = "h_renamed"
    renamed.graph.node[1].input[0] = "h_renamed"
    scaled = two_layers(kit, seed=5)  # another W2: fc2's output in the "teacher" is unrelated
    _, result = run_with_data(model, batches, teacher=renamed, rank=4)
    assert result.details[0]["refit"] == (
        "skipped: the layer's output tensor is not in the original model"
    )
    assert result.details[0]["output_error"] is None
    _, result = run_with_data(model, batches, teacher=scaled, rank=4)
    assert result.details[1]["refit"].startswith("skipped: the teacher's tensor differs")


def test_layers_are_processed_in_topological_waves(kit: SimpleNamespace) -> None:
    rng = np.random.default_rng(2)
    names = ["q", "k", "v", "out"]
    inits = {f"W{n}": rng.standard_normal((SIZE, SIZE)).astype(np.float32) for n in names}
    model = kit.model(
        [node("MatMul", ["x", f"W{n}"], [n + "_y"], name=n) for n in "qkv"]
        + [
            node("Sum", ["q_y", "k_y", "v_y"], ["s"], name="sum"),
            node("MatMul", ["s", "Wout"], ["y"], name="out"),
        ],
        {"x": [2, SIZE]},
        {"y": None},
        inits,
    )
    svd = Svd(SvdOptions(rank=2, min_params=0))
    graph = to_graph(model)
    groups = svd._candidates(graph, onnxpress.PassResult())
    waves = layer_waves(graph, [[f.node for f in g.forms] for g in groups])
    assert [[groups[i].form.node.name for i in wave] for wave in waves] == [
        ["q", "k", "v"],
        ["out"],
    ]


def test_moments_stream_batch_by_batch(kit: SimpleNamespace) -> None:
    model, batches = two_layers(kit), anisotropic_batches(count=3, rows=5)
    consumed = []

    def lazy() -> Any:
        for batch in batches:
            consumed.append(1)
            yield batch

    taps = [
        Tap(
            "fc2",
            "t",
            rows=lambda a: a,
            dim=SIZE,
            teacher="y",
            targets=lambda a: a,
            target_dim=SIZE,
        )
    ]
    moments = collect_moments(model, model, taps, lazy())["fc2"]
    t = np.concatenate([kit.run_ort(_expose(model, "t"), b)["t"] for b in batches])
    y = np.concatenate([kit.run_ort(model, b)["y"] for b in batches])
    assert len(consumed) == 3 and moments.count == 15
    for got, expected in ((moments.xtx, t.T.astype(np.float64) @ t), (moments.xty, t.T @ y)):
        # each batch's products are float32 (then summed in float64)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def _expose(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    from onnxpress.calibration.activations import with_outputs

    return with_outputs(model, [name])


def test_optimize_with_calibration_reports_every_layer(kit: SimpleNamespace) -> None:
    model, batches = two_layers(kit, rank=4), anisotropic_batches()
    _, report = onnxpress.optimize(
        model, passes="svd{params=0.6,min-params=0}", calibration=batches
    )
    record = report.passes[0]
    assert [d["nodes"] for d in record.result.details] == [["fc1"], ["fc2"]]
    for detail in record.result.details:
        assert {"k", "n", "rank", "params_before", "params_after", "output_error"} <= set(detail)
    assert record.verification.value is not None and record.verification.value < 0.2
    assert report.after.params < report.before.params


def test_whiten_without_calibration_is_an_error(kit: SimpleNamespace) -> None:
    with pytest.raises(PassError, match="whiten=true and refit=true need calibration data"):
        onnxpress.optimize(two_layers(kit), passes="svd{rank=2,whiten=true}")


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_conv_errors_are_measured_on_patches(kit: SimpleNamespace, scheme: str) -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    model = kit.model(
        [
            node(
                "Conv",
                ["x", "W"],
                ["y"],
                name="conv",
                group=1,
                strides=[2, 1],
                pads=[1, 0, 2, 1],
                dilations=[1, 2],
            )
        ],
        {"x": ["batch", 3, 9, 10]},
        {"y": None},
        {"W": w},
    )
    # Smooth images (neighbouring pixels correlate), as convolutions usually see.
    batches = [
        {"x": np.cumsum(rng.standard_normal((4, 3, 9, 10)), axis=3).astype(np.float32)}
        for _ in range(3)
    ]
    plain, plain_result = run_with_data(
        model, batches, rank=2, scheme=scheme, whiten=False, refit=False, min_gain=-1.0
    )
    fitted, fitted_result = run_with_data(model, batches, rank=2, scheme=scheme, min_gain=-1.0)
    for out, result in ((plain, plain_result), (fitted, fitted_result)):
        detail = result.details[0]
        assert detail["form"] == f"conv-{scheme}" and detail["upstream_error"] < 1e-6
        assert measured_error(kit, model, out, batches) == pytest.approx(
            detail["output_error"], rel=1e-3
        )
    assert fitted_result.details[0]["output_error"] < plain_result.details[0]["output_error"]
