"""``onnxpress compile --tune-trials``: MetaSchedule tuning with a persistent database.

Small on purpose: the tiny MLP of helpers.make_mlp (two kernels) and a handful of trials.
The RPC test starts a TVM tracker and an RPC server on loopback (each a subprocess) and
tunes through them; it needs tornado (the tracker's event loop), a dev dependency.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_mlp, run_cli
from onnx import TensorProto, helper, numpy_helper
from tvm_rpc import RPC_KEY, free_port, loopback_rpc_device

pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.rpc import RpcError, RpcSpec, parse_rpc
from onnxpress.backends.tvm.tune import TuneOptions, TuningError, TuningProgress
from onnxpress.backends.tvm.tune_db import LEDGER

SHAPES = {"x": [2, 8]}


def _records(db: Path) -> list[str]:
    return [
        line
        for path in db.glob("*/database_tuning_record.json")
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def test_tuning_writes_records_and_the_result_still_matches_onnxruntime(tmp_path: Path) -> None:
    db = tmp_path / "db"
    events: list[TuningProgress] = []
    result = compile_model(
        make_mlp(),
        "x86",
        tmp_path / "out",
        input_shapes=SHAPES,
        tuning=TuneOptions(4, db),
        on_tuning_progress=events.append,
    )
    tuning = result.manifest["tuning"]
    assert tuning["trials_requested"] == 4 and tuning["share_per_task"] == 2
    assert tuning["trials_run"] == 4 and tuning["records_reused"] == 0
    assert [t["trials"] for t in tuning["tasks"]] == [2, 2]
    assert all(t["records"] == 2 and t["tuned_us"] > 0 for t in tuning["tasks"])
    # The guard: a kernel gets its tuned schedule only where it beat the default schedule,
    # and none does unless the whole model is faster with them.
    for task in tuning["tasks"]:
        assert task["default_us"] > 0
        assert not task["applied"] or task["tuned_us"] < task["default_us"]
    assert tuning["kernels_applied"] == sum(t["applied"] for t in tuning["tasks"])
    model_ms = tuning["model_ms"]
    if model_ms is not None and not model_ms["tuned_faster"]:
        assert tuning["kernels_applied"] == 0
    assert tuning["measured_on"] == "local" and tuning["cost_model"] in ("random", "xgb")
    assert len(_records(db)) == 4
    ledger = json.loads((Path(tuning["database"]) / LEDGER).read_text())["workloads"]
    assert sorted(e["share"] for e in ledger.values()) == [2, 2]
    assert result.manifest["verification"]["errors"]["y"] <= 1e-4
    assert events and events[-1].trials_done == events[-1].trials_total == 4

    # A record whose schedule does not replay (MetaSchedule would refuse the whole file) is
    # moved aside when the database is opened.
    records = next(db.glob("*/database_tuning_record.json"))
    broken = records.read_text().splitlines()[0].replace('"matmul"', '"no_such_block"')
    records.write_text(records.read_text() + broken + "\n")

    # The same kernels (another model with other weights) reuse the records: no new trials.
    again = compile_model(
        make_mlp(seed=1),
        "x86",
        tmp_path / "again",
        input_shapes=SHAPES,
        tuning=TuneOptions(4, db),
    )
    reuse = again.manifest["tuning"]
    assert reuse["trials_run"] == 0 and reuse["records_reused"] == 4
    assert reuse["records_dropped"] == 1 and len(_records(db)) == 4
    assert next(db.glob("*/rejected_records.json")).read_text().strip() == broken
    assert all(t["reused"] for t in reuse["tasks"]) and len(_records(db)) == 4
    assert again.manifest["verification"]["errors"]["y"] <= 1e-4

    # A larger budget gives each kernel a larger share: both are tuned further.
    more = compile_model(
        make_mlp(), "x86", tmp_path / "more", input_shapes=SHAPES, tuning=TuneOptions(6, db)
    ).manifest["tuning"]
    assert more["share_per_task"] == 3 and more["trials_run"] > 0
    assert not any(t["reused"] for t in more["tasks"])


def test_kernels_with_index_inputs_are_left_to_the_default_schedule(tmp_path: Path) -> None:
    rows = numpy_helper.from_array(np.array([2, 0, 1], dtype=np.int64), "rows")
    gather = helper.make_node("Gather", ["x", "rows"], ["g"], axis=0)
    relu = helper.make_node("Relu", ["g"], ["y"])
    graph = helper.make_graph(
        [gather, relu],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])],
        [rows],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(model, "x86", tmp_path / "out", tuning=TuneOptions(2, tmp_path / "db"))
    tuning = result.manifest["tuning"]
    assert list(tuning["skipped"].values()) == [
        "int64 input (e.g. indices): cannot be timed on random data"
    ]
    assert all(name not in tuning["skipped"] for name in (t["name"] for t in tuning["tasks"]))
    assert result.manifest["verification"]["errors"]["y"] <= 1e-4


def test_cli_tunes_with_a_progress_bar(tmp_path: Path) -> None:
    model = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), str(model))
    args = [
        "compile",
        str(model),
        "--input-shape",
        "x=2,8",
        "--tune-trials",
        "2",
        "--tuning-db",
        str(tmp_path / "db"),
        "-o",
        str(tmp_path / "out"),
    ]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "tuning [" in done.stderr and "2/2 trials" in done.stderr
    assert "tuned 2 of 2 kernels: 2 trials (local" in done.stdout
    assert "reused 0 kernels" in done.stdout and "use their best tuned schedule" in done.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tuning"]["trials_run"] == 2


def test_bad_rpc_and_tuning_options_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(RpcError, match="expected TRACKER_HOST:PORT:KEY"):
        parse_rpc("localhost:key")
    with pytest.raises(RpcError, match="not in 1..65535"):
        parse_rpc("localhost:70000:key")
    assert parse_rpc("10.0.0.2:9190:rasp4") == RpcSpec("10.0.0.2", 9190, "rasp4")
    with pytest.raises(TuningError, match="at least 1"):
        TuneOptions(0)
    with pytest.raises(TuningError, match="needs a device to measure on"):
        compile_model(make_mlp(), "cuda", tmp_path / "c", tuning=TuneOptions(2, tmp_path / "db"))
    with pytest.raises(RpcError, match="cannot reach the RPC tracker"):
        compile_model(
            make_mlp(),
            "x86",
            tmp_path / "o",
            input_shapes=SHAPES,
            tuning=TuneOptions(2, tmp_path / "db", RpcSpec("127.0.0.1", free_port(), "k")),
        )
    assert not (tmp_path / "o").exists()
    done = run_cli("compile", "m.onnx", "--tune-trials", "2", "--rpc", "tracker", "-o", "x")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "onnxpress: error: --rpc 'tracker': expected TRACKER_HOST:PORT:KEY, e.g. "
        "127.0.0.1:9190:rasp4"
    )


@pytest.fixture
def rpc_device(tmp_path: Path) -> Iterator[tuple[RpcSpec, Path]]:
    """A TVM RPC tracker and one server registered under RPC_KEY, both on 127.0.0.1."""
    with loopback_rpc_device(tmp_path) as (spec, log):
        assert isinstance(spec, RpcSpec)
        yield spec, log


def test_tuning_measures_on_an_rpc_device(tmp_path: Path, rpc_device: tuple[RpcSpec, Path]) -> None:
    spec, server_log = rpc_device
    with pytest.raises(RpcError, match="no RPC server is registered under key 'other'"):
        compile_model(
            make_mlp(),
            "x86",
            tmp_path / "o",
            input_shapes=SHAPES,
            tuning=TuneOptions(2, tmp_path / "db", RpcSpec(spec.host, spec.port, "other")),
        )
    result = compile_model(
        make_mlp(),
        "x86",
        tmp_path / "out",
        input_shapes=SHAPES,
        tuning=TuneOptions(2, tmp_path / "db", spec),
    )
    tuning = result.manifest["tuning"]
    assert tuning["measured_on"] == f"rpc {spec}" and tuning["trials_run"] == 2
    assert tuning["sessions"] >= 1 and all(t["tuned_us"] > 0 for t in tuning["tasks"])
    timing = tuning["library_timing"]
    assert timing["rpc"] == {"tracker": f"{spec.host}:{spec.port}", "key": RPC_KEY}
    assert timing["median_ms"] > 0 and len(timing["runs_ms"]) == 5
    assert result.manifest["verification"]["errors"]["y"] <= 1e-4
    # The server loaded every measured candidate and the final library.
    loads = server_log.read_text().count("load_module")
    assert loads >= tuning["trials_run"] + 1, server_log.read_text()


def test_a_spent_time_budget_starts_no_kernel_and_records_none(tmp_path: Path) -> None:
    db = tmp_path / "db"
    spent = TuneOptions(4, db, minutes=1e-9)
    result = compile_model(make_mlp(), "x86", tmp_path / "a", input_shapes=SHAPES, tuning=spent)
    tuning = result.manifest["tuning"]
    assert tuning["trials_run"] == 0 and [t["trials"] for t in tuning["tasks"]] == [0, 0]
    assert list(tuning["skipped"].values()) == ["the tuning time budget was spent"] * 2
    ledger = json.loads(next(db.glob(f"*/{LEDGER}")).read_text())
    assert _records(db) == [] and ledger["workloads"] == {}
    # The ledger does not claim them: a run with time to spare tunes both.
    again = compile_model(
        make_mlp(), "x86", tmp_path / "b", input_shapes=SHAPES, tuning=TuneOptions(4, db, minutes=5)
    )
    assert [t["trials"] for t in again.manifest["tuning"]["tasks"]] == [2, 2]
    with pytest.raises(TuningError, match="budget must be positive"):
        TuneOptions(4, db, minutes=0)
    done = run_cli("compile", "m.onnx", "--tune-minutes", "2", "-o", "x")
    assert done.returncode == 1
    assert "--tune-minutes need --tune-trials N" in done.stderr
