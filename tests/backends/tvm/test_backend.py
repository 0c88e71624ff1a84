"""onnxpress compile / run through Apache TVM (skipped when TVM is not installed).

Kept small: tiny models and the two smallest bundled ones (mlp_digits, gru_sunspots), so
the whole file compiles a handful of libraries in well under a minute.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import REPO, make_mlp, run_cli
from onnx import TensorProto, helper

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import CompileError, compile_model  # noqa: E402
from onnxpress.backends.tvm.prepare import (  # noqa: E402
    UnsupportedOpsError,
    check_coverage,
    parse_input_shapes,
    specialise_shapes,
)
from onnxpress.backends.tvm.runtime import load_manifest, run_compiled  # noqa: E402
from onnxpress.backends.tvm.targets import ARM_CROSS_CXX, TargetError, parse_target  # noqa: E402

MODELS = REPO / "models"


def test_mlp_compiles_runs_and_matches_onnxruntime(tmp_path: Path) -> None:
    out = tmp_path / "mlp"
    result = compile_model(make_mlp(), "x86", out, input_shapes={"x": [2, 8]})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "manifest.json", "model.so"]
    manifest = load_manifest(out)
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": [2, 8]}]
    assert manifest["outputs"] == [{"name": "y", "dtype": "float32", "shape": [2, 4]}]
    assert manifest["versions"]["tvm"] == str(tvm.__version__)
    assert manifest["verification"]["errors"]["y"] <= 1e-4
    assert result.report is not None
    names = [p.name for p in result.report.passes]
    prepare = [
        "upgrade-opset",
        "upcast-float16",
        "qop-to-qdq",
        "lower-conv-integer",
        "fold-constants",
    ]
    assert names[:5] == prepare  # reported
    # an opset-17 float model: not upgraded, no quantized operators, no ConvInteger
    assert not any(p.result.changed for p in result.report.passes[:4])
    x = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    got = run_compiled(out, {"x": x})["y"]  # 6 rows: three runs of the compiled batch of 2
    w1, b1, w2 = (onnx.numpy_helper.to_array(t) for t in make_mlp().graph.initializer[:3])
    expected = np.maximum(x @ w1 + b1, 0) @ w2
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    readme = (out / "README.md").read_text()
    assert 'tvm.runtime.load_module("model.so")' in readme


def test_gru_sunspots_compiles_through_lower_gru(tmp_path: Path) -> None:
    result = compile_model(MODELS / "gru_sunspots.onnx", "x86", tmp_path / "gru", gru="unroll")
    passes = {p["name"]: p["counts"] for p in result.manifest["prepare"]["passes"]}
    assert passes["lower-gru"] == {"gru_lowered": 1, "steps_unrolled": 24}
    assert result.manifest["verification"]["errors"]["prediction"] <= 1e-4
    data = np.load(MODELS / "data" / "gru_sunspots_eval.npz")
    got = run_compiled(tmp_path / "gru", {"input": data["input"][:4]})["prediction"]
    assert got.shape == (4, 1)


def test_einsum_compiles_as_matmuls_through_lower_einsum(tmp_path: Path) -> None:
    """An attention readout with three operands (one a constant): lowered to two MatMuls
    before TVM sees it (TOPI's einsum ran one loop nest over all six letters)."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 8, 5)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Einsum", ["s", "v", "w"], ["y"], equation="bhij,bjhd,hde->bie")],
        "readout",
        [
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 6, 4, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = compile_model(model, "x86", tmp_path / "es")
    passes = {p["name"]: p["counts"] for p in result.manifest["prepare"]["passes"]}
    assert passes["lower-einsum"] == {"einsum_lowered": 1, "matmuls": 2}
    assert result.manifest["verification"]["errors"]["y"] <= 1e-4
    feeds = {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in (("s", (1, 4, 6, 6)), ("v", (1, 6, 4, 8)))
    }
    got = run_compiled(tmp_path / "es", feeds)["y"]
    expected = np.einsum(
        "bhij,bjhd,hde->bie", feeds["s"], feeds["v"], onnx.numpy_helper.to_array(w)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_cli_compile_and_run_verify(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    model = MODELS / "mlp_digits.onnx"
    done = run_cli("compile", str(model), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "verified against onnxruntime" in done.stdout
    assert "fold-constants" in done.stdout  # the prepare passes are reported
    inputs = MODELS / "data" / "mlp_digits_eval.npz"
    done = run_cli("run", str(out), "--inputs", str(inputs), "--verify", str(model))
    assert done.returncode == 0, done.stderr
    assert "360x10" in done.stdout and "verified: max-rel" in done.stdout


def test_coverage_check_lists_every_unsupported_op_once() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok"),
        helper.make_node("LSTM", ["a", "W", "R"], ["b"], name="lstm_1", hidden_size=2),
        helper.make_node("Custom", ["b"], ["c"], name="mine", domain="my.ops"),
        helper.make_node("LSTM", ["c", "W", "R"], ["y"], name="lstm_2", hidden_size=2),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpsError) as info:
        check_coverage(model)
    message = str(info.value)
    assert "\n" not in message
    assert "LSTM (2: 'lstm_1', 'lstm_2')" in message and "my.ops.Custom (1: 'mine')" in message
    assert "Relu" not in message


def test_cli_reports_unsupported_ops_in_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.standard_normal((1, 3, 2)).astype(np.float32),
        "R": rng.standard_normal((1, 3, 3)).astype(np.float32),
    }
    rnn = helper.make_node("RNN", ["x", "W", "R"], ["", "y"], name="enc", hidden_size=3)
    graph = helper.make_graph(
        [rnn],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3])],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = tmp_path / "rnn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    done = run_cli("compile", str(path), "-o", str(tmp_path / "out"))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("onnxpress: error: TVM's ONNX importer cannot convert")
    assert "RNN (1: 'enc')" in lines[-1] and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_input_shapes_parse_and_conflicts() -> None:
    assert parse_input_shapes(["x=1,3,8", "2,2"]) == {"x": [1, 3, 8], "": [2, 2]}
    _, shapes, notes = specialise_shapes(make_mlp(), {})
    assert shapes == {"x": [1, 8]} and "set to 1" in notes[0]
    with pytest.raises(Exception, match="conflicts"):
        specialise_shapes(make_mlp(), {"x": [2, 9]})
    with pytest.raises(TargetError, match="unknown target"):
        parse_target("riscv")


def test_cuda_export_carries_kernels(tmp_path: Path) -> None:
    result = compile_model(make_mlp(), "cuda:sm_80", tmp_path / "cuda")
    assert result.manifest["target"]["tvm"]["arch"] == "sm_80"
    assert result.manifest["verification"] is None
    blob = (tmp_path / "cuda" / "model.so").read_bytes()
    assert blob[:4] == b"\x7fELF"
    assert b"__tvm_ffi__library_bin" in blob  # the device module is embedded
    assert blob.count(b'extern "C" __global__') >= 2  # the kernels travel as CUDA source
    with pytest.raises(CompileError, match="cannot run on this machine"):
        run_compiled(tmp_path / "cuda", {"x": np.zeros((1, 8), np.float32)})


def _elf_machine(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


@pytest.mark.skipif(shutil.which(ARM_CROSS_CXX) is None, reason=f"{ARM_CROSS_CXX} not installed")
def test_arm64_cross_compile_is_an_aarch64_elf(tmp_path: Path) -> None:
    result = compile_model(MODELS / "gru_sunspots.onnx", "arm64-linux", tmp_path / "arm")
    assert result.library.suffix == ".so"
    assert _elf_machine(result.library) == 183  # EM_AARCH64
    assert result.manifest["target"]["tvm"]["mtriple"] == "aarch64-linux-gnu"
    readelf = shutil.which("aarch64-linux-gnu-readelf") or shutil.which("readelf")
    if readelf:
        symbols = subprocess.run(
            [readelf, "--dyn-syms", "-W", str(result.library)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "__tvm_ffi__library_bin" in symbols


def test_missing_tvm_is_one_line_with_install_hint(tmp_path: Path) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "tvm.py").write_text("raise ImportError('blocked for the test')\n")
    env = {"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin"}
    done = run_cli("compile", str(MODELS / "mlp_digits.onnx"), "-o", str(tmp_path / "o"), env=env)
    assert done.returncode == 1
    assert done.stderr.strip().endswith("pip install onnxpress[tvm]")


@pytest.mark.parametrize("scale", [0.0, float("inf")])
def test_cli_names_a_qdq_node_with_a_zero_or_infinite_scale(scale: float, tmp_path: Path) -> None:
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant")
    dq = helper.make_node("DequantizeLinear", ["q", "s1", "z"], ["y"], name="dequant")
    graph = helper.make_graph(
        [q, dq],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [], [0.5]),
            helper.make_tensor("s1", TensorProto.FLOAT, [], [scale]),
            helper.make_tensor("z", TensorProto.UINT8, [], [128]),
        ],
    )
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    done = run_cli("compile", str(path), "-o", str(tmp_path / "out"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("onnxpress: error: DequantizeLinear 'dequant': scale 's1' has 1 zero")
    assert not (tmp_path / "out").exists()


def test_min_max_sum_mean_import_as_pairwise_elementwise_ops(tmp_path: Path) -> None:
    """Min/Max/Sum/Mean of tensors become minimum/maximum/add (they fuse with their
    neighbours), not TVM's stack-and-reduce; the library matches onnxruntime, broadcasting
    included."""
    from onnxpress.backends.tvm.build import import_relax
    from onnxpress.backends.tvm.prepare import prepare

    nodes = [
        helper.make_node("Max", ["x", "zero"], ["floor"]),
        helper.make_node("Min", ["floor", "six"], ["clamped"]),
        helper.make_node("Sum", ["clamped", "x", "row"], ["summed"]),
        helper.make_node("Mean", ["summed", "x"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        onnx.numpy_helper.from_array(np.array([6.0], np.float32), "six"),
        onnx.numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "row"),
    ]
    graph = helper.make_graph(
        nodes,
        "pairwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    text = import_relax(prepare(model)).script()
    assert "R.stack" not in text and "R.max(" not in text and "R.min(" not in text
    assert "R.maximum" in text and "R.minimum" in text
    result = compile_model(model, "x86", tmp_path / "pairwise")
    assert result.manifest["verification"]["errors"]["y"] <= 1e-6
