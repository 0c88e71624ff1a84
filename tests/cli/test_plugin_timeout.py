"""A plugin file that hangs while loading is reported by name under --pass-timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from onnxpress.cli.main import main


def test_plugin_that_hangs_while_loading_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plugin = tmp_path / "slow_plugin.py"
    plugin.write_text("import time\ntime.sleep(30)\n")
    model = Path(__file__).resolve().parents[2] / "models" / "mlp_digits.onnx"
    out = tmp_path / "out.onnx"
    started = time.perf_counter()
    code = main(
        ["--plugin", str(plugin), "optimize", str(model), "-o", str(out), "--pass-timeout", "1"]
    )
    assert time.perf_counter() - started < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert "slow_plugin.py" in err[0] and "did not finish loading within 1" in err[0]
    assert not out.exists()
