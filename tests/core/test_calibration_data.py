"""Calibration data is read without pickles and checked against the model's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.errors import CalibrationError


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_file_and_folder(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    rng = np.random.default_rng(0)
    one = _save(tmp_path / "one.npz", x=rng.standard_normal((5, 8)).astype(np.float32))
    calib = CalibrationData.from_path(one)
    calib.validate(mlp_model)
    assert len(calib) == 1
    folder = tmp_path / "batches"
    folder.mkdir()
    for i in range(3):
        _save(folder / f"b{i}.npz", x=rng.standard_normal((2 + i, 8)).astype(np.float32))
    calib = CalibrationData.from_path(folder)
    calib.validate(mlp_model)
    assert [b["x"].shape[0] for b in calib.batches()] == [2, 3, 4]
    assert [b["x"].shape[0] for b in calib.batches(limit=2)] == [2, 3]


def test_iterable(mlp_model: onnx.ModelProto) -> None:
    batches = ({"x": np.ones((2, 8), np.float32) * i} for i in range(3))
    calib = CalibrationData.from_batches(batches)
    calib.validate(mlp_model)
    # A generator is consumed once; the data must still be re-iterable.
    assert len(list(calib.batches())) == len(list(calib.batches())) == 3


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(CalibrationError, match="pickled objects"):
        CalibrationData.from_path(path)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"image": np.zeros((2, 8), np.float32)}, "missing model input"),
        ({"x": np.zeros((2, 8), np.float32), "extra": np.zeros(1)}, "unknown input name"),
        ({"x": np.zeros((2, 8), np.float64)}, "has dtype float64, model expects float32"),
        ({"x": np.zeros((2, 7), np.float32)}, "has shape \\[2, 7\\]"),
        ({"x": np.zeros((8,), np.float32)}, "has rank 1"),
        ({"x": np.full((2, 8), np.nan, np.float32)}, "NaN or Inf"),
    ],
)
def test_mismatches_are_refused(
    tmp_path: Path, mlp_model: onnx.ModelProto, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = _save(tmp_path / "c.npz", **arrays)
    calib = CalibrationData.from_path(path)
    with pytest.raises(CalibrationError, match=message) as info:
        calib.validate(mlp_model)
    assert "c.npz: batch 0" in str(info.value)


def test_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="not a readable .npz"):
        CalibrationData.from_path(tmp_path / "junk.npz")
    with pytest.raises(CalibrationError, match="no such file"):
        CalibrationData.from_path(tmp_path / "nothing.npz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="holds no .npz"):
        CalibrationData.from_path(empty)


def test_samples_are_split_to_a_static_batch_size(tmp_path: Path) -> None:
    from helpers import make_mlp

    model = make_mlp()  # input x: [N, 8] with a symbolic N
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # static batch of 2
    samples = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=samples)
    data = CalibrationData.from_path(tmp_path / "c.npz").fitted_to(model)
    data.validate(model)
    batches = list(data.batches())
    assert len(data) == 3 and [b["x"].shape for b in batches] == [(2, 8)] * 3
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), samples)
    odd = CalibrationData.from_batches([{"x": samples[:5]}]).fitted_to(model)
    with pytest.raises(CalibrationError, match=r"shape \[5, 8\], model expects \[2"):
        odd.validate(model)
