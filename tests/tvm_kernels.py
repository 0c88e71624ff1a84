"""A TVM kernel for the parallel-launch tests (test_dynamic_parallel, test_thread_pool):
``out[i, j] += 1`` over a parallel loop, whose result shows whether every iteration ran
exactly once. TVM is imported inside, so importing this module does not need it."""

from __future__ import annotations

from typing import Any


def accumulate(extent: int, inner: int) -> Any:
    """``out[i, j] += 1`` for i in parallel(extent): each run adds exactly one per element
    only if every iteration runs once."""
    from tvm import te
    from tvm.s_tir import Schedule

    out = te.placeholder((extent, inner), "int32", name="out")
    bumped = te.compute((extent, inner), lambda i, j: out[i, j] + 1, name="bumped")
    func = te.create_prim_func([out, bumped])
    sch = Schedule(func.with_attr("global_symbol", "main"))
    i, _ = sch.get_loops(sch.get_sblock("bumped"))
    sch.parallel(i)
    return sch.mod
