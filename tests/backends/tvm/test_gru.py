"""GRU on TVM as a loop (onnxpress.backends.tvm.gru): one recurrence kernel per direction, checked
against onnxruntime (and onnx's reference evaluator for layout=1, which onnxruntime lacks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import REPO
from onnx.reference import ReferenceEvaluator

pytest.importorskip("tvm")

from gru_helpers import BATCH, HID, IN, gru_model

from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.build import build, export, import_relax
from onnxpress.backends.tvm.prepare import LOOP_GRU_PIPELINE, UnsupportedOpsError, prepare
from onnxpress.backends.tvm.runtime import CompiledModel
from onnxpress.backends.tvm.targets import parse_target
from onnxpress.core.manager import VerifyConfig


@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_loop_gru_matches_onnxruntime(tmp_path: Path, lbr: int, direction: str) -> None:
    model = gru_model(lbr=lbr, direction=direction, initial_h=True)
    result = compile_model(model, "x86", tmp_path / "gru")
    assert result.manifest["verification"]["errors"]["Y"] <= 1e-4
    assert result.manifest["verification"]["errors"]["Y_h"] <= 1e-4
    assert all(p["name"] != "lower-gru" for p in result.manifest["prepare"]["passes"])


def test_loop_form_is_one_kernel_per_direction() -> None:
    mod = import_relax(prepare(gru_model(direction="bidirectional"), pipeline=LOOP_GRU_PIPELINE))
    text = mod.script()
    assert text.count("R.call_tir(cls.onnxpress_gru_recurrence") == 2
    assert "T.parallel(" in text and "for step in range(4)" in text  # the loop is kept


def test_batch_first_layout(tmp_path: Path) -> None:
    # onnxruntime has no layout=1 GRU: prepare checks structure only, onnx's reference
    # evaluator gives the expected values.
    model = gru_model(lbr=0, layout=1, direction="bidirectional", initial_h=True)
    prepared = prepare(model, pipeline=LOOP_GRU_PIPELINE, verify=VerifyConfig(level="structure"))
    library = export(
        build(import_relax(prepared), parse_target("x86")), parse_target("x86"), tmp_path
    )
    rng = np.random.default_rng(1)
    x = rng.standard_normal((BATCH, 4, IN)).astype(np.float32)
    h0 = rng.standard_normal((BATCH, 2, HID)).astype(np.float32)
    expected = ReferenceEvaluator(model).run(None, {"X": x, "h0": h0})
    got = CompiledModel(library)(x, h0)
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_long_sequence_stays_one_loop(tmp_path: Path) -> None:
    # Compile time is in tools/bench_tvm_gru.py; here: 200 steps are one kernel, not 200.
    model = gru_model(steps=200, lbr=1)
    text = import_relax(prepare(model, pipeline=LOOP_GRU_PIPELINE)).script()
    assert text.count("R.call_tir(") == 1 and "for step in range(200)" in text
    result = compile_model(model, "x86", tmp_path / "long")
    assert result.manifest["verification"]["errors"]["Y"] <= 1e-4


def test_unsupported_gru_is_named() -> None:
    model = gru_model(activations=["HardSigmoid", "Tanh"])
    with pytest.raises(UnsupportedOpsError, match=r"GRU \(activations .*'gru'"):
        import_relax(prepare(model, pipeline=LOOP_GRU_PIPELINE))


def test_bundled_gru_sunspots_loop(tmp_path: Path) -> None:
    result = compile_model(REPO / "models" / "gru_sunspots.onnx", "x86", tmp_path / "sun")
    assert result.manifest["verification"]["errors"]["prediction"] <= 1e-4


def test_weight_only_int8_gru_compiles(tmp_path: Path) -> None:
    from qdq_helpers import quantize

    qdq, _ = quantize(gru_model(lbr=0, initial_h=True))
    assert "DequantizeLinear" in {n.op_type for n in qdq.graph.node}
    result = compile_model(qdq, "x86", tmp_path / "q")
    assert result.manifest["verification"]["errors"]["Y"] <= 1.0
