"""Compiling models of opsets 7-10: ``onnxpress compile`` converts them to opset 13 first
(upgrade-opset in backends/tvm/prepare.py). TVM's importer failed on Upsample-9 and Resize-10
and resized Upsample-7 at the wrong coordinates; compiled now, they match onnxruntime on
the original."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from old_opsets import run, upsample_model

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target  # noqa: E402


@pytest.mark.parametrize(
    ("opset", "mode"), [(7, "nearest"), (8, "linear"), (9, "nearest"), (10, "linear")]
)
def test_upsample_models_compile_to_onnxruntime_s_outputs(
    tmp_path: Path, opset: int, mode: str
) -> None:
    model = upsample_model(opset, mode, (2.0, 1.5))
    result = compile_model(model, parse_target("x86"), tmp_path / "lib")
    x = np.random.default_rng(3).normal(size=(1, 3, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(
        CompiledModel(result.library)(x)[0], run(model, x), rtol=1e-5, atol=1e-5
    )
    assert result.report is not None
    (upgrade,) = [p for p in result.report.passes if p.name == "upgrade-opset"]
    assert upgrade.result.details == [{"opset_upgraded": {"from": opset, "to": 13}}]
