"""``search --measure tvm`` and ``--measure rpc://``: latency of TVM libraries, here and on a
device behind a TVM RPC tracker (a loopback tracker and server, tests/tvm_rpc.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_mlp
from tvm_rpc import RPC_KEY, loopback_rpc_device

pytest.importorskip("tvm")

from onnxpress.cli.main import main
from onnxpress.cli.search_tvm import parse_measure
from onnxpress.search.objectives import SearchError


def _tiny_search(tmp_path: Path, measure: str) -> list[str]:
    onnx.save(make_mlp(hidden=64), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 8)).astype(np.float32))
    return [
        "search", str(tmp_path / "m.onnx"), "--calibration", str(tmp_path / "calib.npz"),
        "--measure", measure, "--trials", "1", "--objectives", "accuracy,latency",
        "--out", str(tmp_path / "out"), "--json",
    ]  # fmt: skip


def test_measure_spec() -> None:
    spec = parse_measure("rpc://10.0.0.2:9190/rasp4")
    assert spec is not None and (spec.host, spec.port, spec.key) == ("10.0.0.2", 9190, "rasp4")
    assert parse_measure("tvm") is None
    with pytest.raises(SearchError, match="expected ort, tvm or rpc://HOST:PORT/KEY"):
        parse_measure("rpc://nohost")


def test_latency_measured_over_rpc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with loopback_rpc_device(tmp_path) as (spec, server_log):
        measure = f"rpc://{spec.host}:{spec.port}/{RPC_KEY}"  # type: ignore[attr-defined]
        code = main(_tiny_search(tmp_path, measure))
    printed, err = capsys.readouterr()
    assert code == 0, err
    stored = json.loads((tmp_path / "out" / "search.json").read_text())
    where = f"over RPC (tracker 127.0.0.1:{spec.port}, key {RPC_KEY})"  # type: ignore[attr-defined]
    assert stored["latency_measured_on"].endswith(where)
    (trial,) = stored["trials"]
    assert trial["state"] == "complete" and trial["latency_measured_on"].endswith(where)
    assert trial["measured"]["latency"]["baseline_ms"] > 0
    assert 0 < trial["values"]["latency"] < 20
    assert "upload" in server_log.read_text().lower() or server_log.stat().st_size > 0
    assert json.loads(printed)["front"]


def test_unreachable_tracker_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_tiny_search(tmp_path, "rpc://127.0.0.1:1/none"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("onnxpress: error: "), err
    assert not (tmp_path / "out").exists()
