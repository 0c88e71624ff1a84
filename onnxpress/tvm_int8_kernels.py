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
MIN_PARALLEL_MACS = 1 << 16


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


def im2col_te(
    data: Any,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    pad_value: int,
    rows: int,
    depth: int,
) -> Any:
    """TE: x[n, c, h, w] (uint8) -> patches[rows, depth] with row = (n, oh, ow) and column
    = (c, kh, kw); out-of-image taps read ``pad_value`` (the zero point: float 0), padded
    rows/columns read 0."""
    from tvm import te, tirx

    batch, channels, height, width = (int(d) for d in data.shape)
    kh, kw = kernel
    top, left, bottom, right = padding
    out_h = (height + top + bottom - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (width + left + right - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    used_rows, used_depth = batch * out_h * out_w, channels * kh * kw

    def patch(row: Any, col: Any) -> Any:
        n, rest = row // (out_h * out_w), row % (out_h * out_w)
        oh, ow = rest // out_w, rest % out_w
        c, tap = col // (kh * kw), col % (kh * kw)
        y = oh * strides[0] + (tap // kw) * dilation[0] - top
        x = ow * strides[1] + (tap % kw) * dilation[1] - left
        inside = tirx.all(y >= 0, y < height, x >= 0, x < width)
        value = tirx.if_then_else(
            inside,
            data[
                tirx.min(n, batch - 1),
                c,
                tirx.max(tirx.min(y, height - 1), 0),
                tirx.max(tirx.min(x, width - 1), 0),
            ],
            tirx.const(pad_value, "uint8"),
        )
        valid = tirx.all(row < used_rows, col < used_depth)
        return tirx.if_then_else(valid, value, tirx.const(0, "uint8"))

    return te.compute((rows, depth), patch, name="im2col")
