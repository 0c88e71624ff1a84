# mypy: disable-error-code="valid-type"
"""Integer kernels for the QDQ-to-integer lowering (onnxpress.tvm_int8).

  packed_gemm(rows, depth, cols):  C[m, n] = sum_k A[m, k] * B[n // 16, k // 4, n % 16, k % 4]
      A uint8 [rows, depth], B int8 packed 16x4 blocks, C int32 [rows, cols];
      rows % 4 == 0, depth % 4 == 0, cols % 16 == 0 (callers pad).
  pack_weight(w[k, n]) -> the [n/16, k/4, 16, 4] int8 blocks, zero-padded.
  im2col(x[n, c, h, w] uint8, pad value = the zero point) -> A[n*oh*ow (padded), c*kh*kw (padded)].

On x86 CPUs with AVX512-VNNI the 16x4 inner block is one ``vpdpbusd`` (u8 x s8 -> s32,
four products summed per lane, no saturation). The intrinsic is registered here with the
operand types of current LLVM (<64 x i8> sources); TVM's own registration still uses the
older <16 x i32> signature, which LLVM 22 rejects. The schedule keeps a 4-row x up-to-4-block
tile of accumulators in registers around the depth loop and parallelizes the outer tiles.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

LANES = 16  # int32 lanes of a 512-bit register
GROUP = 4  # u8 x s8 products summed per lane by one vpdpbusd
ROW_TILE = 4  # rows sharing one depth loop (independent accumulators)
INTRIN = "onnxpress_vnni_16x4"
MIN_PARALLEL_MACS = 1 << 22  # below this a kernel runs faster than a thread pool wakes


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def has_vnni(target: Any) -> bool:
    """Whether an llvm target can run the vpdpbusd kernel (x86 with AVX512-VNNI)."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm":
        return False
    with target:
        return bool(codegen.target_has_features(["avx512vnni", "avx512bw"]))


def pack_weight(weight: np.ndarray) -> np.ndarray:
    """w[k, n] int8 -> [ceil(n/16), ceil(k/4), 16, 4] int8 with zero padding."""
    depth, cols = weight.shape
    padded = np.zeros((round_up(depth, GROUP), round_up(cols, LANES)), dtype=np.int8)
    padded[:depth, :cols] = weight
    k_blocks, n_blocks = padded.shape[0] // GROUP, padded.shape[1] // LANES
    blocks = padded.reshape(k_blocks, GROUP, n_blocks, LANES).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(blocks)


@lru_cache(maxsize=1)
def _register_intrinsic() -> str:
    from tvm import s_tir
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((4,), "uint8", offset_factor=1),
        b: T.Buffer((16, 4), "int8", offset_factor=1),
        c: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((4,), "uint8", offset_factor=1),
        b: T.Buffer((16, 4), "int8", offset_factor=1),
        c: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(quad, 16), dtype="uint8x64"),
                b.vload([0, 0], dtype="int8x64"),
                dtype="int32x16",
            )

    try:
        s_tir.TensorIntrin.get(INTRIN)
    except Exception:
        s_tir.TensorIntrin.register(INTRIN, desc, impl)
    return INTRIN


def packed_gemm(rows: int, depth: int, cols: int) -> Any:
    """The scheduled (VNNI-tensorized) PrimFunc for C = A . B on padded sizes."""
    from tvm import s_tir, te

    if rows % ROW_TILE or depth % GROUP or cols % LANES:
        raise ValueError(f"packed_gemm needs padded sizes, got {rows}x{depth}x{cols}")
    intrin = _register_intrinsic()
    a = te.placeholder((rows, depth), "uint8", name="A")
    b = te.placeholder((cols // LANES, depth // GROUP, LANES, GROUP), "int8", name="B")
    k = te.reduce_axis((0, depth), name="k")
    c = te.compute(
        (rows, cols),
        lambda m, n: te.sum(
            a[m, k].astype("int32")
            * b[n // LANES, k // GROUP, n % LANES, k % GROUP].astype("int32"),
            axis=k,
        ),
        name="C",
    )
    sch = s_tir.Schedule(te.create_prim_func([a, b, c]))
    block = sch.get_sblock("C")
    m, n, kk = sch.get_loops(block)
    n_blocks = cols // LANES
    block_tile = next(t for t in (4, 2, 1) if n_blocks % t == 0)
    m_outer, m_inner = sch.split(m, [None, ROW_TILE])
    n_outer, n_lanes = sch.split(n, [None, LANES])
    n_tile, n_inner = sch.split(n_outer, [None, block_tile])
    k_outer, k_inner = sch.split(kk, [None, GROUP])
    sch.reorder(m_outer, n_tile, k_outer, m_inner, n_inner, n_lanes, k_inner)
    outer = sch.fuse(m_outer, n_tile)
    if rows * depth * cols >= MIN_PARALLEL_MACS and rows // ROW_TILE * (n_blocks // block_tile) > 1:
        sch.parallel(outer)
    init = sch.decompose_reduction(block, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(n_lanes, intrin)
    sch.unroll(m_inner)
    sch.unroll(n_inner)
    func = sch.mod["main"].with_attr("tir.is_scheduled", True)
    return func.without_attr("global_symbol")


def im2col(
    padded_shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    rows: int,
    channels: int,
) -> Any:
    """PrimFunc: x[n, c, h, w] (uint8, already padded with the zero point) ->
    patches[rows, channels, kh, kw] with row = (n, oh, ow). ``rows`` and ``channels`` may
    exceed the real counts (padding to the GEMM's multiples): those entries repeat a real
    value, which the zero rows of the padded weight (or the discarded output rows) cancel.
    Marked opaque so that Relax does not fuse it into the producer's epilogue (which would
    recompute every requantization once per kernel tap)."""
    from tvm import te, tirx

    batch, in_channels, _, _ = padded_shape
    kh, kw = kernel
    out_h, out_w = out_hw
    data = te.placeholder(padded_shape, "uint8", name="x")
    used_rows = batch * out_h * out_w

    def patch(row: Any, c: Any, i: Any, j: Any) -> Any:
        real = tirx.min(row, used_rows - 1)
        n, oh, ow = real // (out_h * out_w), (real // out_w) % out_h, real % out_w
        return data[
            n,
            tirx.min(c, in_channels - 1),
            oh * strides[0] + i * dilation[0],
            ow * strides[1] + j * dilation[1],
        ]

    patches = te.compute((rows, channels, kh, kw), patch, name="patches")
    func = te.create_prim_func([data, patches])
    func = func.with_attr("op_pattern", 8).with_attr("tir.is_scheduled", True)
    return func.without_attr("global_symbol")
