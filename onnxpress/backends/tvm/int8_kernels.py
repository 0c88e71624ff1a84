# mypy: disable-error-code="valid-type"
"""Integer kernels for the QDQ-to-integer lowering (onnxpress.backends.tvm.int8).

  packed_gemm(isa, rows, depth, cols):
      C[m, n] = sum_k A[m, k] * B[n // L, k // G, n % L, k % G]    (L = isa.lanes, G = group)
      A [rows, depth] (isa.a_dtype), B packed L x G blocks (isa.b_dtype), C int32
      [rows, cols]; rows % row tile == 0, depth % 4 == 0, cols % L == 0 (callers pad).
  pack_weight(isa, w[k, n]) -> the [n/L, k/G, L, G] blocks, zero-padded, stored as b_dtype.
  im2col(x[n, h, w, c] padded with the zero point) -> A[rows, depth], (kh, kw, c) order.

The L x G inner block is one dot-product step:
  VNNI       x86 AVX512-VNNI  vpdpbusd                 u8 x s8, 16 lanes x 4, exact
  SDOT       aarch64 +dotprod sdot                     s8 x s8,  4 lanes x 4, exact
  AVX2_U8S8  x86 AVX2         vpmaddubsw + vpmaddwd 1  u8 x s8,  8 lanes x 4: each adjacent
             pair of products (k = 0,1 and 2,3 of a group) is summed into int16 with
             saturation, so it is exact only where a0|w0| + a1|w1| <= 32767 for every
             byte a <= 255 (int8.py checks each layer's weights in this K order)
  AVX2_S16   x86 AVX2         vpmaddwd on int16        u16 x s16, 8 lanes x 2, exact; its
             int8 weights stay bytes in memory, widened as loaded (vpmovsxbw); Winograd's
             transformed weights, which exceed a byte, are int16 (with_int16_weights)
  VNNI_S16   x86 AVX512-VNNI  vpdpwssd                 s16 x s16, 16 lanes x 2, exact; only
             for integer Winograd (winograd_isa), whose transformed operands exceed a byte
The intrinsics are registered here with the operand types of current LLVM (byte vectors);
TVM's own VNNI registration still uses the older <16 x i32> signature, which LLVM 22
rejects. The schedule keeps 16 accumulators (12 with AVX2's 16 registers: rows x up to 4
column blocks) in registers around the depth loop and parallelizes the outer tiles of large
GEMMs only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np

from onnxpress.analysis.saturation import U8_MAX, pairs_at_risk

GROUP = 4  # depths are padded to this (the 8-bit products one int32 lane sums per step)
MIN_PARALLEL_MACS = 1 << 22  # below this a kernel runs faster than a thread pool wakes
INT16_ONES = 1


@dataclass(frozen=True)
class DotIsa:
    """A dot-product step: ``lanes`` int32 lanes, each summing ``group`` products of an A
    value (``a_dtype``) and a B value (``b_dtype``); ``form`` says how the intrinsic is used:

      accumulate  c = intrinsic(c, a, b)                    (vpdpbusd, sdot: exact)
      pairs16     c += pmaddwd(intrinsic(a, b), 1)           (vpmaddubsw: int16 pair sums
                                                              that saturate; exact only for
                                                              saturation-safe weights)
      madd16      c += intrinsic(a, b)                       (vpmaddwd on int16: exact)
    """

    name: str
    lanes: int
    a_dtype: str  # "uint8", "int8" or "int16"
    intrinsic: str
    features: tuple[str, ...]
    form: str = "accumulate"
    group: int = 4
    b_dtype: str = "int8"
    accumulators: int = 16  # independent accumulator registers per depth loop
    block_tiles: tuple[int, ...] = (4, 2, 1)  # column blocks per register tile, preferred first
    # other column blocks per tile, taken when their row count divides the GEMM's rows and
    # the preferred one does not (no padded rows: no im2col copy for a 1x1 conv)
    alternate_tiles: tuple[int, ...] = ()

    @property
    def exact(self) -> bool:
        """Whether every operand value gives the exact int32 sum (no int16 saturation)."""
        return self.form != "pairs16"


VNNI = DotIsa("vnni", 16, "uint8", "llvm.x86.avx512.vpdpbusd.512", ("avx512vnni", "avx512bw"))
SDOT = DotIsa("sdot", 4, "int8", "llvm.aarch64.neon.sdot.v4i32.v16i8", ("dotprod",))
# AVX2 without VNNI (16 ymm registers: 12 accumulators, the rest for operands).
# 3 column blocks x 4 rows also fit: 12 accumulators, 3 loads of B and 1 broadcast of A.
AVX2_U8S8 = DotIsa(
    "avx2-u8s8", 8, "uint8", "llvm.x86.avx2.pmadd.ub.sw", ("avx2",), "pairs16",
    accumulators=12, block_tiles=(2, 1), alternate_tiles=(3,),
)  # fmt: skip
# int8 weights stay bytes in memory and are sign-extended as loaded (vpmovsxbw): half the
# bytes of int16 weights, which a batch-1 layer with few rows streams from memory per call
AVX2_S16 = DotIsa(
    "avx2-s16", 8, "int16", "llvm.x86.avx2.pmadd.wd", ("avx2",), "madd16", group=2,
    accumulators=12, block_tiles=(2, 1), alternate_tiles=(3,),
)  # fmt: skip
# int16 pairs accumulated into int32 lanes (wrapping): half vpdpbusd's products per step, so
# it pays only where Winograd's transforms cut the products 4x (F(4x4))
VNNI_S16 = DotIsa(
    "vnni-s16", 16, "int16", "llvm.x86.avx512.vpdpwssd.512", ("avx512vnni", "avx512bw"),
    group=2, b_dtype="int16",
)  # fmt: skip
PAIR_MADD = "llvm.x86.avx2.pmadd.wd"  # sums the int16 pairs of pairs16 into int32 lanes


def with_int16_weights(isa: DotIsa) -> DotIsa:
    """``isa`` (int16 activations) with its B operand stored as int16: Winograd's transformed
    weights exceed a byte."""
    if isa.a_dtype != "int16":
        raise ValueError(f"{isa.name} has no int16 weights")
    return replace(isa, b_dtype="int16")


def winograd_isa(exact: DotIsa | None) -> DotIsa | None:
    """The int16 kernel of integer Winograd where the target's exact kernel has one: AVX2's
    vpmaddwd, or VNNI's vpdpwssd beside vpdpbusd; None elsewhere (ARM's sdot, Relax's ops)."""
    if exact is not None and exact.form == "madd16":
        return exact
    return VNNI_S16 if exact == VNNI else None


@dataclass(frozen=True)
class KernelChoice:
    """The kernels an llvm target offers: ``exact`` for any weights and, where the fast one
    saturates (x86 AVX2 without VNNI), ``saturation_safe`` for weights it cannot saturate."""

    exact: DotIsa
    saturation_safe: DotIsa | None = None


def pairs_at_risk_for(isa: DotIsa, weight_kn: np.ndarray) -> int:
    """How many (pair, column) entries of ``weight_kn`` [K, N] (in the kernel's K order) can
    saturate ``isa``'s int16 pair sums for some activation bytes <= 255 (0 for exact ISAs)."""
    if isa.exact:
        return 0
    bound = np.full(weight_kn.shape[0], float(U8_MAX))
    return int(pairs_at_risk(weight_kn, bound).sum())


def choose(choice: KernelChoice, weight_kn: np.ndarray) -> tuple[DotIsa, int]:
    """The kernel for one layer's weights [K, N] in the kernel's K order, and how many of its
    pairs would saturate the fast kernel (then the exact one is used)."""
    fast = choice.saturation_safe
    if fast is None:
        return choice.exact, 0
    risky = pairs_at_risk_for(fast, weight_kn)
    return (choice.exact if risky else fast), risky


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tiles(isa: DotIsa, cols: int, rows: int | None = None) -> tuple[int, int]:
    """(rows, column blocks) of the register tile for a GEMM with ``cols`` (padded) columns:
    up to 4 blocks of ``lanes`` columns, and as many rows as keep ``accumulators`` in flight.
    A GEMM with fewer ``rows`` than that (batch-1 matmuls) is not padded: its tile is all its
    rows and as many column blocks as fill the accumulators."""
    blocks = round_up(cols, isa.lanes) // isa.lanes
    if rows is not None and rows < isa.accumulators // max(isa.block_tiles):
        most = min(isa.accumulators // rows, blocks)
        return rows, next(t for t in range(most, 0, -1) if blocks % t == 0)
    block_tile = next((t for t in isa.block_tiles if blocks % t == 0), 1)
    row_tile = isa.accumulators // block_tile
    if rows is not None and rows % row_tile:
        # the same accumulators in another shape; fewer of them (4 rows x 2 blocks) ran
        # resnet50 int8 1-4% slower than padded rows and an im2col copy (BENCHMARKS run 16)
        for other in (*isa.block_tiles, *isa.alternate_tiles):
            full = isa.accumulators // other * other == isa.accumulators
            if full and blocks % other == 0 and rows % (isa.accumulators // other) == 0:
                return isa.accumulators // other, other
    return row_tile, block_tile


def kernels(target: Any) -> KernelChoice | None:
    """The packed kernels an llvm target can run (VNNI, SDOT, or AVX2's two), or None
    (Relax's own integer ops). AVX-VNNI alone gets AVX2's: LLVM 22 aborts selecting the
    256-bit vpdpbusd for it."""
    from tvm.target import codegen

    if str(target.kind.name) != "llvm":
        return None
    with target:
        for isa in (VNNI, SDOT):
            if codegen.target_has_features(list(isa.features)):
                return KernelChoice(isa)
        if codegen.target_has_features(["avx2"]):
            return KernelChoice(AVX2_S16, AVX2_U8S8)
    return None


def dot_isa(target: Any) -> DotIsa | None:
    """The exact dot-product instruction an llvm target has, or None."""
    choice = kernels(target)
    return choice.exact if choice is not None else None


def has_vnni(target: Any) -> bool:
    """Whether an llvm target can run the vpdpbusd kernel (x86 with AVX512-VNNI)."""
    return dot_isa(target) == VNNI


def pack_weight(isa: DotIsa, weight: np.ndarray) -> np.ndarray:
    """w[k, n] -> [ceil(n/L), ceil(k/4)*4/G, L, G] (``b_dtype``) with zero padding; w must
    fit ``b_dtype`` (int8 weights; Winograd's transformed ones with_int16_weights)."""
    depth, cols = weight.shape
    limits = np.iinfo(isa.b_dtype)
    if weight.size and (weight.min() < limits.min or weight.max() > limits.max):
        raise ValueError(f"weights in [{weight.min()}, {weight.max()}] do not fit {isa.b_dtype}")
    lanes, group = isa.lanes, isa.group
    padded = np.zeros((round_up(depth, GROUP), round_up(cols, lanes)), dtype=isa.b_dtype)
    padded[:depth, :cols] = weight
    k_blocks, n_blocks = padded.shape[0] // group, padded.shape[1] // lanes
    blocks = padded.reshape(k_blocks, group, n_blocks, lanes).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(blocks)


def _impl(isa: DotIsa, packed: Any, b: Any, c: Any) -> Any:
    """The vector expression for one step: the new ``lanes`` int32 accumulators, from the
    ``group`` A values ``packed`` into one int32."""
    from tvm.script import tirx as T

    lanes, group = isa.lanes, isa.group
    acc_type = f"int32x{lanes}"
    a_bytes = f"{isa.a_dtype}x{lanes * 32 // _bits(isa.a_dtype)}"
    a_vec = T.reinterpret(T.broadcast(packed, lanes), dtype=a_bytes)
    b_vec = b.vload([0, 0], dtype=f"{isa.b_dtype}x{lanes * group}")
    if isa.form == "madd16" and isa.b_dtype != "int16":
        b_vec = T.cast(b_vec, f"int16x{lanes * group}")
    step = T.llvm_lookup_intrinsic_id(isa.intrinsic)
    if isa.form == "accumulate":
        return T.call_llvm_pure_intrin(
            step, c.vload([0], dtype=acc_type), a_vec, b_vec, dtype=acc_type
        )
    if isa.form == "madd16":
        return c.vload([0], dtype=acc_type) + T.call_llvm_pure_intrin(
            step, a_vec, b_vec, dtype=acc_type
        )
    pairs = T.call_llvm_pure_intrin(step, a_vec, b_vec, dtype=f"int16x{lanes * 2}")
    ones = T.broadcast(T.int16(INT16_ONES), lanes * 2)
    widened = T.call_llvm_pure_intrin(
        T.llvm_lookup_intrinsic_id(PAIR_MADD), pairs, ones, dtype=acc_type
    )
    return c.vload([0], dtype=acc_type) + widened


def _bits(dtype: str) -> int:
    return int("".join(ch for ch in dtype if ch.isdigit()))


@cache
def _register_intrinsic(isa: DotIsa) -> str:
    from tvm import s_tir
    from tvm.script import tirx as T

    lanes, group, a_dtype, b_dtype = isa.lanes, isa.group, isa.a_dtype, isa.b_dtype

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((group,), a_dtype, offset_factor=1),
        b: T.Buffer((lanes, group), b_dtype, offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:group], b[0:lanes, 0:group])
            T.writes(c[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((group,), a_dtype, offset_factor=1),
        b: T.Buffer((lanes, group), b_dtype, offset_factor=1),
        c: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:lanes], a[0:group], b[0:lanes, 0:group])
            T.writes(c[0:lanes])
            # bound to a variable: inlined into the call, FuseTIR then refuses a pad fused in
            # front of the kernel ("Inconsistent buffers PadInput and A"). A let, not a plain
            # assignment: TVMScript makes that a one-element local buffer, which the CPU
            # lowering allocated from the workspace pool in every task of the parallel loop
            # (a call and a free per tile: 3% of mobilenet_v2's int8 run in perf)
            packed: T.let = T.reinterpret(a.vload([0], f"{a_dtype}x{group}"), dtype="int32")
            c[T.ramp(T.int32(0), 1, lanes)] = _impl(isa, packed, b, c)

    name = f"onnxpress_{isa.name}_{lanes}x{group}_{b_dtype}"
    try:
        s_tir.TensorIntrin.get(name)
    except Exception:
        s_tir.TensorIntrin.register(name, desc, impl)
    return name


def packed_gemm(isa: DotIsa, rows: int, depth: int, cols: int, batch: int = 0) -> Any:
    """The scheduled (dot-product-tensorized) PrimFunc for C = A . B on padded sizes; with
    ``batch`` > 0 a batch of independent GEMMs, A [batch, rows, depth], B [batch, ...packed],
    C [batch, rows, cols] (the batch joins the parallel outer loop)."""
    from tvm import s_tir, te, tirx

    lanes, group = isa.lanes, isa.group
    row_tile, block_tile = tiles(isa, cols, rows)
    if rows % row_tile or depth % GROUP or cols % lanes:
        raise ValueError(f"packed_gemm needs padded sizes, got {rows}x{depth}x{cols}")
    intrin = _register_intrinsic(isa)
    # int64 extents, as Relax's own kernels have: FuseTIR joins this kernel with the
    # elementwise epilogue that follows (op_pattern 4) only where their buffers agree
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    lead = (i64(batch),) if batch else ()
    a = te.placeholder((*lead, i64(rows), i64(depth)), isa.a_dtype, name="A")
    b_shape = (cols // lanes, depth // group, lanes, group)
    b = te.placeholder((*lead, *map(i64, b_shape)), isa.b_dtype, name="B")
    k = te.reduce_axis((i64(0), i64(depth)), name="k")

    def product(*index: Any) -> Any:
        *t, m, n = index
        a_index = [*t, m, k]
        b_index = [*t, n // lanes, k // group, n % lanes, k % group]
        return te.sum(
            a[tuple(a_index)].astype("int32") * b[tuple(b_index)].astype("int32"),
            axis=k,
        )

    c = te.compute((*lead, i64(rows), i64(cols)), product, name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, b, c]))
    block = sch.get_sblock("C")
    *t_loop, m, n, kk = sch.get_loops(block)
    n_blocks = cols // lanes
    m_outer, m_inner = sch.split(m, [None, row_tile])
    n_outer, n_lanes = sch.split(n, [None, lanes])
    n_tile, n_inner = sch.split(n_outer, [None, block_tile])
    k_outer, k_inner = sch.split(kk, [None, group])
    sch.reorder(*t_loop, m_outer, n_tile, k_outer, m_inner, n_inner, n_lanes, k_inner)
    outer = sch.fuse(*t_loop, m_outer, n_tile)
    outer_tiles = max(batch, 1) * rows // row_tile * (n_blocks // block_tile)
    if max(batch, 1) * rows * depth * cols >= MIN_PARALLEL_MACS and outer_tiles > 1:
        sch.parallel(outer)
    init = sch.decompose_reduction(block, k_outer)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(n_lanes, intrin)
    sch.unroll(m_inner)
    sch.unroll(n_inner)
    func = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 4)
    return func.without_attr("global_symbol")


def im2col(
    padded_shape: tuple[int, int, int, int],
    kernel: tuple[int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    rows: int,
    depth: int,
    dtype: str = "uint8",
) -> Any:
    """PrimFunc: x[n, h, w, c] (NHWC, ``dtype``, already padded spatially with the zero
    point) -> patches[rows, depth] with row = (n, oh, ow) and the depth in (kh, kw, c) order,
    unpadded channels: a 3-channel 7x7 stem packs 147 taps into a depth of 148, not 7x7x4.
    Taps past kh * kw * c (up to the GEMM's depth multiple) are zero; they meet zero weights.
    The innermost copy runs over the contiguous (kw, c) span of one kernel row. Rows past
    the real count (padding to the register tile) repeat the last real row; their outputs
    are discarded. Marked opaque so that Relax does not fuse it into the producer's epilogue
    (which would recompute every requantization once per kernel tap)."""
    from tvm import s_tir, te, tirx

    batch, _, _, channels = padded_shape
    kh, kw = kernel
    out_h, out_w = out_hw
    taps = kh * kw * channels
    if depth < taps:
        raise ValueError(f"im2col depth {depth} < {kh}x{kw}x{channels} taps")
    data = te.placeholder(padded_shape, dtype, name="x")
    used_rows = batch * out_h * out_w

    def patch(row: Any, k: Any) -> Any:
        real = tirx.min(row, used_rows - 1)
        n, oh, ow = real // (out_h * out_w), (real // out_w) % out_h, real % out_w
        i, j, c = k // (kw * channels), (k // channels) % kw, k % channels
        value = data[n, oh * strides[0] + i * dilation[0], ow * strides[1] + j * dilation[1], c]
        if depth == taps:
            return value
        return tirx.if_then_else(k < taps, value, tirx.const(0, dtype))

    patches = te.compute((rows, depth), patch, name="patches")
    sch = s_tir.Schedule(te.create_prim_func([data, patches]))
    row_loop, depth_loop = sch.get_loops(sch.get_sblock("patches"))
    # one kernel row's taps are contiguous in x (kw * c values) where the dilation is 1
    span = kw * channels if dilation[1] == 1 else channels
    _, inner = sch.split(depth_loop, [None, span])
    if span % 16 == 0:
        _, lanes = sch.split(inner, [None, 16])
        sch.vectorize(lanes)
    if rows * depth >= MIN_PARALLEL_MACS // 4:
        sch.parallel(row_loop)
    func = sch.mod["main"].with_attr("op_pattern", 8).with_attr("tirx.is_scheduled", True)
    return func.without_attr("global_symbol")
