"""Distillation through Softmax and sequence (CTC-style) heads, hint adapters, and runs that
cannot improve: they say so, and a degenerate loss is an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxpress.cli.main import main  # noqa: E402
from onnxpress.core.errors import OnnxpressError  # noqa: E402
from onnxpress.train.distill import distill, same_structure  # noqa: E402
from onnxpress.train.distill_features import hint_pairs  # noqa: E402
from onnxpress.train.distill_heads import find_head, head_plan  # noqa: E402
from onnxpress.train.distill_loop import DistillError  # noqa: E402

F = TensorProto.FLOAT


def sequence_model(weights: dict[str, np.ndarray], tail: str = "Softmax") -> onnx.ModelProto:
    """[batch, time, 6] -> MatMul-Relu-MatMul per step -> ``tail`` over 5 classes."""
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["a"], name="relu"),
        helper.make_node("MatMul", ["a", "w2"], ["logits"], name="fc2"),
    ]
    if tail == "Softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1))
    elif tail == "Scaled":  # probabilities with no Softmax right at the output
        nodes.append(helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=-1))
        nodes.append(helper.make_node("Mul", ["p", "one"], ["probs"], name="scale"))
    graph = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("input", F, ["batch", 7, 6])],
        [helper.make_tensor_value_info("probs", F, ["batch", 7, 5])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()]
        + [numpy_helper.from_array(np.float32(1.0), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if tail == "Softmax":
        del model.graph.initializer[-1]
    return model


def make_weights(rng: np.random.Generator, hidden: int = 12) -> dict[str, np.ndarray]:
    return {
        "w1": (rng.standard_normal((6, hidden)) * 0.8).astype(np.float32),
        "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "w2": (rng.standard_normal((hidden, 5)) * 2.0).astype(np.float32),
    }


@pytest.fixture(scope="module")
def problem() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(1)
    weights = make_weights(rng)
    noisy = {
        k: v + 0.5 * rng.standard_normal(v.shape).astype(np.float32) for k, v in weights.items()
    }
    return weights, noisy, rng.standard_normal((400, 7, 6)).astype(np.float32)


def test_softmax_sequence_head_is_looked_through_and_improves(problem: tuple) -> None:
    weights, noisy, inputs = problem
    teacher, student = sequence_model(weights), sequence_model(noisy)
    ((s_head, t_head),) = head_plan(student, teacher, [np.zeros((1, 7, 5), np.float32)], "auto")
    assert (t_head.kind, t_head.tensor, t_head.softmax) == ("logits", "logits", "softmax")
    assert s_head == t_head
    tuned, report = distill(student, teacher, [{"input": inputs}], epochs=8, lr=1e-2, seed=0)
    assert report.improved and report.verdict == "improved" and report.best_epoch > 0
    assert report.heads == ["probs: logits at logits (through softmax)"]
    # per-step top-1 disagreement with the teacher on the held-out split falls
    assert report.holdout_metric_after < report.holdout_metric_before - 0.05, report.describe()
    assert same_structure(student, tuned)


def test_probability_outputs_get_a_proper_kl(problem: tuple) -> None:
    weights, noisy, inputs = problem
    teacher, student = sequence_model(weights, "Scaled"), sequence_model(noisy, "Scaled")
    values = np.asarray(
        torch.softmax(torch.from_numpy(inputs[:4] @ weights["w1"]), -1)
    )  # rows summing to 1
    assert find_head(teacher, "probs", values, "auto").kind == "probabilities"
    assert find_head(teacher, "probs", values * 3, "auto").kind == "logits"
    _, report = distill(student, teacher, [{"input": inputs}], epochs=6, lr=1e-2)
    assert report.heads == ["probs: probabilities at probs"]
    assert report.improved and report.holdout_metric_after < report.holdout_metric_before


def test_nothing_to_learn_is_reported_and_not_written(
    problem: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights, _, inputs = problem
    model = sequence_model(weights)
    tuned, report = distill(model, model, [{"input": inputs}], epochs=2)
    assert not report.improved and report.best_epoch == 0
    assert report.verdict.startswith("no improvement: kept the input weights (")
    assert "from the start" in report.verdict
    assert tuned.SerializeToString() == model.SerializeToString()
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", input=inputs)
    out = tmp_path / "out.onnx"
    argv = ["distill", str(tmp_path / "m.onnx"), "--teacher", str(tmp_path / "m.onnx")]
    code = main([*argv, "--data", str(tmp_path / "d.npz"), "-o", str(out), "--epochs", "1"])
    printed = capsys.readouterr().out
    assert code == 3 and not out.exists()
    assert "no improvement: kept the input weights" in printed and "nothing written" in printed


def test_a_nan_loss_is_an_error(problem: tuple) -> None:
    weights, _, inputs = problem
    teacher = sequence_model(weights)
    student = sequence_model(weights)
    student.graph.node[2].op_type = "Sqrt"  # sqrt of negative pre-activations: NaN
    with pytest.raises(DistillError, match="loss is nan before training"):
        distill(student, teacher, [{"input": inputs}], epochs=1)


def test_sequence_heads_refuse_per_sample_labels(problem: tuple) -> None:
    weights, noisy, inputs = problem
    labels = np.zeros(len(inputs), np.int64)
    with pytest.raises(OnnxpressError, match="sequence"):
        distill(sequence_model(noisy), sequence_model(weights), [{"input": inputs}], labels=labels)


def test_hints_on_a_pruned_student_get_an_adapter(problem: tuple) -> None:
    weights, _, inputs = problem
    teacher = sequence_model(weights)
    keep = np.arange(0, 12, 2)  # half the hidden units, as prune-channels would leave
    pruned = {"w1": weights["w1"][:, keep], "b1": weights["b1"][keep], "w2": weights["w2"][keep]}
    student = sequence_model(pruned)
    assert hint_pairs(student, teacher, 4) == [("a", "a")]  # the input of fc2, 6 vs 12 units
    tuned, report = distill(student, teacher, [{"input": inputs}], epochs=4, lr=1e-2, hints=4)
    assert report.features == ["a:a (adapter 6->12)"]
    assert report.improved and same_structure(student, tuned)
    # the pruned model that ends in Softmax gets closer to its teacher on held-out samples
    assert report.holdout_metric_after < report.holdout_metric_before, report.describe()
    assert {t.name for t in tuned.graph.initializer} == {t.name for t in student.graph.initializer}
    # a hand-given pair across different widths gets one too (6 hidden units -> 5 logits)
    _, given = distill(
        student, teacher, [{"input": inputs}], epochs=1, feature_losses=(("a", "logits"),)
    )
    assert given.features == ["a:logits (adapter 6->5)"]
