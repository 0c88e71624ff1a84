"""The budget rule's probes run each truncated weight only from its layer's inputs on, and
measure what whole-model runs measure; the allocation reads only the first batches that
give every layer ``ALLOCATION_ROWS`` rows."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import residual_chain
from onnx import numpy_helper
from onnxpress.passes.svd import factor
from onnxpress.passes.svd.sensitivity import (
    SENSITIVITY_POWER,
    Probe,
    Stage,
    measure_sensitivity,
)

from onnxpress.analysis.probes import relative_change
from onnxpress.analysis.refit import Tap

SIZE = 16


def chain(blocks: int) -> onnx.ModelProto:
    """x -> [x = x + Tanh(x·W_i)] * blocks -> y."""
    return residual_chain(blocks, SIZE, "Tanh", scale=0.25)


def outputs(model: onnx.ModelProto, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(a) for a in session.run(None, batch)]


def test_probes_from_the_border_measure_what_whole_model_runs_measure() -> None:
    model = chain(3)
    batch = {"x": np.random.default_rng(1).standard_normal((32, SIZE)).astype(np.float32)}
    rng = np.random.default_rng(2)
    probes = {
        f"W{i}": Probe(rng.standard_normal((SIZE, SIZE)).astype(np.float32) / 4, 0.1 * (i + 1))
        for i in range(3)
    }
    stages = [Stage([f"W{i}"], ["x" if i == 0 else f"r{i - 1}"]) for i in range(3)]
    measured = measure_sensitivity(model, probes, batch, stages)
    reference = outputs(model, batch)
    raw = {}
    for name, probe in probes.items():
        altered = onnx.ModelProto()
        altered.CopyFrom(model)
        for tensor in altered.graph.initializer:
            if tensor.name == name:
                tensor.CopyFrom(numpy_helper.from_array(probe.truncated, name))
        raw[name] = relative_change(reference, outputs(altered, batch)) / probe.layer_error
    mean = np.mean(list(raw.values()))
    for name, value in raw.items():
        np.testing.assert_allclose(measured[name], (value / mean) ** SENSITIVITY_POWER, rtol=1e-3)
    assert len(set(np.round(list(measured.values()), 3))) == 3  # the probes differ


def test_allocation_reads_only_the_batches_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    model = chain(2)
    rng = np.random.default_rng(3)
    data = [{"x": rng.standard_normal((10, SIZE)).astype(np.float32)} for _ in range(6)]

    def batches() -> list[dict[str, np.ndarray]]:
        return data

    taps = [
        Tap(f"W{i}#0", "x" if i == 0 else "r0", lambda a: a.reshape(-1, SIZE), SIZE) for i in (0, 1)
    ]
    monkeypatch.setattr(factor, "ALLOCATION_ROWS", 25)  # 10 rows a batch: 3 batches
    moments = factor.allocation_moments(model, taps, batches)
    assert moments["W0#0"].count == 30 and moments["W1#0"].count == 30
    x = np.concatenate([b["x"] for b in data[:3]]).astype(np.float64)
    np.testing.assert_allclose(moments["W0#0"].xtx, x.T @ x, rtol=1e-5, atol=1e-5 * 30)
