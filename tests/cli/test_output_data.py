"""The external-data file a large output would get (OUT.data) is an output too: it may not be
the input model's external data, even with --in-place."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest

from onnxpress.cli.main import main

MODEL = Path(__file__).resolve().parents[2] / "models" / "mlp_digits.onnx"


@pytest.mark.parametrize("in_place", [False, True])
def test_output_data_file_never_lands_on_the_input_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], in_place: bool
) -> None:
    model = onnx.load(str(MODEL))
    source = tmp_path / "model.onnx"
    onnx.save(
        model, str(source), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    digest = hashlib.sha256((tmp_path / "model.onnx.data").read_bytes()).hexdigest()
    args = ["optimize", str(source), "-o", str(source)] + (["--in-place"] if in_place else [])
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "model.onnx.data" in err[0] or not in_place  # without it the model clashes first
    assert hashlib.sha256((tmp_path / "model.onnx.data").read_bytes()).hexdigest() == digest
