"""Compiling an int8 model in onnxruntime's QOperator format: compile's prepare pipeline
rewrites it as QDQ (qop-to-qdq), and its convolutions and Gemm run on integer kernels,
within a quantization step of onnxruntime on the original model. TVM's importer refused
QLinearConv and the com.microsoft ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from qop_models import SHAPE, qoperator_net

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target  # noqa: E402


def test_a_qoperator_model_compiles_to_integer_kernels(tmp_path: Path) -> None:
    model = qoperator_net(tmp_path)
    result = compile_model(model, parse_target("x86"), tmp_path / "lib")
    # the max pool on the bytes runs in the integer layout too (qop-to-qdq wraps it)
    assert result.manifest["int8"]["lowered"] == {"conv2d": 2, "matmul": 1, "max_pool2d": 1}
    assert result.manifest["verification"]["errors"]["y"] <= 1.0 + 1e-3  # quantization steps
    x = np.random.default_rng(4).normal(size=SHAPE).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = CompiledModel(result.library)(x)[0]
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()
    assert result.report is not None
    (qop,) = [p for p in result.report.passes if p.name == "qop-to-qdq"]
    assert qop.result.counts["QLinearConv"] == 2
