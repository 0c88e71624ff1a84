"""The default calibrated pipeline (``onnxpress optimize MODEL --calibration CALIB``) on three
bundled CNNs. The MobileNetV3-style CNN: BatchNorm folded, every Conv int8 behind QDQ pairs,
the Hardswish/Hardsigmoid gates float, the calibration setting chosen by ``method=auto``, and
a held-out accuracy floor (docs/BENCHMARKS.md, QDQ quantization: 0.9880 there, float 0.9880).
The digit detector: held-out mAP floor, its box/class Convs float heads, its output Concat of
pixel boxes and 0..1 scores left float. The super-resolution net: held-out PSNR floor, one
scale across its DepthToSpace, its last Conv a float head.

Each floor holds three ways: on onnxruntime's kernels of this CPU, and under the emulated
int8 arithmetic of both CPU kinds (exact int32 sums as on VNNI/ARM, int16 pair sums as on
AVX2 without VNNI), so a run on either kind of machine checks both.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxpress
from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.targets import EXACT, PAIR_SATURATING

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
DATA_DIR = MODELS_DIR / "data"
NAME = "mobilenet_mnist"
ACCURACY_FLOOR = 0.985  # float: 0.988 on the same 1000 held-out digits

pytestmark = pytest.mark.skipif(
    not (MODELS_DIR / f"{NAME}.onnx").exists(), reason="bundled models missing"
)


ARITHMETICS = ("onnxruntime", EXACT, PAIR_SATURATING)


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray], arithmetic: str) -> np.ndarray:
    """The model's first output on this CPU's onnxruntime, or under an emulated arithmetic."""
    if arithmetic == "onnxruntime":
        session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        return np.asarray(session.run(None, feed)[0])
    runner = EmulatedRunner(model, arithmetic)  # type: ignore[arg-type]
    name, values = next(iter(feed.items()))
    chunks = [runner({name: values[i : i + 250]})[0] for i in range(0, len(values), 250)]
    return np.concatenate(chunks)


def held_out_accuracy(model: onnx.ModelProto, arithmetic: str = "onnxruntime") -> float:
    with np.load(DATA_DIR / f"{NAME}_eval.npz", allow_pickle=False) as data:
        images = (data["images"].astype(np.float32) / data["divisor"]).reshape(-1, 1, 28, 28)
        labels = data["labels"]
    return float(np.mean(run(model, {"input": images}, arithmetic).argmax(1) == labels))


@pytest.fixture(scope="module")
def quantized() -> tuple[onnx.ModelProto, onnxpress.Report]:
    return onnxpress.optimize(
        MODELS_DIR / f"{NAME}.onnx", calibration=DATA_DIR / f"{NAME}_calib.npz"
    )


def test_default_pipeline_keeps_held_out_accuracy(
    quantized: tuple[onnx.ModelProto, onnxpress.Report],
) -> None:
    model, report = quantized
    assert [p.name for p in report.passes][-2:] == ["qdq", "toposort"]
    for arithmetic in ARITHMETICS:
        assert held_out_accuracy(model, arithmetic) >= ACCURACY_FLOOR, arithmetic


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
        weight = weights[dequantize.input[0]]  # int8, or u8 where AVX2 could saturate
        assert weight.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
        if weight.data_type == onnx.TensorProto.UINT8:
            zero = numpy_helper.to_array(weights[dequantize.input[2]])
            assert (zero == 128).all()
    qdq = next(p for p in report.passes if p.name == "qdq")
    tried = next(d["auto"] for d in qdq.result.details if "auto" in d)
    chosen = next(d["calibration"] for d in qdq.result.details if "calibration" in d)
    assert len(tried) == 6 and [t["error"] for t in tried] == sorted(t["error"] for t in tried)
    assert (chosen["method"], chosen["bias_correction"]) == (
        tried[0]["method"],
        tried[0]["bias_correction"],
    )
    assert chosen["requested"] == "auto"


# --- the YOLO-style digit detector: pixel boxes and 0..1 scores in one output ----------------

DETECTOR = "digit_detector"
MAP_FLOOR = 0.775  # float: 0.7831 on 500 held-out scenes (docs/BENCHMARKS.md: 0.7841 there)


@pytest.fixture(scope="module")
def detector() -> tuple[onnx.ModelProto, onnxpress.Report]:
    return onnxpress.optimize(
        MODELS_DIR / f"{DETECTOR}.onnx", calibration=DATA_DIR / f"{DETECTOR}_calib.npz"
    )


def test_detector_keeps_its_map_with_a_float_head(
    detector: tuple[onnx.ModelProto, onnxpress.Report],
) -> None:
    model, report = detector
    spec = importlib.util.spec_from_file_location("models_evaluate", MODELS_DIR / "evaluate.py")
    assert spec is not None and spec.loader is not None
    evaluate_module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_module)
    with np.load(DATA_DIR / f"{DETECTOR}_eval.npz", allow_pickle=False) as data:
        inputs = evaluate_module.model_inputs(dict(data))
        boxes, labels = data["boxes"], data["labels"]
    for arithmetic in ARITHMETICS:
        scores = evaluate_module._detection().mean_average_precision(
            run(model, {"input": inputs}, arithmetic), boxes, labels
        )
        assert scores["map"] >= MAP_FLOOR, arithmetic
    # the box and class Convs are float heads: their outputs feed Sigmoid/Exp, not Q/DQ pairs
    producer = {o: n for n in model.graph.node for o in n.output}
    readers = Counter(i for n in model.graph.node for i in n.input)
    heads = [n for n in model.graph.node if n.name in ("/box/Conv", "/cls/Conv")]
    assert len(heads) == 2
    for head in heads:
        assert producer[head.input[0]].op_type == "DequantizeLinear"  # int8 input and weights
        assert producer[head.input[1]].op_type == "DequantizeLinear"
        consumers = [n.op_type for n in model.graph.node if head.output[0] in n.input]
        assert "QuantizeLinear" not in consumers and readers[head.output[0]] >= 1
    final = next(n for n in model.graph.node if n.output[0] == "detections")
    assert final.op_type == "Concat"
    assert all(producer[i].op_type != "DequantizeLinear" for i in final.input)
    qdq = next(p for p in report.passes if p.name == "qdq")
    assert qdq.result.counts["nodes_quantized"] >= 8


# --- the EDSR-style super-resolution net: raw grey levels, no normalization --------------------

SR = "sr_photos"
PSNR_FLOOR = 32.80  # float 32.883 dB, onnxruntime's best method 32.779 (docs/BENCHMARKS.md)


def test_super_resolution_keeps_its_psnr() -> None:
    model, report = onnxpress.optimize(
        MODELS_DIR / f"{SR}.onnx", calibration=DATA_DIR / f"{SR}_calib.npz"
    )
    with np.load(DATA_DIR / f"{SR}_eval.npz", allow_pickle=False) as data:
        low = data["images"].astype(np.float32)
        target = data["target"].astype(np.float64)
    for arithmetic in ARITHMETICS:
        out = np.clip(run(model, {"input": low}, arithmetic), 0, 255)
        psnr = 10 * np.log10(255.0**2 / np.mean((out - target) ** 2))
        assert psnr >= PSNR_FLOOR, arithmetic
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = {i.name: i for i in model.graph.initializer}
    shuffle = next(n for n in model.graph.node if n.op_type == "DepthToSpace")
    quantizers = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    into, out_q = producer[shuffle.input[0]], quantizers[shuffle.output[0]]
    assert into.op_type == "DequantizeLinear"
    for index in (1, 2):  # one scale and zero point across the DepthToSpace
        assert numpy_helper.to_array(weights[into.input[index]]) == numpy_helper.to_array(
            weights[out_q.input[index]]
        )
    tail = next(n for n in model.graph.node if n.name == "/tail/Conv")
    assert producer[tail.input[1]].op_type == "DequantizeLinear"
    tail_weight = weights[producer[tail.input[1]].input[0]]  # 8-bit (u8 where AVX2 could clip)
    assert tail_weight.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    assert tail.output[0] not in quantizers  # a float head
    assert report.passes[-2].name == "qdq"
