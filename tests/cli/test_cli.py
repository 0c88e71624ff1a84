"""The CLI: happy paths, and every bad input gives one line, a non-zero exit and no output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import files_in, make_mlp, run_cli
from onnx import TensorProto, helper

from onnxpress.cli.main import main

DATA = Path(__file__).parent.parent / "data"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_failure(code: int, err: str, folder: Path, before: set[str], expect: str) -> None:
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxpress: error: ") and expect in lines[0], lines[0]
    assert "Traceback" not in err
    assert files_in(folder) == before


def test_optimize_writes_model_and_report(
    mlp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = mlp_path.with_name("o.onnx"), mlp_path.with_name("r.json")
    code, stdout, _ = _run(
        capsys,
        "optimize",
        str(mlp_path),
        "-o",
        str(out),
        "--passes",
        "cleanup,toposort",
        "--report",
        str(report),
    )
    assert code == 0
    assert "cleanup" in stdout and "identity_removed=1" in stdout and f"wrote {out}" in stdout
    data = json.loads(report.read_text())
    assert data["pipeline"] == "cleanup,toposort" and data["after"]["nodes"] == 4
    assert len(onnx.load(str(out)).graph.node) == 4


def test_default_output_name_and_json(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _run(capsys, "optimize", str(mlp_path), "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["output"].endswith("mlp.opt.onnx")
    assert [p["name"] for p in data["passes"]] == [
        "fold-constants",
        "fold-batchnorm",
        "fuse-lstm",
        "fuse-gru",
        "cleanup",
        "fix-saturation",
        "toposort",
    ]
    assert (mlp_path.parent / "mlp.opt.onnx").exists()


def test_recipe(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = mlp_path.with_name("r.toml")
    recipe.write_text('[verify]\nlevel = "structure"\n[[pass]]\nname = "cleanup"\n')
    code, stdout, _ = _run(capsys, "optimize", str(mlp_path), "--recipe", str(recipe), "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["verify"] == "structure" and data["pipeline"] == "cleanup"


def test_in_place(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = _run(
        capsys, "optimize", str(mlp_path), "-o", str(mlp_path), "--passes", "cleanup", "--in-place"
    )
    assert code == 0
    assert len(onnx.load(str(mlp_path)).graph.node) == 4


def test_inspect(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _run(capsys, "inspect", str(mlp_path), "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 8]}]
    assert info["op_histogram"] == {"MatMul": 2, "Add": 1, "Relu": 1, "Identity": 1}
    assert info["macs_by_op"] == {"MatMul": 8 * 16 + 16 * 4}
    assert info["params"] == 8 * 16 + 16 + 16 * 4 + 3
    assert info["file_bytes"] == mlp_path.stat().st_size
    code, stdout, _ = _run(capsys, "inspect", str(mlp_path))
    assert "MatMul" in stdout and "[batch, 8]" in stdout


def test_passes_listing(capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = _run(capsys, "passes", "--json")
    assert code == 0
    entries = {e["name"]: e for e in json.loads(stdout)}
    assert {"cleanup", "toposort", "fold-constants", "fold-batchnorm"} <= set(entries)
    assert entries["cleanup"]["options"][0] == {"name": "identity", "type": "bool", "default": True}


def _cyclic_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["x", "c"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["c"], name="second"),
        helper.make_node("Relu", ["a"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "cyc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _unknown_op_model() -> onnx.ModelProto:
    model = make_mlp()
    model.graph.node[2].op_type = "Rectify"
    return model


BAD_MODELS = {
    "empty": (lambda: b"", "empty file"),
    "garbage": (lambda: b"\x00\x01garbage\xff" * 10, "not an ONNX model"),
    "truncated": (lambda: make_mlp().SerializeToString()[:150], "not an ONNX model"),
    "checker": (lambda: _unknown_op_model().SerializeToString(), "fails the ONNX checker"),
    "cycle": (
        lambda: _cyclic_model().SerializeToString(),
        "graph has a cycle: first -> second -> first",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_models(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    make, expect = BAD_MODELS[case]
    path = tmp_path / "bad.onnx"
    path.write_bytes(make())
    before, content = files_in(tmp_path), path.read_bytes()
    code, _, err = _run(capsys, "optimize", str(path), "--passes", "cleanup")
    _assert_clean_failure(code, err, tmp_path, before, expect)
    assert str(path) in err and path.read_bytes() == content


def test_external_data_outside_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inner = tmp_path / "m"
    inner.mkdir()
    path = inner / "ext.onnx"
    onnx.save_model(
        make_mlp(), str(path), save_as_external_data=True, location="w.bin", size_threshold=64
    )
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    path.write_bytes(model.SerializeToString())
    (inner / "w.bin").rename(tmp_path / "w.bin")
    before = files_in(inner)
    code, _, err = _run(capsys, "optimize", str(path), "--passes", "cleanup")
    _assert_clean_failure(code, err, inner, before, "leaves the model folder")


CALIBRATION = {
    "pickle": ({"x": np.array([{"evil": 1}], dtype=object)}, "pickled objects"),
    "names": ({"input": np.zeros((2, 8), np.float32)}, "missing model input"),
    "shape": ({"x": np.zeros((2, 9), np.float32)}, "model expects"),
    "dtype": ({"x": np.zeros((2, 8), np.int64)}, "has dtype int64"),
    "nan": ({"x": np.full((2, 8), np.nan, np.float32)}, "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(CALIBRATION))
def test_bad_calibration(mlp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    arrays, expect = CALIBRATION[case]
    calib = mlp_path.with_name("calib.npz")
    np.savez(calib, **arrays)
    before = files_in(mlp_path.parent)
    code, _, err = _run(capsys, "optimize", str(mlp_path), "--calibration", str(calib))
    _assert_clean_failure(code, err, mlp_path.parent, before, expect)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (("--passes", "cleanup,frobnicate"), "unknown pass 'frobnicate'"),
        (("--passes", "cleanup{speed=9}"), "pass 'cleanup': unknown option 'speed'"),
        (("--passes", "cleanup{identity=sure}"), "option 'identity': expected true or false"),
        (("--budget", "-1"), "budget must be a finite number >= 0"),
        (("--plugin", str(DATA / "raising_plugin.py")), "plugin raised ImportError"),
        (
            ("--plugin", str(DATA / "bad_plugins.py"), "--passes", "explode"),
            "pass 'explode' failed: RuntimeError: boom in the user's pass",
        ),
        (
            ("--plugin", str(DATA / "bad_plugins.py"), "--passes", "cleanup,break-graph"),
            "verification failed after pass 'break-graph'",
        ),
        (
            ("--plugin", str(DATA / "bad_plugins.py"), "--passes", "cleanup,wrong-values"),
            "verification failed after pass 'wrong-values': output 'y' differs",
        ),
        (
            (
                "--plugin",
                str(DATA / "bad_plugins.py"),
                "--passes",
                "cleanup,wrong-values,toposort",
                "--verify",
                "structure",
                "--bisect",
            ),
            "pass #2 'wrong-values' is the first",
        ),
    ],
)
def test_bad_usage(
    mlp_path: Path, args: tuple[str, ...], expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = tuple(str(mlp_path) if a == "SELF" else a for a in args)
    before, content = files_in(mlp_path.parent), mlp_path.read_bytes()
    code, _, err = _run(capsys, "optimize", str(mlp_path), *args)
    _assert_clean_failure(code, err, mlp_path.parent, before, expect)
    assert mlp_path.read_bytes() == content


def test_output_over_input_is_a_usage_error(
    mlp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before, content = files_in(mlp_path.parent), mlp_path.read_bytes()
    code, _, err = _run(capsys, "optimize", str(mlp_path), "-o", str(mlp_path))
    assert code == 2 and "would overwrite the input model" in err and len(err.splitlines()) == 1
    assert files_in(mlp_path.parent) == before and mlp_path.read_bytes() == content


def test_missing_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "inspect", str(tmp_path / "nope.onnx"))
    _assert_clean_failure(code, err, tmp_path, set(), "no such file")


def test_subprocess_exit_codes_and_debug(mlp_path: Path) -> None:
    proc = run_cli("optimize", str(mlp_path), "--passes", "nope")
    assert proc.returncode == 1 and proc.stderr.strip() == "onnxpress: error: unknown pass 'nope'"
    proc = run_cli("--debug", "optimize", str(mlp_path), "--passes", "nope")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = run_cli("optimize")
    assert proc.returncode == 2


def test_ctrl_c_exits_130_and_writes_nothing(mlp_path: Path) -> None:
    marker = mlp_path.with_name("started")
    before = files_in(mlp_path.parent)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onnxpress.cli",
            "optimize",
            str(mlp_path),
            "--plugin",
            str(DATA / "bad_plugins.py"),
            "--passes",
            f"cleanup,sleep{{marker={marker}}}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a test run in the background (nohup, some CI runners) ignores SIGINT, and a child
        # inherits that: Python would then never raise KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        text=True,
    )
    deadline = time.monotonic() + 240  # a loaded machine starts slowly
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert files_in(mlp_path.parent) == before | {"started"}


def test_holdout_needs_more_batches_than_it_holds(
    mlp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    calib = mlp_path.with_name("calib.npz")
    np.savez(calib, x=np.ones((2, 8), np.float32))
    before = files_in(mlp_path.parent)
    code, _, err = _run(
        capsys, "optimize", str(mlp_path), "--calibration", str(calib), "--holdout", "1"
    )
    _assert_clean_failure(code, err, mlp_path.parent, before, "cannot hold out 1 of 1")
