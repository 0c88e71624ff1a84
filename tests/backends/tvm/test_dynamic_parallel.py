"""Dynamic split of parallel loops (onnxpress.backends.tvm.dynamic_parallel): chunk sizes,
the atomic claim in the compiled code, every iteration run exactly once (an accumulating
kernel called many times, more tasks than threads included), compiled models bit-identical
to TVM's static split, which targets get it, and the CLI's ``--parallel`` and ``--gru``;
skipped without TVM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO, run_cli
from tvm_kernels import accumulate

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import CompileError, compile_model  # noqa: E402
from onnxpress.backends.tvm.dynamic_parallel import (  # noqa: E402
    CLAIM,
    chunk_size,
    register,
    rewrite,
)
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import (  # noqa: E402
    parse_target,
    runtime_threads,
    split_threads,
    tvm_target,
)

HOST = parse_target("x86")
MODELS = REPO / "models"


def test_chunks_are_a_quarter_of_a_thread_s_share() -> None:
    assert chunk_size(9, 2) == 2  # shares of 5: chunks of 2
    assert chunk_size(100, 2) == 13 and chunk_size(1, 2) == 1 and chunk_size(3, 4) == 1


def _compile(mod: Any, pipeline: str) -> Any:
    return tvm.compile(mod, target=tvm_target(HOST), tir_pipeline=pipeline)


@pytest.mark.parametrize("tasks", [2, 3])
def test_every_iteration_runs_exactly_once(tasks: int) -> None:
    lib = _compile(accumulate(37, 5), register(tasks))  # 37 rows: odd shares, ragged chunks
    asm = lib.mod.inspect_source("asm")
    assert "lock" in asm and "xadd" in asm  # the claim: an atomic add, inlined
    assert f"call{CLAIM}" not in asm.replace(" ", "").replace("\t", "")
    values = tvm.runtime.tensor(np.zeros((37, 5), np.int32))
    for _ in range(200):
        lib["main"](values, values)  # in place: out = out + 1
    np.testing.assert_array_equal(values.numpy(), np.full((37, 5), 200, np.int32))


def test_loops_it_cannot_share_stay_static() -> None:
    from tvm import tirx
    from tvm.tirx import stmt as S

    body = S.Evaluate(tirx.IntImm("int32", 0))
    for var, extent in (
        (tirx.Var("i", "int64"), tirx.IntImm("int64", 64)),  # not narrowed
        (tirx.Var("j", "int32"), tirx.IntImm("int32", 1)),
    ):  # one iteration
        loop = S.For(var, tirx.IntImm(str(var.expr_ty()), 0), extent, S.ForKind.PARALLEL, body)
        assert rewrite(loop, 2).same_as(loop)
    shared = S.For(tirx.Var("k", "int32"), tirx.IntImm("int32", 0), tirx.IntImm("int32", 64), S.ForKind.PARALLEL, body)  # fmt: skip
    assert "pragma_import_llvm" in str(rewrite(shared, 2))


def test_static_pipeline_has_no_claims() -> None:
    asm = _compile(accumulate(37, 5), "default").mod.inspect_source("asm")
    assert "xadd" not in asm


def test_only_this_host_s_library_gets_the_dynamic_split() -> None:
    threads = runtime_threads()
    assert split_threads(HOST, "dynamic") == (threads if threads > 1 else 0)
    assert split_threads(HOST, "static") == 0
    for other in ("avx2", "x86-64", "arm64", "cuda"):  # thread counts unknown here
        assert split_threads(parse_target(other), "dynamic") == 0


def test_runtime_threads_follow_tvm_s_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime_threads() == 3
    monkeypatch.setenv("TVM_NUM_THREADS", "5")  # TVM reads it first
    assert runtime_threads() == 5 and split_threads(HOST, "dynamic") == 5
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert split_threads(HOST, "dynamic") == 0  # one thread: nothing to share


def test_compiled_model_is_bit_identical_to_the_static_split(tmp_path: Path) -> None:
    model = MODELS / "cnn_mnist.onnx"
    results = {}
    for split in ("dynamic", "static"):
        result: Any = compile_model(model, HOST, tmp_path / split, parallel=split)
        expected = "dynamic" if split_threads(HOST, "dynamic") else "static"
        assert result.manifest["parallel"]["split"] == (expected if split == "dynamic" else split)
        assert result.manifest["verification"]["errors"]["logits"] <= 1e-5
        results[split] = CompiledModel(result.library)
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    for _ in range(20):
        dynamic, static = results["dynamic"](x)[0], results["static"](x)[0]
        np.testing.assert_array_equal(dynamic, static)
    with pytest.raises(CompileError, match="parallel must be"):
        compile_model(model, HOST, tmp_path / "bad", parallel="guided")


def test_cli_passes_parallel_and_gru(tmp_path: Path) -> None:
    out = tmp_path / "gru"
    model = MODELS / "gru_sunspots.onnx"
    done = run_cli(
        "compile", str(model), "-o", str(out), "--parallel", "static", "--gru", "unroll", "--json"
    )
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["parallel"] == {"split": "static", "threads": None, "launch": "onnxpress"}
    assert "lower-gru" in manifest["prepare"]["pipeline"]  # unrolled, not the loop kernel
    done = run_cli("compile", str(model), "-o", str(tmp_path / "x"), "--parallel", "guided")
    assert done.returncode != 0 and "invalid choice: 'guided'" in done.stderr
