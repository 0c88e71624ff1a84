"""qdq refit (``passes/qdq/refit.py``): layer-wise least squares of the quantized layers
against the float model, on held-out inputs, its records, and the layers it must skip."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
from onnx import helper
from qdq_helpers import View, quantize, weights

node = helper.make_node


def chain(kit: SimpleNamespace) -> onnx.ModelProto:
    w1, w2, w3 = weights(21, (8, 3, 3, 3), (8, 8, 3, 3), (4, 8, 1, 1))
    return kit.model(
        [
            node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"], name="relu1"),
            node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
            node("Relu", ["c2"], ["r2"], name="relu2"),
            node("Conv", ["r2", "W3"], ["y"], name="conv3"),
        ],
        {"x": [4, 3, 8, 8]},
        {"y": None},
        {"W1": w1, "W2": w2, "W3": w3},
    )


def uniform(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def rel_l2(
    kit: SimpleNamespace, model: onnx.ModelProto, reference: onnx.ModelProto, data: list[Any]
) -> float:
    got = np.concatenate([kit.run_ort(model, feeds)["y"] for feeds in data])
    want = np.concatenate([kit.run_ort(reference, feeds)["y"] for feeds in data])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_refit_lowers_each_layers_error_and_keeps_the_structure(kit: SimpleNamespace) -> None:
    model = chain(kit)
    calib, held_out = uniform(8, seed=1), uniform(8, seed=99)
    # saturation remedies would differ per model: refit alone is compared on an exact target
    exact = ["avx512-vnni"]
    plain, _ = quantize(model, "qdq{method=minmax}", calibration=calib, targets=exact)
    refit, record = quantize(model, "qdq{method=minmax,refit=on}", calibration=calib, targets=exact)
    details = next(d["refit"] for d in record.result.details if "refit" in d)
    # conv1 sees only the rounding of x: its refit, rounded again, is no better and is dropped
    refit_layers = [layer["layer"] for layer in details["layers"] if layer["refit"]]
    assert details["kept"] and refit_layers == ["conv2", "conv3"]
    assert record.result.counts["layers_refit"] == 2
    for layer in details["layers"]:
        assert layer["rows"] == 8 * 4 * 64  # every output position of every sample
        if layer["refit"]:
            assert layer["error_after"] < 0.95 * layer["error_before"]
        else:
            assert layer["error_after"] == layer["error_before"]
    # end to end: closer to the float model on the calibration data, no worse on new data
    assert rel_l2(kit, refit, model, calib) < 0.97 * rel_l2(kit, plain, model, calib)
    assert rel_l2(kit, refit, model, held_out) < 1.02 * rel_l2(kit, plain, model, held_out)
    ops = [sorted(n.op_type for n in m.graph.node) for m in (plain, refit)]
    assert ops[0] == ops[1]
    before, after = View(plain), View(refit)
    for name in ("conv1", "conv2", "conv3"):
        new = after.dq(name, 1)[0]
        assert new.dtype == np.int8 and new.shape == before.dq(name, 1)[0].shape
        assert np.array_equal(new, before.dq(name, 1)[0]) == (name == "conv1")


def test_refit_skips_a_layer_with_too_few_rows(kit: SimpleNamespace) -> None:
    (w,) = weights(22, (64, 10))
    model = kit.model(
        [node("Gemm", ["x", "W"], ["y"], name="fc")], {"x": [4, 64]}, {"y": None}, {"W": w}
    )
    _, record = quantize(model, "qdq{refit=on}")  # 4 batches of 4 rows for 65 unknowns
    (layer,) = next(d["refit"] for d in record.result.details if "refit" in d)["layers"]
    assert not layer["refit"] and layer["reason"] == "16 calibration rows for 65 inputs"
    assert record.result.counts["layers_refit"] == 0


def test_refit_auto_keeps_it_only_when_the_outputs_get_closer(kit: SimpleNamespace) -> None:
    calib = uniform(8, seed=2)
    _, record = quantize(chain(kit), "qdq{method=minmax,refit=auto}", calibration=calib)
    details = next(d["refit"] for d in record.result.details if "refit" in d)
    assert details["kept"] == (details["error_after"] < details["error_before"])
    improved = sum(layer["refit"] for layer in details["layers"])
    assert improved >= 2
    assert record.result.counts["layers_refit"] == (improved if details["kept"] else 0)
    _, off = quantize(chain(kit), calibration=calib)
    assert not any("refit" in d for d in off.result.details)  # off by default
