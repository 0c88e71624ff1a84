"""The bundled models in models/ are valid, keep their structure and still meet their metrics.

No torch needed: every check runs the committed .onnx files on onnxruntime against the
committed held-out sets in models/data/, through models/evaluate.py.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
DATA_DIR = MODELS_DIR / "data"
# model file stem -> (metric, bound): accuracy must exceed it, RMSE must stay below it
EXPECTED = {
    "cnn_mnist": ("accuracy", 0.95),
    "cnn_wide_mnist": ("accuracy", 0.95),
    "mobilenet_mnist": ("accuracy", 0.95),
    "mlp_digits": ("accuracy", 0.95),
    "transformer_mnist": ("accuracy", 0.90),
    "encoder_digits": ("accuracy", 0.90),
    "gru_sunspots": ("rmse", 25.0),
    "gru_sunspots_unrolled": ("rmse", 25.0),
    "digit_detector": ("mAP", 0.7),
    "sr_photos": ("psnr", 32.5),
    "ctc_lines": ("CER", 0.05),  # character error rate: must stay below it
    "crnn_lines": ("CER", 0.01),
}
CALIBRATED = [
    "cnn_mnist",
    "cnn_wide_mnist",
    "mobilenet_mnist",
    "mlp_digits",
    "transformer_mnist",
    "encoder_digits",
    "gru_sunspots",
    "digit_detector",
    "sr_photos",
]


def load_evaluate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("models_evaluate", MODELS_DIR / "evaluate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


evaluate_module = load_evaluate()


def ops(name: str) -> Counter[str]:
    model = onnx.load(str(MODELS_DIR / f"{name}.onnx"))
    return Counter(node.op_type for node in model.graph.node)


def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(MODELS_DIR / f"{name}.onnx"), providers=["CPUExecutionProvider"]
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_passes_full_check_with_dynamic_batch(name: str) -> None:
    model = onnx.load(str(MODELS_DIR / f"{name}.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == ["input"]
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name
    assert all(opset.version == 17 for opset in model.opset_import if opset.domain == "")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_meets_its_held_out_metric(name: str) -> None:
    metric, bound = EXPECTED[name]
    result = evaluate_module.evaluate(MODELS_DIR / f"{name}.onnx")
    assert result.metric == metric
    assert result.reference is not None and result.value == pytest.approx(
        result.reference, abs=1e-4
    )
    if metric == "accuracy":
        assert result.value > bound
    elif metric == "mAP":
        assert result.value > bound and result.map50 is not None and result.map50 > 0.9
    elif metric == "psnr":  # and clearly better than bicubic upscaling
        assert result.bicubic_psnr is not None and result.value > result.bicubic_psnr + 0.5
        assert result.value > bound
    elif metric == "CER":
        assert result.value < bound and result.line_accuracy is not None
        assert result.line_accuracy > 0.8
    else:
        assert result.naive_rmse is not None
        assert result.value < min(bound, result.naive_rmse)


def test_cnn_keeps_batchnorm_and_residual_add() -> None:
    counts = ops("cnn_mnist")
    assert counts["BatchNormalization"] >= 4
    assert counts["Conv"] == counts["BatchNormalization"]
    assert counts["Add"] >= 1
    assert (MODELS_DIR / "cnn_mnist.onnx").stat().st_size < 1_000_000


def test_wide_cnn_has_no_batchnorm_and_raw_pixel_inputs() -> None:
    counts = ops("cnn_wide_mnist")
    assert counts["BatchNormalization"] == 0
    assert counts["Conv"] == 6 and counts["Relu"] == 6 and counts["Add"] == 2
    assert (MODELS_DIR / "cnn_wide_mnist.onnx").stat().st_size < 300_000
    with np.load(DATA_DIR / "cnn_wide_mnist_calib.npz", allow_pickle=False) as calibration:
        assert float(calibration["input"].max()) > 100.0  # pixels 0..255, not scaled


def test_mobilenet_has_depthwise_squeeze_excite_and_hardswish() -> None:
    model = onnx.load(str(MODELS_DIR / "mobilenet_mnist.onnx"))
    counts = Counter(node.op_type for node in model.graph.node)
    assert counts["BatchNormalization"] == 13 and counts["HardSwish"] == 9
    assert counts["HardSigmoid"] == 4 and counts["Mul"] == 4 and counts["Add"] == 2
    groups = [
        next((a.i for a in n.attribute if a.name == "group"), 1)
        for n in model.graph.node
        if n.op_type == "Conv"
    ]
    assert sorted(g for g in groups if g > 1) == [64, 128, 128, 256]  # depthwise
    assert (MODELS_DIR / "mobilenet_mnist.onnx").stat().st_size < 1_000_000


def test_detector_concatenates_pixel_boxes_and_scores() -> None:
    counts = ops("digit_detector")
    assert counts["Conv"] == 10 and counts["BatchNormalization"] == 8
    assert counts["Sigmoid"] == 2 and counts["Exp"] == 1
    out = session("digit_detector").run(None, {"input": np.zeros((2, 1, 64, 64), np.float32)})[0]
    assert out.shape == (2, 14, 64)  # (cx, cy, w, h) in pixels + 10 scores, per 8x8 grid cell
    assert out[:, :4].max() > 8 and 0 <= out[:, 4:].min() and out[:, 4:].max() <= 1


def test_super_resolution_has_no_normalization_and_a_pixel_shuffle() -> None:
    counts = ops("sr_photos")
    assert counts["Conv"] == 12 and counts["DepthToSpace"] == 1 and counts["Add"] == 6
    assert counts["BatchNormalization"] == 0
    out = session("sr_photos").run(None, {"input": np.full((2, 1, 32, 32), 128, np.float32)})[0]
    assert out.shape == (2, 1, 64, 64)
    assert np.abs(out - 128).max() < 8  # a flat grey input stays (nearly) flat


def test_transformer_has_attention_and_layernorm() -> None:
    counts = ops("transformer_mnist")
    assert counts["Softmax"] == 2
    assert counts["LayerNormalization"] == 5
    assert counts["MatMul"] >= 12


def test_larger_encoder_has_four_layers_of_eight_heads() -> None:
    model = onnx.load(str(MODELS_DIR / "encoder_digits.onnx"))
    counts = ops("encoder_digits")
    assert counts["Softmax"] == 4 and counts["LayerNormalization"] == 9 and counts["Erf"] == 4
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) >= 1)
    assert params >= 1_000_000
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    assert shapes.count((144, 576)) == 4  # FFN up projections
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert len(reshapes) == 16  # q, k, v split into 8 heads and the merge, per layer


def test_recognizer_ends_in_a_softmax_per_time_step() -> None:
    model = onnx.load(str(MODELS_DIR / "ctc_lines.onnx"))
    last = model.graph.node[-1]
    assert last.op_type == "Softmax" and last.output[0] == "probabilities"
    assert {"Conv", "HardSwish", "MatMul", "LayerNormalization"} <= set(ops("ctc_lines"))
    probabilities = session("ctc_lines").run(None, {"input": np.zeros((2, 1, 28, 140), np.float32)})
    assert probabilities[0].shape == (2, 35, 11)
    np.testing.assert_allclose(probabilities[0].sum(-1), 1.0, rtol=1e-5)


def test_crnn_recognizer_reads_with_one_bidirectional_lstm_op() -> None:
    model = onnx.load(str(MODELS_DIR / "crnn_lines.onnx"))
    (lstm,) = [n for n in model.graph.node if n.op_type == "LSTM"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in lstm.attribute}
    assert attributes["direction"] == b"bidirectional"
    assert model.graph.node[-1].op_type == "Softmax"
    assert ops("crnn_lines")["Conv"] == 5
    probabilities = session("crnn_lines").run(
        None, {"input": np.zeros((3, 1, 32, 128), np.float32)}
    )
    assert probabilities[0].shape == (3, 32, 37)
    np.testing.assert_allclose(probabilities[0].sum(-1), 1.0, rtol=1e-5)


def test_gru_model_uses_a_real_gru_op() -> None:
    counts = ops("gru_sunspots")
    assert counts["GRU"] == 1
    assert counts["MatMul"] == 0


def test_unrolled_gru_has_no_gru_op_and_matches_the_gru_model() -> None:
    counts = ops("gru_sunspots_unrolled")
    assert counts["GRU"] == 0
    assert counts["Tanh"] == 24 and counts["Sigmoid"] == 48
    with np.load(DATA_DIR / "gru_sunspots_eval.npz", allow_pickle=False) as eval_set:
        inputs = eval_set["input"]
    fused = session("gru_sunspots").run(None, {"input": inputs})[0]
    unrolled = session("gru_sunspots_unrolled").run(None, {"input": inputs})[0]
    np.testing.assert_allclose(unrolled, fused, atol=1e-4, rtol=0)
    single = session("gru_sunspots_unrolled").run(None, {"input": inputs[:1]})[0]
    np.testing.assert_allclose(single, fused[:1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CALIBRATED)
def test_calibration_batch_matches_the_model_input(name: str) -> None:
    model_input = session(name).get_inputs()[0]
    with np.load(DATA_DIR / f"{name}_calib.npz", allow_pickle=False) as calibration:
        assert calibration.files == [model_input.name]
        batch = calibration[model_input.name]
    assert batch.dtype == np.float32
    assert batch.shape[0] == 64
    assert list(batch.shape[1:]) == model_input.shape[1:]
    assert np.isfinite(batch).all()


@pytest.mark.parametrize(
    ("file_name", "kind"),
    [
        ("cnn_mnist.opt.onnx", "cnn_mnist"),
        ("cnn_wide_mnist.qdq.onnx", "cnn_wide_mnist"),
        ("gru_sunspots_unrolled.fused.onnx", "gru_sunspots_unrolled"),
        ("gru_sunspots-int8.onnx", "gru_sunspots"),
    ],
)
def test_evaluate_infers_the_kind_from_the_file_name(file_name: str, kind: str) -> None:
    assert evaluate_module.infer_kind(Path(file_name)) == kind


def test_evaluate_cli_on_a_renamed_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "cnn_mnist.opt.onnx"
    copy.write_bytes((MODELS_DIR / "cnn_mnist.onnx").read_bytes())
    assert evaluate_module.main([str(copy), "--data", str(DATA_DIR / "cnn_mnist_eval.npz")]) == 0
    assert "accuracy 0.98" in capsys.readouterr().out
    unknown = tmp_path / "model.onnx"
    unknown.write_bytes(copy.read_bytes())
    assert evaluate_module.main([str(unknown)]) == 2
