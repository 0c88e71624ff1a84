"""Calibration statistics reused across models that share a graph prefix (calibration.cache):
the second run takes what the first observed above the changed layer, measures the rest,
and quantizes to the same bytes as a run without the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxpress.passes.qdq.calibrate import observe

from onnxpress.calibration.cache import StatisticsCache, cone_keys
from onnxpress.calibration.observers import HistogramObserver
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.manager import PassManager, VerifyConfig
from onnxpress.core.pipeline import parse_pipeline

MODELS = Path(__file__).resolve().parents[2] / "models"


def _cnn() -> tuple[onnx.ModelProto, CalibrationData]:
    model = onnx.load(str(MODELS / "cnn_mnist.onnx"))
    data = CalibrationData.from_path(MODELS / "data" / "cnn_mnist_calib.npz").fitted_to(model)
    return model, data


def _last_layer(model: onnx.ModelProto) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")][-1]


def _with_last_weight_scaled(model: onnx.ModelProto) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    weight = _last_layer(changed).input[1]
    for i, tensor in enumerate(changed.graph.initializer):
        if tensor.name == weight:
            array = numpy_helper.to_array(tensor) * np.float32(0.5)
            changed.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, weight))
    return changed


def _states(obs: object) -> dict[str, tuple[float, float, bytes]]:
    found = {}
    for name, o in obs.ranges.items():  # type: ignore[attr-defined]
        assert isinstance(o, HistogramObserver)
        found[name] = (o.width, o.total, o.counts.tobytes())
    return found


def test_cone_keys_ignore_names_and_follow_values() -> None:
    model, _ = _cnn()
    names = [n.output[0] for n in model.graph.node]
    keys = cone_keys(model, names)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    for node in renamed.graph.node:  # intermediate names and node names do not matter
        node.name = f"x{node.name}"
    assert cone_keys(renamed, names) == keys
    changed = _with_last_weight_scaled(model)
    after = cone_keys(changed, names)
    last = _last_layer(model).output[0]
    assert after[last] != keys[last]
    assert all(after[n] == keys[n] for n in names[: names.index(last)])


def test_a_second_model_reuses_the_unchanged_prefix(tmp_path: Path) -> None:
    model, data = _cnn()
    tensors = [model.graph.input[0].name] + [n.output[0] for n in model.graph.node]
    store = StatisticsCache(tmp_path)
    first = observe(model, tensors, {}, data, 512, 2, store)
    assert first.reused == 0 and store.misses == len(tensors)
    changed = _with_last_weight_scaled(model)
    downstream = tensors[tensors.index(_last_layer(model).output[0]) :]
    # a fresh cache object on the same folder: what a resumed search or a worker sees
    second = observe(changed, tensors, {}, data, 512, 2, StatisticsCache(tmp_path))
    assert second.reused == len(tensors) - len(downstream) > 0
    plain = observe(changed, tensors, {}, data, 512, 2)
    assert _states(second) == _states(plain)


def test_quantized_model_is_the_same_with_and_without_reuse() -> None:
    model, data = _cnn()
    text = "fold-constants,fold-batchnorm,qdq{method=percentile,refit=off,recover=false}"
    off = VerifyConfig(level="off")
    plain, _ = PassManager(parse_pipeline(text), off, data).run(model)
    store = StatisticsCache()
    first, report = PassManager(parse_pipeline(text), off, data, statistics=store).run(model)
    assert report.passes[-1].result.counts["calibration_statistics_reused"] == 0
    second, report = PassManager(parse_pipeline(text), off, data, statistics=store).run(model)
    reused = report.passes[-1].result.counts["calibration_statistics_reused"]
    assert reused == store.hits > 0 and store.hits == store.misses
    expected = plain.SerializeToString()
    assert first.SerializeToString() == expected == second.SerializeToString()
