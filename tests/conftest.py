"""Shared fixtures: small ONNX models built in a few lines."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from helpers import make_mlp


@pytest.fixture
def mlp_model() -> onnx.ModelProto:
    return make_mlp()


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), str(path))
    return path
