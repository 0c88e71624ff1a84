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


@pytest.fixture(autouse=True)
def private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caches (prune-channels' sensitivity curves) go to a per-session folder, not ~/.cache."""
    monkeypatch.setenv("ONNXPRESS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
