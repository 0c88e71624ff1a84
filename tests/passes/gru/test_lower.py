"""lower-gru: ONNX GRU ops -> per-step primitive ops, checked on onnxruntime by the manager.

Each test builds a one-GRU model in a few lines, runs the pass under the pass manager
(numeric verification against the GRU op, lossless tolerance), and asserts that no GRU is
left, what the report counts, and the refusals with their reasons.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from gru_helpers import BATCH, HID, IN, gru_model
from onnx.reference import ReferenceEvaluator

import onnxpress
from onnxpress.core.verify import Runner

MODELS = Path(__file__).resolve().parents[3] / "models"


def lower(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Any]:
    result, report = onnxpress.optimize(model, "lower-gru")
    return result, report.passes[0].result


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_lowers_both_reset_modes_and_directions(lbr: int, direction: str) -> None:
    result, record = lower(gru_model(lbr=lbr, direction=direction, initial_h=True))
    ops = Counter(n.op_type for n in result.graph.node)
    dirs = 2 if direction == "bidirectional" else 1
    assert "GRU" not in ops
    assert record.counts == {"gru_lowered": 1, "steps_unrolled": 4 * dirs}
    assert ops["Tanh"] == ops["Sigmoid"] == 4 * dirs
    assert ops["MatMul"] == dirs * (1 + 4 * (1 if lbr else 2))
    assert [o.name for o in result.graph.output] == ["Y", "Y_h"]


@pytest.mark.parametrize(
    ("lbr", "direction", "outputs"),
    [(0, "forward", ("Y_h",)), (1, "bidirectional", ("Y", "Y_h"))],
)
def test_batch_first_layout_no_bias(lbr: int, direction: str, outputs: tuple[str, ...]) -> None:
    # onnxruntime has no layout=1 GRU: compare with onnx's reference implementation.
    model = gru_model(
        lbr=lbr, layout=1, bias=False, outputs=outputs, initial_h=True, direction=direction
    )
    result, report = onnxpress.optimize(model, "lower-gru", verify="structure")
    assert report.passes[0].result.counts["gru_lowered"] == 1
    if "Y" not in outputs:
        assert "Concat" not in {n.op_type for n in result.graph.node}  # Y is not stacked
    rng = np.random.default_rng(1)
    dirs = 2 if direction == "bidirectional" else 1
    feed = {
        "X": rng.standard_normal((BATCH, 4, IN)).astype(np.float32),
        "h0": rng.standard_normal((BATCH, dirs, HID)).astype(np.float32),
    }
    expected = ReferenceEvaluator(model).run(None, feed)
    got = ReferenceEvaluator(result).run(None, feed)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_clip_and_full_length_sequence_lens() -> None:
    model = gru_model(lbr=0, clip=0.7, seq_lens=[4, 4])
    result, record = lower(model)
    assert record.counts["gru_lowered"] == 1
    assert Counter(n.op_type for n in result.graph.node)["Clip"] == 8


@pytest.mark.parametrize(
    ("op", "direction"), [("GRU", "reverse"), ("LSTM", "bidirectional"), ("LSTM", "forward")]
)
def test_sequence_lens_masks_the_steps(op: str, direction: str) -> None:
    """Lengths given at run time (0 included, from given initial states): states kept past
    a row's length, Y zero there; as onnxruntime's op on every length 0..T."""
    model = gru_model(op=op, direction=direction, initial_h=True, seq_lens=[4, 2])
    (lens,) = [t for t in model.graph.initializer if t.name == "lens"]
    model.graph.initializer.remove(lens)
    model.graph.input.append(onnx.helper.make_tensor_value_info("lens", 6, [BATCH]))
    result, report = onnxpress.optimize(model, f"lower-{op.lower()}")
    assert report.passes[0].result.counts[f"{op.lower()}_lowered"] == 1
    assert op not in {n.op_type for n in result.graph.node}
    rng = np.random.default_rng(2)
    dirs = 2 if direction == "bidirectional" else 1
    for lengths in ([4, 0], [1, 3], [0, 0]):
        feed = {
            "X": rng.standard_normal((4, BATCH, IN)).astype(np.float32),
            "h0": rng.standard_normal((dirs, BATCH, HID)).astype(np.float32),
            "lens": np.array(lengths, np.int32),
        }
        if op == "LSTM":
            feed["c0"] = rng.standard_normal((dirs, BATCH, HID)).astype(np.float32)
        for want, have in zip(Runner(model)(feed), Runner(result)(feed), strict=True):
            np.testing.assert_allclose(have, want, rtol=0, atol=1e-5)


def test_masked_only_leaves_full_length_ops_for_loop_kernels() -> None:
    """What `onnxpress compile` runs before the loop kernels, which take no sequence_lens."""
    masked, whole = gru_model(seq_lens=[4, 2]), gru_model(op="LSTM")
    for model, op in ((masked, "GRU"), (whole, "LSTM")):
        passes = f"lower-{op.lower()}{{masked-only=true}}"
        result, report = onnxpress.optimize(model, passes)
        record = report.passes[0].result
        left = op in {n.op_type for n in result.graph.node}
        assert left == (model is whole)
        if left:
            assert "no sequence_lens, and masked-only=true" in record.refusals[0].reason


def test_long_sequence_matches_onnxruntime() -> None:
    _, record = lower(gru_model(steps=200, lbr=1))
    assert record.counts["steps_unrolled"] == 200


def test_refusals_say_why() -> None:
    cases = {
        "input X has no static shape": gru_model(steps="T"),
        "activations": gru_model(activations=["HardSigmoid", "Tanh"]),
    }
    for reason, model in cases.items():
        result, record = lower(model)
        assert [n.op_type for n in result.graph.node] == ["GRU"]
        assert len(record.refusals) == 1 and reason in record.refusals[0].reason, reason


def test_bundled_gru_sunspots() -> None:
    model = onnx.load(str(MODELS / "gru_sunspots.onnx"))
    for vi in model.graph.input:
        vi.type.tensor_type.shape.dim[0].dim_value = 3
    result, record = lower(model)
    assert record.counts == {"gru_lowered": 1, "steps_unrolled": 24}
    assert "GRU" not in {n.op_type for n in result.graph.node}
