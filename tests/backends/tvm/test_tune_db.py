"""tune_db.py: a tuned record whose schedule does not build with onnxpress's TIR pipeline
(the dynamic split of parallel loops) is skipped for the next best one, and a kernel with
no record that builds keeps its untuned schedule."""

from __future__ import annotations

from typing import Any

import pytest

tvm = pytest.importorskip("tvm")

from tvm import te  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402

from onnxpress.backends.tvm.build import tir_pipeline  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402
from onnxpress.backends.tvm.tune_db import best_records, record_builds  # noqa: E402


def _workload() -> Any:
    """The encoder's output projection: x [1, 128, 384] by packed weights, + bias +
    residual (the kernel MetaSchedule found the failing schedule for)."""
    x = te.placeholder((1, 128, 384), name="x")
    w = te.placeholder((16, 384, 24), name="w")
    b = te.placeholder((384,), name="b")
    r = te.placeholder((1, 128, 384), name="r")
    rk = te.reduce_axis((0, 384), name="rk")
    mm = te.compute(
        (1, 128, 384),
        lambda i, j, k: te.sum(x[i, j, rk] * w[k // 24, rk, k % 24], axis=rk),
        name="matmul",
    )
    add = te.compute((1, 128, 384), lambda i, j, k: mm[i, j, k] + b[k], name="T_add")
    out = te.compute((1, 128, 384), lambda i, j, k: add[i, j, k] + r[i, j, k], name="out")
    return tvm.IRModule({"main": te.create_prim_func([x, w, b, r, out])})


def _failing_trace(mod: Any) -> Any:
    """A schedule MetaSchedule measured (with TVM's pipeline) for that kernel, replayed:
    TVM's simplifier overflows an int32 literal on it after the dynamic split."""
    sch = tvm.s_tir.Schedule(mod)
    mm = sch.get_sblock("matmul")
    sch.compute_inline(sch.get_sblock("T_add"))
    i, j, k, rk = sch.get_loops(mm)
    a, b, c = sch.split(i, [1, 1, 1, 1]), sch.split(j, [1, 64, 2, 1]), sch.split(k, [3, 16, 1, 8])
    d = sch.split(rk, [6, 64])
    sch.reorder(a[0], b[0], c[0], a[1], b[1], c[1], d[0], a[2], b[2], c[2], d[1], a[3], b[3], c[3])
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, c[1])
    fused = sch.fuse(a[0], b[0], c[0], a[1], b[1])
    sch.parallel(fused)
    sch.annotate(fused, "pragma_auto_unroll_max_step", 64)
    sch.annotate(fused, "pragma_unroll_explicit", 1)
    sch.vectorize(c[3])
    sch.vectorize(sch.get_loops(out)[-1])
    sch.decompose_reduction(mm, d[0])
    return sch.trace


def _record(trace: Any, workload: Any, seconds: float, mod: Any) -> Any:
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    return ms.database.TuningRecord(trace, workload, [seconds], None, args)


def test_a_record_that_does_not_build_is_skipped() -> None:
    spec = parse_target("x86")
    mod = _workload()
    failing = _failing_trace(mod)
    with pytest.raises(Exception, match="exceeds range of int32"):
        sch = tvm.s_tir.Schedule(mod)
        failing.apply_to_schedule(sch, remove_postproc=False)
        kernel = sch.mod["main"].with_attr("global_symbol", "main")
        tvm.compile(
            tvm.IRModule({"main": kernel}), target=tvm_target(spec), tir_pipeline=tir_pipeline(2)
        )
    simple = tvm.s_tir.Schedule(mod)
    simple.compute_inline(simple.get_sblock("T_add"))  # next to nothing: builds
    plain = simple.trace
    database = ms.database.MemoryDatabase()
    workload = database.commit_workload(mod)
    database.commit_tuning_record(_record(failing, workload, 1e-4, mod))  # the "best"
    database.commit_tuning_record(_record(plain, workload, 2e-4, mod))
    first, second = database.get_top_k(workload, 2)
    assert not record_builds(mod, first, spec) and record_builds(mod, second, spec)
    chosen, counts = best_records(database, {"kernel": mod}, spec=spec)
    assert counts == {"kernel": 2}
    (kept,) = chosen.get_top_k(chosen.commit_workload(mod), 5)
    assert float(kept.run_secs[0]) == pytest.approx(2e-4)
    unchecked, _ = best_records(database, {"kernel": mod})  # without a target: the best
    (best,) = unchecked.get_top_k(unchecked.commit_workload(mod), 5)
    assert float(best.run_secs[0]) == pytest.approx(1e-4)
    only_failing = ms.database.MemoryDatabase()
    only_failing.commit_tuning_record(
        _record(failing, only_failing.commit_workload(mod), 1e-4, mod)
    )
    none, _ = best_records(only_failing, {"kernel": mod}, spec=spec)
    assert not none.get_top_k(none.commit_workload(mod), 5)


def test_a_kernel_the_dynamic_split_breaks_builds_with_the_static_split(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """build() with that record applied: the dynamic split fails in TVM, the library is
    built with TVM's static split instead, and computes the same product."""
    import numpy as np
    from tvm import relax

    from onnxpress.backends.tvm.build import build, fuse

    spec = parse_target("x86")
    kernel = _workload()["main"].without_attr("global_symbol")
    builder = relax.BlockBuilder()
    names = ("x", "w", "b", "r")
    shapes = ((1, 128, 384), (16, 384, 24), (384,), (1, 128, 384))
    params = [
        relax.Var(n, relax.TensorType(s, "float32")) for n, s in zip(names, shapes, strict=True)
    ]
    with builder.function("main", params):
        with builder.dataflow():
            gvar = builder.add_func(kernel, "projection")
            out = relax.call_tir(gvar, params, relax.TensorType((1, 128, 384), "float32"))
            result = builder.emit_output(builder.emit(out))
        builder.emit_func_output(result)
    mod = builder.get()
    database = ms.database.MemoryDatabase()
    fused = fuse(mod, tvm_target(spec), False)  # the kernel as build() looks it up
    task = tvm.IRModule({"main": fused["projection"].with_attr("global_symbol", "main")})
    workload = database.commit_workload(task)
    database.commit_tuning_record(_record(_failing_trace(task), workload, 1e-4, task))
    executable = build(mod, spec, default_schedules=False, database=database)
    assert "the dynamic loop split failed" in caplog.text  # the record was applied
    vm = relax.VirtualMachine(executable, tvm.cpu())
    rng = np.random.default_rng(0)
    x, w, b, r = (rng.normal(size=s).astype(np.float32) for s in shapes)
    got = vm["main"](*(tvm.runtime.tensor(a) for a in (x, w, b, r))).numpy()
    dense = w.transpose(1, 0, 2).reshape(384, 384)  # packed[k // 24, d, k % 24] = W[d, k]
    np.testing.assert_allclose(got, x @ dense + b + r, rtol=1e-4, atol=1e-4)
