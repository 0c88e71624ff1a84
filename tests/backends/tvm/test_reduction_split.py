"""Reduction blocking of the tiled schedule (onnxpress.backends.tvm.reduction_split): which
kernels get their reduction cut into chunks whose weight panel stays in L1, how the row
tiles are cut for the threads when there are few panels, and that a split kernel sums in
the same order as TVM's own (bit-identical); skipped without TVM."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tvm_kernels import relu_matmul

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from onnxpress.backends.tvm.reduction_split import Split, plan_split  # noqa: E402
from onnxpress.backends.tvm.schedule import cpu_pipeline  # noqa: E402
from onnxpress.backends.tvm.tile_plan import TilePlan  # noqa: E402

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})

# the encoder's 128 x 1536 x 384 matmul on AVX2: 4 rows x 3 vectors of 8, a 147 KB panel
ENCODER = TilePlan((1, 128, 384, 1536), 3, 2, 8, True, ((1, 4),), 3)
# mobilenet_v2's 576 -> 96 channel 1x1 conv at 14x14, blocked: 2 pixels x 4 channel blocks
PROJECT = TilePlan((1, 12, 14, 14, 8, 72, 8, 1, 1), 5, 4, 8, True, ((3, 2),), 4, 1)


def test_large_panels_are_split_into_chunks_that_fit_l1() -> None:
    # 128 steps x 24 columns x 4 bytes = 12 KB per chunk; 16 panels for the threads
    assert plan_split(ENCODER) == Split(128)
    # 3 panels only: the 14 pixel rows cut in 7 parts (21 tasks); 12 blocks of 8 input
    # channels x 32 columns = 12 KB per chunk
    assert plan_split(PROJECT) == Split(12, 2, 7)


@pytest.mark.parametrize(
    "plan",
    [
        TilePlan((1, 128, 384, 256), 3, 2, 8, True, ((1, 4),), 3),  # 24 KB panel: fits L1
        TilePlan((1, 4, 384, 1536), 3, 2, 8, True, ((1, 4),), 3),  # one row tile
        TilePlan((1, 128, 48, 1536), 3, 2, 8, True, ((1, 4),), 3),  # 2 panels, rows cut in 4
        TilePlan((1, 128, 384, 1536), 3, 2, 8, True, (), 3),  # no rows to share a panel
        TilePlan((1, 128, 384, 1536), 3, 2, 8, False, ((1, 4),), 3),  # scattered lanes
        TilePlan((1, 128, 384, 1531), 3, 2, 8, True, ((1, 4),), 3),  # a prime depth
    ],
)
def test_kernels_that_would_not_gain_keep_the_reduction_whole(plan: TilePlan) -> None:
    split = plan_split(plan)
    if plan.extents[2] == 48:  # too few panels: the row tiles are cut for the threads
        assert split == Split(128, 1, 4)
    else:
        assert split is None


def test_split_matmul_is_bit_identical_to_tvms_own() -> None:
    """The encoder's matmul shape through the CPU pipeline for AVX2: the panel loop is the
    parallel one (16 panels of 24 columns), the reduction runs in 12 chunks of 128, and
    the result equals TVM's unscheduled kernel bit for bit."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((1536, 384)).astype(np.float32)
    mod = relu_matmul(128, 1536, 384, weight)
    with AVX2:
        lowered = cpu_pipeline(AVX2)(mod)
    text = next(f.script() for g, f in lowered.functions.items() if "matmul" in g.name_hint)
    assert "T.parallel(T.int64(16))" in text
    assert "T.int64(12), " in text  # the chunk loop, then its steps (marked for prefetch.py)
    assert "for rk_1 in T.serial(T.int64(128), annotations=" in text
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx2", host):
        pytest.skip("this CPU cannot run AVX2 code")
    data = rng.standard_normal((1, 128, 1536)).astype(np.float32)
    results = []
    for pipeline in (relax.get_default_pipeline(AVX2), cpu_pipeline(AVX2)):
        executable = tvm.compile(mod, target=AVX2, relax_pipeline=pipeline)
        vm = relax.VirtualMachine(executable, tvm.cpu())
        results.append(vm["main"](tvm.runtime.tensor(data)).numpy())
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_allclose(results[1], np.maximum(data @ weight, 0), rtol=1e-4, atol=1e-3)


def _pointwise_kernel(channels_in: int, channels_out: int, size: int, block: int) -> Any:
    from tvm import te

    from onnxpress.backends.tvm.blocked_kernels import ConvGeometry, conv2d_nchwc

    data = te.placeholder((1, channels_in // block, size, size, block), name="x")
    weight = te.placeholder((channels_out // block, channels_in, 1, 1, block), name="w")
    out = conv2d_nchwc(data, weight, ConvGeometry((1, 1), (0, 0, 0, 0), (1, 1)), block)
    return te.create_prim_func([data, weight, out])


def test_a_split_kernel_unrolls_its_ragged_row_tiles_inside_each_chunk() -> None:
    """inception_v3's 768 -> 192 channel 1x1 conv at 17 x 17 on AVX2: 2 channel blocks x 6
    columns (17 = 6 + 6 + 5), a panel too large for L1, so the reduction is split; the
    ragged column tiles run innermost of the row tiles, unrolled, so each copy of the
    reduction has its column bounds folded. The kernel computes every output."""
    from tvm import s_tir

    from onnxpress.backends.tvm.tile_schedule import plan_tile, schedule_tile

    sch = s_tir.Schedule(_pointwise_kernel(768, 192, 17, 8))
    block = sch.get_sblock("conv2d_nchwc")
    plan = plan_tile(sch, block, 8, 16)
    assert plan is not None and plan.stack == 2 and plan.stack_axis == 1
    assert plan.rows == ((3, 6),) and plan_split(plan) is not None
    schedule_tile(sch, block, plan)
    loops = [line.strip() for line in sch.mod["main"].script().splitlines() if " in T." in line]
    update = loops.index(next(line for line in loops if line.startswith("for rb_0,")))
    assert loops[update + 1].startswith("for x_0 in T.unroll(3)")
    lib = tvm.compile(sch.mod, target=AVX2)
    host = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if not tvm.target.codegen.target_has_features("avx2", host):
        pytest.skip("this CPU cannot run AVX2 code")
    rng = np.random.default_rng(8)
    x = rng.standard_normal((1, 96, 17, 17, 8)).astype(np.float32)
    w = rng.standard_normal((24, 768, 1, 1, 8)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 24, 17, 17, 8), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    nchw = x.transpose(0, 1, 4, 2, 3).reshape(768, 17, 17)
    weight = w[:, :, 0, 0, :].transpose(0, 2, 1).reshape(192, 768)
    expected = np.einsum("oc,chw->ohw", weight, nchw)
    got = out.numpy()[0].transpose(0, 3, 1, 2).reshape(192, 17, 17)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_stacked_tiles_take_a_ragged_tail_only_where_it_pays() -> None:
    from onnxpress.backends.tvm.tile_plan import _stackable_tail

    assert _stackable_tail(18, 6, windowed=True)  # even tiles: always
    assert _stackable_tail(17, 6, windowed=False)  # 6 + 6 + 5, unrolled
    assert not _stackable_tail(17, 6, windowed=True)  # a 1x7 window along the columns
    assert not _stackable_tail(7, 6, windowed=False)  # a tail of one row: few FMA chains
    assert not _stackable_tail(35, 6, windowed=False)  # 6 tiles: too many to unroll
