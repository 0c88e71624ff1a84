"""Software prefetch of a split reduction's next chunk (onnxpress.backends.tvm.prefetch): the
prefetches a marked steps loop gets (one per cache line its moving vector loads read, a
chunk ahead, shared out among the row tiles, guarded where the share is ragged), the loops
left alone (too many prefetches per tile, loads that do not move or that move with an
inner loop), and the encoder's split matmul through onnxpress's TIR pipeline: prefetches
in its code and results bit-identical to TVM's unscheduled kernel; skipped without TVM."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tvm_kernels import relu_matmul

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from onnxpress.backends.tvm import prefetch  # noqa: E402
from onnxpress.backends.tvm.build import tir_pipeline  # noqa: E402
from onnxpress.backends.tvm.prefetch import KEY, ROWS_KEY, add_prefetches  # noqa: E402
from onnxpress.backends.tvm.schedule import cpu_pipeline  # noqa: E402

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})


def _kernel(rows: int, steps: int) -> Any:
    """``rows`` row tiles x ``steps`` steps of a panel 48 floats wide (three 64-byte lines a
    step, read by four loads: the fourth shares the first line) into a local tile."""

    @T.prim_func
    def kernel(b: T.Buffer((8192,), "float32"), c: T.Buffer((256,), "float32")) -> None:
        for r in range(rows):
            for k in T.serial(steps, annotations={KEY: steps, ROWS_KEY: "r"}):
                c[T.Ramp(r * 16, 1, 16)] = (
                    c[T.Ramp(r * 16, 1, 16)]
                    + b[T.Ramp(k * 48, 1, 16)]
                    + b[T.Ramp(k * 48 + 16, 1, 16)]
                    + b[T.Ramp(k * 48 + 32, 1, 16)]
                    + b[T.Ramp(k * 48 + 8, 1, 16)]
                )

    return kernel


def _prefetched(rows: int, steps: int) -> str:
    kernel = _kernel(rows, steps)
    return kernel.with_body(add_prefetches(kernel.body)).script()


def test_each_row_tile_prefetches_its_share_of_the_next_chunk() -> None:
    text = _prefetched(4, 8)
    assert text.count("llvm.prefetch") == 3  # one per line, not per load
    assert "for prefetch_step in range(2)" in text  # 8 steps shared by 4 row tiles
    assert "if " not in text  # an even share: no guard
    assert "b[(r * 2 + prefetch_step + 8) * 48 + 16]" in text  # a chunk ahead
    assert KEY not in text and ROWS_KEY not in text  # the marks are consumed


def test_a_ragged_share_is_guarded() -> None:
    text = _prefetched(3, 8)  # 3 row tiles: shares of 3, the last one short
    assert text.count("llvm.prefetch") == 3 and "if r * 3 + prefetch_step < 8" in text


def test_too_many_prefetches_per_tile_are_left_out() -> None:
    # 2 row tiles x 32 steps: 16 steps x 3 lines = 48 prefetches a tile > 32
    assert prefetch.MAX_TILE_PREFETCHES < 48
    text = _prefetched(2, 32)
    assert "llvm.prefetch" not in text and KEY not in text


def test_loads_that_do_not_move_with_the_loop_get_none() -> None:
    @T.prim_func
    def still(b: T.Buffer((64,), "float32"), c: T.Buffer((64,), "float32")) -> None:
        for _k in T.serial(8, annotations={KEY: 8}):
            c[T.Ramp(0, 1, 16)] = c[T.Ramp(0, 1, 16)] + b[T.Ramp(16, 1, 16)]

    assert "llvm.prefetch" not in still.with_body(add_prefetches(still.body)).script()


def test_loads_that_read_an_inner_loop_get_none() -> None:
    """The address moves with an inner loop's variable, which the prefetches before the
    steps loop could not name."""

    @T.prim_func
    def inner(b: T.Buffer((8192,), "float32"), c: T.Buffer((64,), "float32")) -> None:
        for k in T.serial(8, annotations={KEY: 8}):
            for j in range(3):
                c[T.Ramp(0, 1, 16)] = c[T.Ramp(0, 1, 16)] + b[T.Ramp(k * 48 + j * 16, 1, 16)]

    assert "llvm.prefetch" not in inner.with_body(add_prefetches(inner.body)).script()


def test_prefetching_code_computes_the_same() -> None:
    kernel = _kernel(4, 8)
    rng = np.random.default_rng(3)
    b = rng.standard_normal(8192).astype(np.float32)
    results = []
    for func in (kernel, kernel.with_body(add_prefetches(kernel.body))):
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
        c = tvm.runtime.tensor(np.zeros(256, np.float32))
        lib["main"](tvm.runtime.tensor(b), c)
        results.append(c.numpy())
    np.testing.assert_array_equal(results[1], results[0])
    assert results[0][:16].any() and not results[0][64:].any()


def test_split_matmul_prefetches_and_stays_bit_identical() -> None:
    """The encoder's 128 x 384 x 1536 matmul for AVX2 through onnxpress's TIR pipeline: its
    steps loop prefetches the next chunk (prefetcht1), and the result equals TVM's
    unscheduled kernel bit for bit."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((384, 1536)).astype(np.float32)
    mod = relu_matmul(128, 384, 1536, weight)
    ours = tvm.compile(mod, target=AVX2, relax_pipeline=cpu_pipeline(AVX2), tir_pipeline=tir_pipeline(0))  # fmt: skip
    asm = "".join(module.inspect_source("asm") for module in ours.mod.imports)
    assert "prefetcht1" in asm
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx2", host):
        pytest.skip("this CPU cannot run AVX2 code")
    plain = tvm.compile(mod, target=AVX2, relax_pipeline=relax.get_default_pipeline(AVX2))
    data = tvm.runtime.tensor(rng.standard_normal((1, 128, 384)).astype(np.float32))
    results = [relax.VirtualMachine(lib, tvm.cpu())["main"](data).numpy() for lib in (plain, ours)]
    np.testing.assert_array_equal(results[1], results[0])
