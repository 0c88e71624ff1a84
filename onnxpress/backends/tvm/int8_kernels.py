# mypy: disable-error-code="valid-type"
"""Integer kernels for the QDQ-to-integer lowering (onnxpress.backends.tvm.int8).

  packed_gemm(isa, rows, depth, cols):
      C[m, n] = sum_k A[m, k] * B[n // L, k // 4, n % L, k % 4]    (L = isa.lanes)
      A [rows, depth] (uint8 for VNNI, int8 for SDOT), B int8 packed Lx4 blocks,
      C int32 [rows, cols]; rows % 4 == 0, depth % 4 == 0, cols % L == 0 (callers pad).
  pack_weight(isa, w[k, n]) -> the [n/L, k/4, L, 4] int8 blocks, zero-padded.
  im2col(x[n, c, h, w] padded with the zero point) -> A[rows, c, kh, kw].

The L x 4 inner block is one dot-product instruction (four 8-bit products summed into each
int32 lane, no saturation):
  VNNI  x86 AVX512-VNNI  vpdpbusd  u8 x s8, 16 lanes
  SDOT  aarch64 +dotprod sdot      s8 x s8, 4 lanes
The intrinsics are registered here with the operand types of current LLVM (byte vectors);
TVM's own VNNI registration still uses the older <16 x i32> signature, which LLVM 22
rejects. The schedule keeps 16 accumulators (rows x up to 4 column blocks) in registers
around the depth loop and parallelizes the outer tiles of large GEMMs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

GROUP = 4  # 8-bit products summed per int32 lane by one instruction
ACCUMULATORS = 16  # independent accumulator registers per depth loop (latency x throughput)
MIN_PARALLEL_MACS = 1 << 22  # below this a kernel runs faster than a thread pool wakes


@dataclass(frozen=True)
class DotIsa:
    """A dot-product instruction: lanes of int32, the A operand's type, the LLVM intrinsic."""

    name: str
    lanes: int
    a_dtype: str  # "uint8" or "int8"
    intrinsic: str
    features: tuple[str, ...]


VNNI = DotIsa("vnni", 16, "uint8", "llvm.x86.avx512.vpdpbusd.512", ("avx512vnni", "avx512bw"))
SDOT = DotIsa("sdot", 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8", ("dotprod",))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tiles(isa: DotIsa, cols: int) -> tuple[int, int]:
    """(rows, column blocks) of the register tile for a GEMM with ``cols`` (padded) columns:
    up to 4 blocks of ``lanes`` columns, and as many rows as keep ACCUMULATORS in flight."""
    blocks = round_up(cols, isa.lanes) // isa.lanes
    block_tile = next(t for t in (4, 2, 1) if blocks % t == 0)
    return ACCUMULATORS // block_tile, block_tile


def dot_isa(target: Any) -> DotIsa | None:
    """The dot-product instruction an llvm target has (VNNI, SDOT), or None."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm":
        return None
    with target:
        for isa in (VNNI, SDOT):
            if codegen.target_has_features(list(isa.features)):
                return isa
    return None


def has_vnni(target: Any) -> bool:
    """Whether an llvm target can run the vpdpbusd kernel (x86 with AVX512-VNNI)."""
    return dot_isa(target) == VNNI


def pack_weight(isa: DotIsa, weight: np.ndarray) -> np.ndarray:
    """w[k, n] int8 -> [ceil(n/L), ceil(k/4), L, 4] int8 with zero padding."""
    depth, cols = weight.shape
    lanes = isa.lanes
    padded = np.zeros((round_up(depth, GROUP), round_up(cols, lanes)), dtype=np.int8)
    padded[:depth, :cols] = weight
    k_blocks, n_blocks = padded.shape[0] // GROUP, padded.shape[1] // lanes
    blocks = padded.reshape(k_blocks, GROUP, n_blocks, lanes).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(blocks)


@cache
def _register_intrinsic(isa: DotIsa) -> str:
    from tvm import s_tir
    from tvm.script import tirx as T

    lanes, a_dtype, intrinsic = isa.lanes, isa.a_dtype, isa.intrinsic
    acc_type, byte_type = f"int32x{lanes}", f"{a_dtype}x{lanes * 4}"
    weight_type, quad_type = f"int8x{lanes * 4}", f"{a_dtype}x4"

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((4,), a_dtype, offset_factor=1),
        b: T.Buffer((lanes, 4), "int8", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((4,), a_dtype, offset_factor=1),
        b: T.Buffer((lanes, 4), "int8", offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:4], b[0:lanes, 0:4])
            T.writes(c[0:lanes])
            quad = T.reinterpret(a.vload([0], quad_type), dtype="int32")
            c[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrinsic),
                c.vload([0], dtype=acc_type),
                T.reinterpret(T.broadcast(quad, lanes), dtype=byte_type),
                b.vload([0, 0], dtype=weight_type),
                dtype=acc_type,
            )

    name = f"onnxpress_{isa.name}_{lanes}x4"
    try:
        s_tir.TensorIntrin.get(name)
    except Exception:
        s_tir.TensorIntrin.register(name, desc, impl)
    return name


def packed_gemm(isa: DotIsa, rows: int, depth: int, cols: int) -> Any:
    """The scheduled (dot-product-tensorized) PrimFunc for C = A . B on padded sizes."""
    from tvm import s_tir, te

    lanes = isa.lanes
    row_tile, block_tile = tiles(isa, cols)
    if rows % row_tile or depth % GROUP or cols % lanes:
        raise ValueError(f"packed_gemm needs padded sizes, got {rows}x{depth}x{cols}")
    intrin = _register_intrinsic(isa)
    a = te.placeholder((rows, depth), isa.a_dtype, name="A")
    b = te.placeholder((cols // lanes, depth // GROUP, lanes, GROUP), "int8", name="B")
    k = te.reduce_axis((0, depth), name="k")
    c = te.compute(
        (rows, cols),
        lambda m, n: te.sum(
            a[m, k].astype("int32")
            * b[n // lanes, k // GROUP, n % lanes, k % GROUP].astype("int32"),
            axis=k,
        ),
        name="C",
    )
    sch = s_tir.Schedule(te.create_prim_func([a, b, c]))
    block = sch.get_sblock("C")
    m, n, kk = sch.get_loops(block)
    n_blocks = cols // lanes
    m_outer, m_inner = sch.split(m, [None, row_tile])
    n_outer, n_lanes = sch.split(n, [None, lanes])
    n_tile, n_inner = sch.split(n_outer, [None, block_tile])
    k_outer, k_inner = sch.split(kk, [None, GROUP])
    sch.reorder(m_outer, n_tile, k_outer, m_inner, n_inner, n_lanes, k_inner)
    outer = sch.fuse(m_outer, n_tile)
    if rows * depth * cols >= MIN_PARALLEL_MACS and rows // row_tile * (n_blocks // block_tile) > 1:
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
    dtype: str = "uint8",
) -> Any:
    """PrimFunc: x[n, h, w, c] (NHWC, ``dtype``, already padded with the zero point, spatially
    and up to the GEMM's channel multiple) -> patches[rows, kh, kw, c] with row = (n, oh, ow):
    the innermost copy runs over contiguous channels. Rows past the real count (padding to
    the register tile) repeat the last real row; their outputs are discarded.
    Marked opaque so that Relax does not fuse it into the producer's epilogue (which would
    recompute every requantization once per kernel tap)."""
    from tvm import s_tir, te, tirx

    batch, _, _, channels = padded_shape
    kh, kw = kernel
    out_h, out_w = out_hw
    data = te.placeholder(padded_shape, dtype, name="x")
    used_rows = batch * out_h * out_w

    def patch(row: Any, i: Any, j: Any, c: Any) -> Any:
        real = tirx.min(row, used_rows - 1)
        n, oh, ow = real // (out_h * out_w), (real // out_w) % out_h, real % out_w
        return data[n, oh * strides[0] + i * dilation[0], ow * strides[1] + j * dilation[1], c]

    patches = te.compute((rows, kh, kw, channels), patch, name="patches")
    sch = s_tir.Schedule(te.create_prim_func([data, patches]))
    row_loop, _, _, channel_loop = sch.get_loops(sch.get_sblock("patches"))
    if channels % 16 == 0:
        _, lanes = sch.split(channel_loop, [None, 16])
        sch.vectorize(lanes)
    if rows * kh * kw * channels >= MIN_PARALLEL_MACS // 4:
        sch.parallel(row_loop)
    func = sch.mod["main"].with_attr("op_pattern", 8).with_attr("tir.is_scheduled", True)
    return func.without_attr("global_symbol")
