"""``svd`` then ``qdq`` on the bundled trained transformer, judged on held-out MNIST digits:
the two compose (the pipeline loses no more than the sum of each alone), the factors' middle
channels come out equalized for int8, and bias correction reaches the bias-free first factor.
Also: the budget rule's measured sensitivity and the factor equalization on small graphs."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from onnxpress.passes.svd.factor import equalize

import onnxpress

MODELS = Path(__file__).resolve().parents[3] / "models"
CALIBRATION = MODELS / "data" / "transformer_mnist_calib.npz"
HELD_OUT = 400  # digits of the 1000 held out
QDQ = "qdq{method=mse,recover=false}"  # one method: the test stays fast


def held_out() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "data" / "transformer_mnist_eval.npz")
    images = (data["images"][:HELD_OUT] / data["divisor"]).astype(np.float32)
    return images, data["labels"][:HELD_OUT]


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": images})[0])


@cache
def compressed(passes: str) -> tuple[onnx.ModelProto, onnxpress.Report]:
    model = onnx.load(MODELS / "transformer_mnist.onnx")
    return onnxpress.optimize(model, passes=passes, calibration=str(CALIBRATION), verify="off")


def test_svd_then_qdq_loses_no_more_than_each_alone() -> None:
    images, labels = held_out()
    reference = logits(onnx.load(MODELS / "transformer_mnist.onnx"), images)
    errors, drops = {}, {}
    for name, passes in {
        "svd": "svd{budget=0.5}",
        "qdq": QDQ,
        "both": f"svd{{budget=0.5}},{QDQ}",
    }.items():
        scores = logits(compressed(passes)[0], images)
        errors[name] = np.linalg.norm(scores - reference) / np.linalg.norm(reference)
        drops[name] = np.mean(reference.argmax(1) == labels) - np.mean(scores.argmax(1) == labels)
    assert errors["svd"] > 0.02 and errors["qdq"] > 0.002  # both are lossy
    assert errors["both"] <= errors["svd"] + errors["qdq"]
    assert drops["both"] <= max(drops["svd"], 0) + max(drops["qdq"], 0) + 2 / HELD_OUT


def test_qdq_corrects_the_bias_through_both_factors(kit: SimpleNamespace) -> None:
    """x·U·V + b with a coarse per-tensor U (one large entry): U's rounding shifts the output
    mean, and only V's bias can take it back."""
    rng = np.random.default_rng(3)
    u = rng.standard_normal((16, 4)).astype(np.float32)
    u[0, 0] = 40.0
    v = rng.standard_normal((4, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "U"], ["m"], name="first"),
        helper.make_node("MatMul", ["m", "V"], ["h"], name="second"),
        helper.make_node("Add", ["h", "b"], ["y"], name="bias"),
    ]
    inits = {"U": u, "V": v, "b": np.zeros(16, np.float32)}
    model = kit.model(nodes, {"x": ["n", 16]}, {"y": None}, inits)
    x = (2.0 + rng.random((256, 16))).astype(np.float32)
    calibration = onnxpress.CalibrationData.from_batches([{"x": x}])
    reference = kit.run_ort(model, {"x": x})["y"]
    shifts = {}
    for corrected in ("true", "false"):
        text = f"qdq{{method=minmax,per-channel=false,bias-correction={corrected},recover=false}}"
        out, _ = onnxpress.optimize(model, passes=text, calibration=calibration, verify="off")
        shifts[corrected] = np.abs(np.mean(kit.run_ort(out, {"x": x})["y"] - reference, axis=0))
    assert shifts["true"].mean() < 0.3 * shifts["false"].mean()


def test_budget_spreads_over_attention_and_feed_forward_above_the_floor() -> None:
    _, report = compressed("svd{budget=0.5}")
    details = report.passes[0].result.details
    nodes = [d["nodes"][0] for d in details]
    assert any("/attention/" in n for n in nodes) and any("/ffn/" in n for n in nodes)
    assert all(d["rank"] >= 4 for d in details)  # rank-floor 1/16 of 64
    assert all(d["sensitivity"] is not None and d["sensitivity"] > 0 for d in details)


def test_factors_have_equalized_middle_channels() -> None:
    model, _ = compressed("svd{budget=0.5}")
    middles = [n.output[0] for n in model.graph.node if n.name.endswith("_svd_u")]
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(helper.make_empty_tensor_value_info(m) for m in middles)
    session = ort.InferenceSession(exposed.SerializeToString())
    batch = dict(np.load(CALIBRATION))
    values = session.run(middles, {"input": batch["input"]})
    for middle in values:
        rms = np.sqrt(np.mean(middle.reshape(-1, middle.shape[-1]) ** 2, axis=0))
        assert rms.max() / rms.min() < 1.01  # equal RMS (the refit keeps U: exact)


def test_equalize_keeps_the_product() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) * np.array([10, 1, 1, 0.1, 1, 3])
    u, v = rng.standard_normal((6, 3)), rng.standard_normal((3, 5))
    u2, v2 = equalize(u, v, x.T @ x)
    np.testing.assert_allclose(u2 @ v2, u @ v, rtol=1e-12, atol=1e-12)
    rms = np.sqrt(np.mean((x @ u2) ** 2, axis=0))
    np.testing.assert_allclose(rms, rms[0], rtol=1e-9)


def test_sensitivity_cuts_the_layer_the_outputs_barely_see(kit: SimpleNamespace) -> None:
    """y = x·W0 + 0.01·(x·W1): W1's truncation costs the output 10⁴ times less."""
    rng = np.random.default_rng(1)
    size = 32
    decay = np.diag(0.8 ** np.arange(size))
    w0, w1 = (rng.standard_normal((size, size)) @ decay for _ in range(2))
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["a"], name="loud"),
        helper.make_node("MatMul", ["x", "W1"], ["b"], name="quiet"),
        helper.make_node("Mul", ["b", "tiny"], ["c"], name="scale"),
        helper.make_node("Add", ["a", "c"], ["y"], name="sum"),
    ]
    inits = {"W0": w0.astype(np.float32), "W1": w1.astype(np.float32)}
    inits["tiny"] = np.array(0.01, np.float32)
    model = kit.model(nodes, {"x": ["n", size]}, {"y": None}, inits)
    batches = [{"x": rng.standard_normal((64, size)).astype(np.float32)} for _ in range(2)]
    calibration = onnxpress.CalibrationData.from_batches(batches)
    ranks = {}
    for text in ("svd{budget=0.5,sensitivity=false}", "svd{budget=0.5}"):
        _, report = onnxpress.optimize(model, passes=text, calibration=calibration, verify="off")
        ranks[text] = {d["nodes"][0]: d["rank"] for d in report.passes[0].result.details}
    assert (
        ranks["svd{budget=0.5,sensitivity=false}"]["loud"]
        == ranks["svd{budget=0.5,sensitivity=false}"]["quiet"]
    )
    weighed = ranks["svd{budget=0.5}"]
    assert weighed["quiet"] < weighed["loud"]
