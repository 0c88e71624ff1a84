"""onnxpress.distill: lowers the KD loss, improves the student, keeps the graph (and QDQ) intact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

import onnxpress  # noqa: E402
from onnxpress.cli.main import main  # noqa: E402
from onnxpress.core.errors import OnnxpressError  # noqa: E402
from onnxpress.core.verify import Runner, check_structure  # noqa: E402
from onnxpress.train.distill import distill, same_structure  # noqa: E402
from onnxpress.train.distill_options import DistillOptions  # noqa: E402

F = TensorProto.FLOAT


def mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["a"], name="relu"),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2", transB=1),
        ],
        "mlp",
        [helper.make_tensor_value_info("input", F, ["batch", 8])],
        [helper.make_tensor_value_info("logits", F, ["batch", 5])],
        [
            numpy_helper.from_array(v, n)
            for n, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def problem() -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (16,), (5, 16), (5,))]
    teacher = mlp(*weights)
    noisy = [w + 0.6 * rng.standard_normal(w.shape).astype(np.float32) for w in weights]
    student = mlp(*noisy)
    inputs = rng.standard_normal((512, 8)).astype(np.float32)
    return teacher, student, inputs


def agreement(model: onnx.ModelProto, teacher: onnx.ModelProto, inputs: np.ndarray) -> float:
    ours = Runner(model)({"input": inputs})[0].argmax(-1)
    theirs = Runner(teacher)({"input": inputs})[0].argmax(-1)
    return float((ours == theirs).mean())


def test_distill_lowers_loss_and_improves_accuracy(problem: tuple) -> None:
    teacher, student, inputs = problem
    options = DistillOptions(epochs=15, lr=1e-2, batch_size=64, seed=0)
    tuned, report = distill(student, teacher, [{"input": inputs[:384]}], options=options)
    assert report.holdout_loss_after < 0.5 * report.holdout_loss_before
    assert report.metric == "top1" and report.metric_after < report.metric_before
    test = inputs[384:]  # never seen by distill
    before, after = agreement(student, teacher, test), agreement(tuned, teacher, test)
    assert after > before + 0.1, (before, after)
    assert same_structure(student, tuned)
    assert tuned.graph.node == student.graph.node
    check_structure(tuned)
    assert report.torch_vs_onnxruntime < 1e-5
    # seeded and deterministic: the same run gives the same bytes
    again, _ = distill(student, teacher, [{"input": inputs[:384]}], options=options)
    assert again.SerializeToString() == tuned.SerializeToString()


def test_learning_rate_schedules(problem: tuple) -> None:
    """The default cosine schedule and a constant rate both learn, into different weights
    (the rate really changes over the steps); an unknown schedule is refused by name."""
    teacher, student, inputs = problem
    tuned = {}
    for schedule in ("cosine", "constant"):
        options = DistillOptions(epochs=6, lr=1e-2, batch_size=64, schedule=schedule)
        tuned[schedule], report = distill(student, teacher, [{"input": inputs}], options=options)
        assert report.holdout_loss_after < 0.8 * report.holdout_loss_before
    cosine = numpy_helper.to_array(tuned["cosine"].graph.initializer[0])
    constant = numpy_helper.to_array(tuned["constant"].graph.initializer[0])
    assert np.abs(cosine - constant).max() > 1e-4
    with pytest.raises(OnnxpressError, match="schedule must be constant or cosine"):
        DistillOptions(schedule="linear")  # type: ignore[arg-type]


def test_labels_features_and_regression(problem: tuple) -> None:
    teacher, student, inputs = problem
    labels = Runner(teacher)({"input": inputs})[0].argmax(-1)
    _, report = distill(
        student,
        teacher,
        [{"input": inputs}],
        labels=labels,
        epochs=2,
        lr=1e-2,
        feature_losses=(("h", "h"),),
    )
    assert report.holdout_loss_after <= report.holdout_loss_before
    _, regression = distill(student, teacher, [{"input": inputs}], epochs=2, task="regression")
    assert regression.metric == "rel-l2" and regression.metric_after <= regression.metric_before
    with pytest.raises(OnnxpressError, match="no tensor"):
        distill(student, teacher, [{"input": inputs}], feature_losses=(("nope", "h"),))
    with pytest.raises(OnnxpressError, match="invalid option"):
        DistillOptions(epochs=-1)


def test_qat_keeps_a_valid_qdq_model(problem: tuple) -> None:
    teacher, _, inputs = problem
    calibration = [{"input": inputs[:128]}]
    quantized, _ = onnxpress.optimize(teacher, "qdq", calibration, verify="structure")
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    tuned, report = distill(quantized, teacher, [{"input": inputs}], epochs=3, lr=1e-3)
    assert same_structure(quantized, tuned)
    check_structure(tuned)
    before = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    assert all(before[k].dtype == after[k].dtype for k in before)  # int8 stays int8
    # integers keep their span: weights narrowed to 7 bits against int16 pair saturation on
    # AVX2 (the default targets include it) are still 7-bit after training
    for name, q in before.items():
        if q.dtype == np.int8:
            assert np.abs(after[name].astype(int)).max() <= np.abs(q.astype(int)).max()
    # fake-quant in torch is exactly what onnxruntime computes from the written QDQ graph
    assert report.torch_vs_onnxruntime < 1e-4
    assert report.holdout_loss_after < report.holdout_loss_before
    assert report.metric_after <= report.metric_before + 2 / len(inputs)  # within 2 samples


def test_cli_distill(tmp_path: Path, problem: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    teacher, student, inputs = problem
    onnx.save(teacher, str(tmp_path / "t.onnx"))
    onnx.save(student, str(tmp_path / "s.onnx"))
    np.savez(tmp_path / "data.npz", input=inputs[:256])
    out = tmp_path / "tuned.onnx"
    code = main(
        [
            "distill",
            str(tmp_path / "s.onnx"),
            "--teacher",
            str(tmp_path / "t.onnx"),
            "--data",
            str(tmp_path / "data.npz"),
            "-o",
            str(out),
            "--epochs",
            "2",
        ]
    )
    assert code == 0 and out.exists()
    assert "wrote" in capsys.readouterr().out
    code = main(
        [
            "distill",
            str(tmp_path / "s.onnx"),
            "--teacher",
            str(tmp_path / "t.onnx"),
            "--data",
            str(tmp_path / "data.npz"),
            "--feature-loss",
            "h",
        ]
    )
    assert code == 1
    assert "student:teacher" in capsys.readouterr().err


def test_scales_are_learned_and_can_be_frozen(problem: tuple) -> None:
    teacher, student, inputs = problem
    quantized, _ = onnxpress.optimize(student, "qdq", [{"input": inputs[:128]}], verify="structure")
    scales = {n.input[1] for n in quantized.graph.node if n.op_type == "QuantizeLinear"}

    def scale_values(m: onnx.ModelProto) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in scales}

    learned, report = distill(quantized, teacher, [{"input": inputs}], epochs=2, lr=1e-2, holdout=0)
    assert report.best_epoch > 0
    frozen, _ = distill(
        quantized, teacher, [{"input": inputs}], epochs=2, lr=1e-2, holdout=0, learn_scales=False
    )
    original = scale_values(quantized)
    assert any(not np.array_equal(original[k], v) for k, v in scale_values(learned).items())
    assert all(np.array_equal(original[k], v) for k, v in scale_values(frozen).items())


def test_missing_torch_is_one_line(monkeypatch: pytest.MonkeyPatch, problem: tuple) -> None:
    import sys

    teacher, student, inputs = problem
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(OnnxpressError, match=r"install onnxpress\[train\]"):
        distill(student, teacher, [{"input": inputs}])
