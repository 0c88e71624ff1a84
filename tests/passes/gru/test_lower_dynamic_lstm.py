"""lower-dynamic-lstm: quantize_dynamic's com.microsoft DynamicQuantizeLSTM -> unrolled cells
that quantize X once and each row of H per step, as onnxruntime's kernel does; checked
against that kernel on onnxruntime, per-tensor and per-channel weights; refusals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gru_helpers import BATCH, IN, gru_model
from onnxruntime.quantization import QuantType, quantize_dynamic

import onnxpress
from onnxpress.core import manager
from onnxpress.core.targets import TARGETS, host_target
from onnxpress.core.verify import verification_inputs


def dynamic_lstm(
    model: onnx.ModelProto, folder: Path, per_channel: bool, reduce_range: bool = True
) -> onnx.ModelProto:
    """quantize_dynamic's model, by default with 7-bit weights (reduce_range): onnxruntime's
    kernel on AVX2 without VNNI sums u8 x s8 pairs in int16, which full-range weights can
    saturate (255 * 127 * 2 > 32767), and the lowering computes the exact sums."""
    source, target = folder / "float.onnx", folder / "dynamic.onnx"
    onnx.save(model, source)
    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        reduce_range=reduce_range,
    )
    quantized = onnx.load(target)
    assert [n.op_type for n in quantized.graph.node].count("DynamicQuantizeLSTM") >= 1
    return quantized


def _run(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], exact_int8: bool = False
) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if exact_int8:  # onnxruntime's u8 x u8 kernels where its u8 x s8 ones saturate int16 pairs
        options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
    return list(session.run(None, feed))


@pytest.mark.parametrize(
    ("direction", "states", "per_channel"),
    [("forward", False, False), ("reverse", True, True), ("bidirectional", True, False)],
)
def test_lowered_cells_match_onnxruntimes_kernel(
    tmp_path: Path, direction: str, states: bool, per_channel: bool
) -> None:
    float_model = gru_model(
        steps=6, op="LSTM", direction=direction, initial_h=states, outputs=("Y", "Y_h", "Y_c")
    )
    model = dynamic_lstm(float_model, tmp_path, per_channel)
    lowered, report = onnxpress.optimize(model, "lower-dynamic-lstm")
    record = report.passes[0]
    dirs = 2 if direction == "bidirectional" else 1
    assert record.result.counts == {"dynamicquantizelstm_lowered": 1, "steps_unrolled": 6 * dirs}
    assert record.verification.value <= 1e-5  # max-rel against the contrib kernel
    ops = Counter(n.op_type for n in lowered.graph.node)
    assert "DynamicQuantizeLSTM" not in ops
    assert ops["DynamicQuantizeLinear"] == 1  # X once, shared by the directions
    assert ops["ReduceMin"] == ops["ReduceMax"] == 6 * dirs  # each step's H, row by row
    assert ops["MatMul"] == dirs * (1 + 6)
    rng = np.random.default_rng(3)
    feed = {i.name: rng.standard_normal(_shape(i)).astype(np.float32) for i in model.graph.input}
    for want, got in zip(_run(model, feed), _run(lowered, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def test_the_float_lstm_of_the_dequantized_weights_is_further_away(tmp_path: Path) -> None:
    """Why the activations are quantized as the kernel does: without it the outputs move by
    far more than the lowering's error."""
    float_model = gru_model(steps=6, op="LSTM", outputs=("Y",))
    model = dynamic_lstm(float_model, tmp_path, False)
    lowered, _ = onnxpress.optimize(model, "lower-dynamic-lstm")
    feed = {"X": np.random.default_rng(4).standard_normal((6, BATCH, IN)).astype(np.float32)}
    kernel, cells, unquantized = (_run(m, feed)[0] for m in (model, lowered, float_model))
    assert np.abs(cells - kernel).max() < 0.01 * np.abs(unquantized - kernel).max()


def test_full_range_weights_are_judged_against_onnxruntimes_exact_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """quantize_dynamic's default 8-bit weights: on x86 without VNNI onnxruntime's kernel
    saturates its int16 pair sums (0.23 max-rel on the check's inputs), and the check had
    refused the exact lowering there. Where the CPU saturates, the check compares with
    onnxruntime's exact kernels, as VNNI and ARM compute; this runs it so on any CPU."""
    monkeypatch.setattr(manager, "host_target", lambda: TARGETS["avx2"])
    float_model = gru_model(steps=6, op="LSTM", outputs=("Y",))
    model = dynamic_lstm(float_model, tmp_path, False, reduce_range=False)
    lowered, report = onnxpress.optimize(model, "lower-dynamic-lstm")
    assert report.passes[0].verification.value <= 1e-5
    feed = verification_inputs(model, None, 0)[0]  # the check's own inputs
    exact = _run(model, feed, exact_int8=True)[0]
    np.testing.assert_allclose(_run(lowered, feed)[0], exact, rtol=1e-5, atol=1e-6)
    if host_target().saturates:  # this CPU's default kernel, which the lowering is not
        assert np.abs(_run(model, feed)[0] - exact).max() > 0.01 * np.abs(exact).max()


def test_a_stacked_lstm_lowers_layer_by_layer(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)

    class Stacked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(8, 16, num_layers=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lstm(x)[0]

    source = tmp_path / "stacked.onnx"
    example = torch.randn(5, 2, 8)
    torch.onnx.export(
        Stacked().eval(), (example,), source, input_names=["x"], opset_version=17, dynamo=False
    )
    model = dynamic_lstm(onnx.load(source), tmp_path, False)
    lowered, report = onnxpress.optimize(model, "fold-constants,lower-dynamic-lstm")
    assert report.passes[1].result.counts["dynamicquantizelstm_lowered"] == 2
    assert not report.passes[1].result.refusals
    assert report.passes[1].verification.value <= 1e-5
    assert "DynamicQuantizeLSTM" not in {n.op_type for n in lowered.graph.node}


def test_refuses_clip_with_a_reason(tmp_path: Path) -> None:
    model = dynamic_lstm(gru_model(op="LSTM", outputs=("Y",)), tmp_path, False)
    node = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLSTM")
    node.attribute.append(onnx.helper.make_attribute("clip", 3.0))
    _, report = onnxpress.optimize(model, "lower-dynamic-lstm", verify="structure")
    (refusal,) = report.passes[0].result.refusals
    assert refusal.reason == "clip is not lowered"
