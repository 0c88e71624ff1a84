"""Reduction blocking of the tiled schedule (onnxpress.backends.tvm.reduction_split): which
kernels get their reduction cut into chunks whose weight panel stays in L1, how the row
tiles are cut for the threads when there are few panels, and that a split kernel sums in
the same order as TVM's own (bit-identical); skipped without TVM."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

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


def _matmul(rows: int, depth: int, columns: int, weight: np.ndarray) -> Any:
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, rows, depth), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.matmul(x, relax.const(weight)))
            out = builder.emit_output(builder.emit(relax.op.nn.relu(y)))
        builder.emit_func_output(out)
    return builder.get()


def test_split_matmul_is_bit_identical_to_tvms_own() -> None:
    """The encoder's matmul shape through the CPU pipeline for AVX2: the panel loop is the
    parallel one (16 panels of 24 columns), the reduction runs in 12 chunks of 128, and
    the result equals TVM's unscheduled kernel bit for bit."""
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((1536, 384)).astype(np.float32)
    mod = _matmul(128, 1536, 384, weight)
    with AVX2:
        lowered = cpu_pipeline(AVX2)(mod)
    text = next(f.script() for g, f in lowered.functions.items() if "matmul" in g.name_hint)
    assert "T.parallel(T.int64(16))" in text
    assert "T.int64(12), " in text and "T.int64(128))" in text  # chunk and step loops
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
