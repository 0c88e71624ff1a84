"""Kernel scratch on the stack (onnxpress.backends.tvm.tir_passes): an AVX-512 register
tile of more than 1 KB, which TVM's CPU lowering served from the workspace pool once per
tile, stays a stack array after the pass; buffers over the bound and symbolic ones are
left to the pool; the compile pipeline carries the pass; skipped without TVM."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te  # noqa: E402

from onnxpress.backends.tvm.build import tir_pipeline  # noqa: E402
from onnxpress.backends.tvm.tile_schedule import tiled_reduction_rule  # noqa: E402
from onnxpress.backends.tvm.tir_passes import STACK_BYTES, mark, stack_scratch_pass  # noqa: E402

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})


def _tiled_matmul(rows: int, depth: int, columns: int) -> Any:
    """A TE matmul + relu scheduled by TiledReduction for AVX-512 (32 registers)."""
    a = te.placeholder((rows, depth), name="a")
    b = te.placeholder((depth, columns), name="b")
    k = te.reduce_axis((0, depth), name="k")
    c = te.compute((rows, columns), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    d = te.compute((rows, columns), lambda i, j: te.max(c[i, j], 0.0), name="d")
    func = te.create_prim_func([a, b, d])
    sch = tiled_reduction_rule(16, 32).apply(func, AVX512, False)
    assert sch is not None
    return sch.mod["main"].with_attr("global_symbol", "main")


def _lowered(func: Any, with_pass: bool) -> str:
    mod = tvm.IRModule({"main": func})
    mod = tvm.tirx.transform.BindTarget(AVX512.with_host(AVX512))(mod)
    pipeline, finalize_host, _ = tvm.tirx.get_default_tir_pipeline(AVX512)
    mod = pipeline(mod)
    if with_pass:
        mod = stack_scratch_pass()(mod)
    return str(finalize_host()(mod).script())


def test_large_register_tiles_stay_on_the_stack() -> None:
    func = _tiled_matmul(28, 64, 64)  # a 14-row x 2-vector tile: 28 x 64 bytes
    before = [line for line in _lowered(func, False).splitlines() if "_global = " in line]
    after = [line for line in _lowered(func, True).splitlines() if "_global = " in line]
    assert before and "TVMBackendAllocWorkspace" in before[0]  # TVM alone: the pool
    assert after and "T.alloc_buffer(" in after[0] and "disable_lower_builtin" in after[0]


def test_buffers_over_the_bound_or_of_symbolic_size_keep_the_pool() -> None:
    from tvm.tirx import stmt as S

    small = tvm.tirx.decl_buffer((16, 16), "float32", name="small")
    large = tvm.tirx.decl_buffer((STACK_BYTES // 4 + 1,), "float32", name="large")
    n = tvm.tirx.Var("n", "int64")
    symbolic = tvm.tirx.decl_buffer((n,), "float32", name="symbolic")
    body = S.SeqStmt([S.AllocBuffer(buf) for buf in (small, large, symbolic)])
    marked = mark(body)
    keys = [dict(stmt.annotations) for stmt in marked.seq]
    assert "disable_lower_builtin" in keys[0]
    assert keys[1] == {} and keys[2] == {}


def test_compiled_kernel_with_the_pipeline_matches_numpy() -> None:
    """The registered TIR pipeline (dynamic split for 2 threads + this pass) builds a
    scheduled kernel whose tile is a stack array, and it computes the right numbers."""
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx512f", host):
        target = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
        if not tvm.target.codegen.target_has_features("avx2", host):
            pytest.skip("this CPU runs neither AVX-512 nor AVX2 code")
    else:
        target = AVX512
    func = _tiled_matmul(28, 64, 64)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target, tir_pipeline=tir_pipeline(2))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((28, 64)).astype(np.float32)
    b = rng.standard_normal((64, 64)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((28, 64), np.float32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), out)
    np.testing.assert_allclose(out.numpy(), np.maximum(a @ b, 0), rtol=1e-5, atol=1e-4)
