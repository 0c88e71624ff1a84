"""Where the register tile of ``TiledReduction`` (tile_schedule.py) goes: ``plan_tile``
reads a legalized ``out[s...] += a[...] * b[...]`` block and returns a ``TilePlan``.

    v: the spatial axis to vectorize, one that every input indexes at most in its last
        dimension (whole vectors never straddle a group: checked with the arith analyzer,
        ``lane_strides``); widest vector first, then row reuse, then unit-stride loads;
    rows: the innermost other spatial axis that the vector loads do not depend on, tiled by
        ``row_tile`` (and a second axis for small images);
    S: vectors of v side by side, when the rows reuse the vector loads and tile evenly; the
        S and rows with the most FMAs per load win. When v is one vector (the lanes of a
        blocked layout's channel block), S vectors of another axis that only the vector
        loads index (the channel blocks): ``stack_axis``.

Widths come from ``vector_width`` (the target's lanes, else a divisor of the axis). Pure
planning: nothing here changes a schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def vector_width(extent: int, lanes: int) -> int:
    """Vector width for an axis: lanes, lanes/2 or lanes/4 (at least 4) when it divides
    ``extent`` (odd widths split into several registers: 28 -> 4, not 14), else another
    divisor in [lanes/4, lanes], else the whole axis when shorter than ``lanes``; else 0."""
    for width in (lanes, lanes // 2, lanes // 4):
        if width >= 4 and extent % width == 0:
            return width
    for width in range(lanes, max(4, lanes // 4) - 1, -1):
        if extent % width == 0:
            return width
    return extent if 4 <= extent < lanes else 0


def row_tile(extent: int, limit: int) -> int:
    """Rows per register tile: the largest divisor of ``extent`` up to ``limit`` when it is
    at least half of ``min(extent, limit)``, else ``min(extent, limit)`` (a ragged tail)."""
    cap = max(1, min(extent, limit))
    best = max(d for d in range(1, cap + 1) if extent % d == 0)
    return best if 2 * best >= cap else cap


@dataclass(frozen=True)
class TilePlan:
    """Where the register tile goes: spatial axis ``vector`` in ``width`` lanes, and
    ``rows``: (axis, tile) pairs, innermost first, whose tiles multiply to the rows of
    accumulators; axes are positions in the block's loops."""

    extents: tuple[int, ...]
    spatial: int  # the first ``spatial`` loops are spatial, the rest reductions
    vector: int
    width: int
    contiguous: bool
    rows: tuple[tuple[int, int], ...]
    stack: int = 1  # vectors side by side in the tile: of the vector axis, or of ...
    stack_axis: int | None = None  # ... this axis (a channel-block axis: blocked layout)

    @property
    def macs(self) -> int:
        return math.prod(self.extents)


def plan_tile(sch: Any, block: Any, lanes: int, registers: int) -> TilePlan | None:
    """The TilePlan of a ``out[s...] += a * b`` reduction block, or None if it does not fit."""
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    spatial = kinds.index(2) if 2 in kinds else len(kinds)
    if stmt.init is None or spatial in (0, len(kinds)) or set(kinds[spatial:]) != {2}:
        return None
    if len(stmt.writes) != 1 or not str(stmt.writes[0].source.dtype).startswith("float"):
        return None
    loops = sch.get_loops(block)
    try:
        extents = tuple(int(sch.get(loop).extent) for loop in loops)
        if extents != tuple(int(iv.dom.extent) for iv in stmt.iter_vars):
            return None
    except TypeError:  # symbolic extents
        return None
    out_index = [rng.min for rng in stmt.writes[0].region]
    axes = [iv.var for iv in stmt.iter_vars]
    if len(out_index) != spatial or any(
        not e.same_as(v) for e, v in zip(out_index, axes[:spatial], strict=True)
    ):
        return None
    windowed = _windowed(stmt.reads, axes, spatial, extents)
    best: tuple[tuple[int, bool, bool, float, int], TilePlan] | None = None
    for axis in range(spatial - 1, -1, -1):
        width = vector_width(extents[axis], lanes)
        strides = lane_strides(stmt.reads, axes[axis], extents[axis], width) if width else None
        if strides is None:
            continue
        contiguous = all(stride in (0, 1) for stride in strides)
        varying = [r for r in stmt.reads if _uses(r, axes[axis])]
        others = [a for a in range(spatial - 1, -1, -1) if a != axis and extents[a] > 1]
        reuse = [a for a in others if not any(_uses(r, axes[a]) for r in varying)]
        stackable = bool(reuse) and contiguous
        stack, rows, score = stacked_rows(
            extents,
            axis,
            width,
            reuse or others[:1],
            registers,
            stackable,
            chains=not others,
            windowed=windowed,
        )
        plan = TilePlan(extents, spatial, axis, width, contiguous, rows, stack)
        if stackable and extents[axis] == width:
            plan, score = _block_stack(
                plan, score, stmt.reads, axes, varying, reuse, registers, windowed
            )
        key = (width, bool(reuse), contiguous, score, axis)
        if best is None or key > best[0]:
            best = (key, plan)
    return best[1] if best is not None else None


def _block_stack(
    plan: TilePlan,
    score: float,
    reads: Any,
    axes: list[Any],
    varying: list[Any],
    reuse: list[int],
    registers: int,
    windowed: frozenset[int] = frozenset(),
) -> tuple[TilePlan, float]:
    """``plan`` with vectors of another axis side by side when the vector axis is one
    vector (the lanes of a channel block) and that axis (the blocks) indexes only the
    vector loads: each row value, broadcast once, feeds every block of the stack, as the
    stack of a long channel axis does in NCHW. Keeps ``plan`` unless this scores higher."""
    extents = plan.extents
    shared = [r for r in reads if not any(r.same_as(v) for v in varying)]
    for axis in range(plan.spatial):
        if axis == plan.vector or extents[axis] < 2 or axis in reuse:
            continue
        if any(_uses(r, axes[axis]) for r in shared) or not any(
            _uses(r, axes[axis]) for r in varying
        ):
            continue
        stack, rows, stacked = stacked_rows(
            extents,
            axis,
            1,
            reuse,
            registers,
            stack_registers=BLOCK_STACK_REGISTERS,
            windowed=windowed,
        )
        if stack > 1 and stacked > score:
            plan = TilePlan(extents, plan.spatial, plan.vector, plan.width, True, rows, stack, axis)
            score = stacked
    return plan, score


def stacked_rows(
    extents: tuple[int, ...],
    axis: int,
    width: int,
    row_axes: list[int],
    registers: int,
    stackable: bool = True,
    chains: bool = False,
    stack_registers: int | None = None,
    windowed: frozenset[int] = frozenset(),
) -> tuple[int, tuple[tuple[int, int], ...], float]:
    """(S, rows, FMAs per load) of the best tile for vector axis ``axis`` in ``width``
    lanes with rows from ``row_axes``: S vectors side by side (1-4, see ``_stacks``; up to 8
    with ``chains``, a tile without rows), rows tiled within the registers left. A stack
    with a ragged row tail only where ``_stackable_tail`` allows it."""
    best: tuple[float, int, tuple[tuple[int, int], ...]] | None = None
    vectors = extents[axis] // width
    if chains:  # no rows (a matrix-vector product): vectors side by side are what keeps
        # several FMA chains in flight
        candidates = [1] + [s for s in range(2, 9) if vectors % s == 0 and 2 * s <= registers]
    else:
        least = STACK_REGISTERS if stack_registers is None else stack_registers
        candidates = _stacks(vectors, stackable and registers >= least)
    ranked: tuple[bool, float] | None = None
    for stack in candidates:
        rows = _row_tiles(extents, row_axes, _row_limit(registers, stack))
        if stack > 1 and not all(
            _stackable_tail(extents[a], tile, a in windowed) for a, tile in rows
        ):
            continue  # a ragged tail not worth the wider tile
        score = _loads_per_fma(extents, rows, stack)
        # enough FMA chains in flight first (a 2 x 3 tile on AVX2 stalls on FMA latency
        # where 9 rows of one vector do not), then FMAs per load
        chains_ok = stack * math.prod(tile for _, tile in rows) >= MIN_CHAINS
        if ranked is None or (chains_ok, score) > ranked:
            ranked, best = (chains_ok, score), (score, stack, rows)
    assert best is not None  # stack 1 is always a candidate
    return best[1], best[2], best[0]


MAX_UNROLLED_RAGGED = 4  # tiles of a ragged row axis unrolled (more: a serial loop)
MIN_CHAINS = 8  # accumulators a tile wants: two FMA pipes x 4 cycles of latency
STACK_REGISTERS = 16  # stacks on AVX2's 16 registers too: on an AVX2-only CPU (Zen 3) a
# 4-row x 3-vector tile runs a 128x384x1536 matmul at 49 GMAC/s where 10 x 1 ran at 33
# (AVX2 code on an AVX-512 CPU had measured the reverse)
BLOCK_STACK_REGISTERS = 16  # stacks of channel blocks (_block_stack) paid off on AVX2 too:
# AVX2 code of resnet18 19.8 -> 18.0 ms, mobilenet_v2 4.1 -> 3.5 ms (on the AVX-512 host)


def _stackable_tail(extent: int, tile: int, windowed: bool) -> bool:
    """Whether a stacked tile may have rows ``tile`` on an axis of ``extent``: evenly, or
    with a ragged tail of at least half a tile, in few enough tiles to unroll
    (``MAX_UNROLLED_RAGGED``: each copy has its bounds folded), on an axis no kernel window
    slides along (``windowed``). 1x1 and 7x1 convs at 17 x 17 ran 1.3-1.5x faster with
    2 vectors x 6 rows than with one vector x 10 rows; 1x7 convs ran 1.3x slower (BENCHMARKS
    run 22)."""
    tail = extent % tile
    if not tail:
        return True
    return not windowed and 2 * tail >= tile and -(-extent // tile) <= MAX_UNROLLED_RAGGED


def _stacks(vectors: int, stackable: bool) -> list[int]:
    """Vector counts to try side by side: 1, and 2-4 when they divide the axis' vectors and
    the rows reuse the vector loads (each row value is broadcast once for all of them)."""
    return [1] + [s for s in (2, 3, 4) if stackable and vectors % s == 0]


def _row_limit(registers: int, stack: int) -> int:
    """Accumulator rows per tile. One vector: 14 of 32 registers, 10 of 16 (AVX2; measured
    with packed weights: 7-8 rows run at 170 GFLOP/s on two cores where 4 ran at 110); a
    stack shares three quarters of them."""
    if stack == 1:
        return max(2, registers - 6 if registers <= 16 else registers // 2 - 2)
    return max(1, registers * 3 // 4 // stack)


def _loads_per_fma(
    extents: tuple[int, ...], rows: tuple[tuple[int, int], ...], stack: int
) -> float:
    """FMAs per load of a tile step (higher is better): ``stack`` vector loads and one
    broadcast per row feed ``stack * rows`` FMAs; a ragged row tile counts its average."""
    count = 1.0
    for axis, tile in rows:
        count *= extents[axis] / -(-extents[axis] // tile)
    return round(stack * count / (stack + count), 2)


def _row_tiles(
    extents: tuple[int, ...], axes: list[int], limit: int
) -> tuple[tuple[int, int], ...]:
    """Tile the first axis (row_tile), and when it fits whole, a divisor of the next one
    with what is left of ``limit`` (a 2-D tile of output pixels for small images)."""
    if not axes:
        return ()
    first = row_tile(extents[axes[0]], limit)
    rows = [(axes[0], first)]
    if first == extents[axes[0]] and len(axes) > 1 and limit // first >= 2:
        second = max(d for d in range(1, limit // first + 1) if extents[axes[1]] % d == 0)
        if second > 1:
            rows.append((axes[1], second))
    return tuple(rows)


def _windowed(
    reads: Any, axes: list[Any], spatial: int, extents: tuple[int, ...]
) -> frozenset[int]:
    """The spatial axes that some read indexes together with a reduction axis longer than
    one in one dimension (``x * s + rx * d``: a kernel window slides along them)."""
    from tvm import tirx

    window = [axes[a] for a in range(spatial, len(axes)) if extents[a] > 1]
    found: set[int] = set()
    for read in reads:
        for rng in read.region:
            used = tirx.analysis.undefined_vars(rng.min)
            if any(v.same_as(r) for v in used for r in window):
                found.update(a for a in range(spatial) if any(v.same_as(axes[a]) for v in used))
    return frozenset(found)


def _uses(read: Any, var: Any) -> bool:
    from tvm import tirx

    return any(v.same_as(var) for rng in read.region for v in tirx.analysis.undefined_vars(rng.min))


def lane_strides(reads: Any, var: Any, extent: int, width: int) -> list[int] | None:
    """For vector lanes ``var = o * width + i``, per read: 0 if no lane varies it, else the
    lane stride of its last index (-1 if not constant); None if some read varies with the
    lanes before its last dimension, unless its row-major offset advances by exactly one
    per lane (then 1)."""
    from tvm import tirx
    from tvm.ir import Range
    from tvm.sym import Analyzer

    dtype = str(var.ty.dtype)
    outer, inner = tirx.Var("o", dtype), tirx.Var("i", dtype)

    zero = tirx.const(0, dtype)

    def lanes(bound: Any) -> Analyzer:
        """Lanes of the vector: ``bound`` is the lane index's Range, or a constant lane."""
        analyzer = Analyzer()
        analyzer.bind(outer, Range.from_min_extent(zero, tirx.const(extent // width, dtype)))
        analyzer.bind(inner, bound)
        analyzer.bind(var, outer * tirx.const(width, dtype) + inner)
        return analyzer

    whole = lanes(Range.from_min_extent(zero, tirx.const(width, dtype)))
    first, second = lanes(zero), lanes(tirx.const(1, dtype))
    at = (whole, first, second)
    strides = []
    for read in reads:
        index = [rng.min for rng in read.region]
        varying = [
            any(v.same_as(inner) for v in tirx.analysis.undefined_vars(whole.simplify(e)))
            for e in index
        ]
        if any(varying[:-1]):
            # lanes that cross a row (p // W, p % W of a flattened spatial axis) are still
            # consecutive in memory when the flattened offset advances by one per lane
            if _lane_stride(_row_major_offset(read), at, inner) != 1:
                return None
            strides.append(1)
            continue
        stride = _lane_stride(index[-1], at, inner) if varying[-1] else 0
        strides.append(-1 if stride is None else stride)
    return strides


def _row_major_offset(read: Any) -> Any:
    index = [rng.min for rng in read.region]
    offset = index[0]
    for extent, position in zip(list(read.source.shape)[1:], index[1:], strict=True):
        offset = offset * extent + position
    return offset


def _lane_stride(expr: Any, at: tuple[Any, Any, Any], inner: Any) -> int | None:
    """s when ``expr`` at lane i is its value at lane 0 plus s * i for every lane of the
    vector, else None; ``at``: analyzers binding the lanes (all of them, lane 0, lane 1)."""
    from tvm import tirx
    from tvm.sym import Analyzer

    whole, first, second = at
    stride = Analyzer().simplify(second.simplify(expr) - first.simplify(expr))
    if not isinstance(stride, tirx.IntImm):
        return None
    rest = Analyzer().simplify(whole.simplify(expr) - first.simplify(expr) - stride * inner)
    return int(stride) if isinstance(rest, tirx.IntImm) and int(rest) == 0 else None
