"""The default calibrated pipeline (``onnxpress optimize MODEL --calibration CALIB``) on the
bundled MobileNetV3-style CNN: BatchNorm folded, every Conv int8 behind QDQ pairs, the
Hardswish/Hardsigmoid gates float, the calibration setting chosen by ``method=auto``, and a
held-out accuracy floor (docs/BENCHMARKS.md, QDQ quantization: 0.9880 there, float 0.9880).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxpress

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
DATA_DIR = MODELS_DIR / "data"
NAME = "mobilenet_mnist"
ACCURACY_FLOOR = 0.985  # float: 0.988 on the same 1000 held-out digits

pytestmark = pytest.mark.skipif(
    not (MODELS_DIR / f"{NAME}.onnx").exists(), reason="bundled models missing"
)


def held_out_accuracy(model: onnx.ModelProto) -> float:
    with np.load(DATA_DIR / f"{NAME}_eval.npz", allow_pickle=False) as data:
        images = (data["images"].astype(np.float32) / data["divisor"]).reshape(-1, 1, 28, 28)
        labels = data["labels"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(np.mean(session.run(None, {"input": images})[0].argmax(1) == labels))


@pytest.fixture(scope="module")
def quantized() -> tuple[onnx.ModelProto, onnxpress.Report]:
    return onnxpress.optimize(MODELS_DIR / f"{NAME}.onnx", calibration=DATA_DIR / f"{NAME}_calib.npz")


def test_default_pipeline_keeps_held_out_accuracy(
    quantized: tuple[onnx.ModelProto, onnxpress.Report],
) -> None:
    model, report = quantized
    assert [p.name for p in report.passes][-2:] == ["qdq", "toposort"]
    assert held_out_accuracy(model) >= ACCURACY_FLOOR


def test_default_pipeline_structure(quantized: tuple[onnx.ModelProto, onnxpress.Report]) -> None:
    model, report = quantized
    source = Counter(n.op_type for n in onnx.load(str(MODELS_DIR / f"{NAME}.onnx")).graph.node)
    counts = Counter(n.op_type for n in model.graph.node)
    assert counts["BatchNormalization"] == 0 and counts["Conv"] == source["Conv"]
    assert counts["HardSwish"] == source["HardSwish"]  # float, not in the default op set
    assert counts["HardSigmoid"] == source["HardSigmoid"]
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > counts["QuantizeLinear"]
    weights = {i.name: i for i in model.graph.initializer}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dequantize = next(n for n in model.graph.node if n.output[0] == conv.input[1])
        assert dequantize.op_type == "DequantizeLinear"
        assert weights[dequantize.input[0]].data_type == onnx.TensorProto.INT8
    qdq = next(p for p in report.passes if p.name == "qdq")
    tried = next(d["auto"] for d in qdq.result.details if "auto" in d)
    chosen = next(d["calibration"] for d in qdq.result.details if "calibration" in d)
    assert len(tried) == 6 and [t["error"] for t in tried] == sorted(t["error"] for t in tried)
    assert (chosen["method"], chosen["bias_correction"]) == (
        tried[0]["method"],
        tried[0]["bias_correction"],
    )
    assert chosen["requested"] == "auto"
