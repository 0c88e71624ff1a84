"""Software prefetch of a split reduction's next chunk (``prefetch_pass``), a pass over
lowered TIR run with tir_passes.py's.

reduction_split.py runs the row tiles of a kernel inside chunks of its reduction, so that
a chunk of the weight panel stays in L1 for every row tile. The first row tile of each
chunk still reads that chunk from memory, a short run of rows per 4 KB page, and the
hardware prefetcher restarts at every page: in a whole model, where the weights of one
layer are long gone from the caches when it runs again (the encoder's 42 MB), the
encoder's matmuls ran 13% slower than each one called over and over on the same weights.

``split_reduction`` marks its steps loop with ``KEY`` (the steps of a chunk) and
``ROWS_KEY`` (the names of the row tile loops around it). Each vector load in the steps
loop's body that moves with the loop names a line to fetch one chunk ahead: while the row
tiles work on chunk c, chunk c + 1 comes in (``prefetcht1``: into L2, leaving L1 to the
chunk in use), and after a panel's last chunk the first of the next panel, which the same
thread takes next (a prefetch never faults, so the one past the last panel is harmless).
The prefetches are shared out among the row tiles: before its steps loop, row tile r
fetches the lines of steps r*n .. r*n + n - 1 of the next chunk. Inside the steps loop
they cost twice the time: LLVM no longer kept the accumulators in registers across a
call that may touch memory. More than ``MAX_TILE_PREFETCHES`` a tile in one burst slowed
resnet50's 7 x 7 convs (64 a tile) by 2-7%, so such kernels get none; 32 or fewer sped
its 14 x 14 ones by 5-8%. A load whose address the walk cannot follow gets none.

Encoder (6 layers, hidden 384, sequence 128) on the AVX-512 EPYC (Zen 4): its matmuls in
model order 15.2 -> 13.1 ms, single calls alternated p50 21.3 -> 20.5 and 18.4 -> 17.7 ms
(docs/BENCHMARKS.md, run 23).
"""

from __future__ import annotations

from typing import Any

from onnxpress.backends.tvm.tir_passes import cpu_module_pass, map_children

KEY = "onnxpress_prefetch_ahead"  # on the steps loop: the steps of one chunk
ROWS_KEY = "onnxpress_prefetch_rows"  # on it too: the names of the row tile loops around it
LINE_BYTES = 64
MAX_TILE_PREFETCHES = 32  # per row tile: more in one burst slowed the tile down
LOCALITY_L2 = 2  # llvm.prefetch locality 2: prefetcht1 on x86


class _Unknown(Exception):
    """An expression the substitution does not handle."""


def substitute(expr: Any, values: dict[Any, Any]) -> Any:
    """``expr`` with the variables in ``values`` replaced (integer index arithmetic only:
    raises _Unknown on anything else)."""
    from tvm import tirx

    if isinstance(expr, tirx.Var):
        return values.get(expr, expr)
    if isinstance(expr, tirx.IntImm):
        return expr
    for kind in (tirx.Add, tirx.Sub, tirx.Mul, tirx.FloorDiv, tirx.FloorMod, tirx.Min, tirx.Max):
        if isinstance(expr, kind):
            return kind(substitute(expr.a, values), substitute(expr.b, values))
    if isinstance(expr, tirx.Cast):
        return tirx.Cast(expr.dtype, substitute(expr.value, values))
    raise _Unknown(type(expr).__name__)


def _loads(node: Any, found: list[Any]) -> None:
    """Collect the BufferLoads in an expression or statement tree (the node types of a
    lowered kernel body; others are skipped)."""
    from tvm import ir, tirx
    from tvm.tirx import stmt as S

    if isinstance(node, ir.expr.TensorLoad):
        found.append(node)
        return
    if isinstance(node, S.SeqStmt):
        for child in node.seq:
            _loads(child, found)
    elif isinstance(node, S.BufferStore):
        _loads(node.value, found)
    elif isinstance(node, S.Evaluate):
        _loads(node.value, found)
    elif isinstance(node, (S.For, S.AttrStmt)):
        _loads(node.body, found)
    elif isinstance(node, S.IfThenElse):
        _loads(node.then_case, found)
    elif isinstance(node, ir.expr.Call):
        for arg in node.args:
            _loads(arg, found)
    elif isinstance(node, (tirx.Broadcast, tirx.Cast)):
        _loads(node.value, found)
    elif isinstance(node, tirx.Select):
        for part in (node.condition, node.true_value, node.false_value):
            _loads(part, found)
    elif hasattr(node, "a") and hasattr(node, "b"):
        _loads(node.a, found)
        _loads(node.b, found)


def _bound(node: Any, found: list[Any]) -> None:
    """Collect the variables a statement tree defines (loops and ``Bind``)."""
    from tvm.tirx import stmt as S

    if isinstance(node, S.SeqStmt):
        for child in node.seq:
            _bound(child, found)
    elif isinstance(node, S.Bind):
        found.append(node.var)
    elif isinstance(node, S.For):
        found.append(node.loop_var)
        _bound(node.body, found)
    elif isinstance(node, (S.AttrStmt, S.While)):
        _bound(node.body, found)
    elif isinstance(node, S.IfThenElse):
        _bound(node.then_case, found)
        if node.else_case is not None:
            _bound(node.else_case, found)


def _free(expr: Any, inner: list[Any]) -> bool:
    """Whether ``expr`` reads none of the variables ``inner``."""
    from tvm import tirx

    if isinstance(expr, tirx.Var):
        return not any(expr.same_as(var) for var in inner)
    if isinstance(expr, tirx.Cast):
        return _free(expr.value, inner)
    if hasattr(expr, "a") and hasattr(expr, "b"):
        return _free(expr.a, inner) and _free(expr.b, inner)
    return True


def _bindings(body: Any) -> dict[Any, Any]:
    """The values of the variables a flat body binds (``Bind`` statements), each with the
    bindings before it inlined."""
    from tvm.tirx import stmt as S

    values: dict[Any, Any] = {}
    for child in body.seq if isinstance(body, S.SeqStmt) else [body]:
        if isinstance(child, S.Bind):
            try:
                values[child.var] = substitute(child.value, values)
            except _Unknown:
                continue
    return values


def line_loads(loop: Any) -> list[tuple[Any, Any]]:
    """(buffer, index) of one vector load per cache line that ``loop``'s body reads at
    addresses moving with the loop, the index in terms of variables defined outside the
    body and the loop's own."""
    from tvm import tirx
    from tvm.sym import Analyzer

    found: list[Any] = []
    _loads(loop.body, found)
    inner: list[Any] = []
    _bound(loop.body, inner)
    values = _bindings(loop.body)
    analyzer = Analyzer()
    lines: dict[tuple[str, int], tuple[Any, Any]] = {}
    firsts: dict[str, Any] = {}
    for load in found:
        if len(load.indices) != 1 or not isinstance(load.indices[0], tirx.Ramp):
            continue
        try:
            base = analyzer.simplify(substitute(load.indices[0].base, values))
        except _Unknown:
            continue
        if _free(base, [loop.loop_var]) or not _free(base, inner):  # still, or not ours
            continue
        buffer = load.source
        name = str(buffer.name)
        offset = analyzer.simplify(base - firsts.setdefault(name, base))
        if not isinstance(offset, tirx.IntImm):
            continue  # lines are told apart by constant offsets from the first load
        element_bytes = max(1, buffer.dtype.bits * buffer.dtype.lanes // 8)
        lines.setdefault((name, int(offset) * element_bytes // LINE_BYTES), (buffer, base))
    return list(lines.values())


def prefetch_loop(loop: Any, ahead: int, rows: list[tuple[Any, int]]) -> Any | None:
    """The prefetches of the chunk ``ahead`` steps on, shared out among the row tiles
    (``rows``: the row loops' variables and extents around ``loop``): row tile r takes
    steps r*n .. r*n + n - 1 of it. None when ``loop`` reads nothing to prefetch."""
    from tvm import tirx
    from tvm.tirx import stmt as S

    loads = line_loads(loop)
    steps, dtype = int(loop.extent), str(loop.loop_var.ty.dtype)
    if not loads or not isinstance(loop.min, tirx.IntImm) or int(loop.min) != 0:
        return None
    tile: Any = tirx.IntImm(dtype, 0)
    tiles = 1
    for var, extent in rows:
        tile = tile * extent + (var if str(var.ty.dtype) == dtype else tirx.Cast(dtype, var))
        tiles *= extent
    share = -(-steps // tiles)
    if share * len(loads) > MAX_TILE_PREFETCHES:
        return None
    index = tirx.Var("prefetch_step", dtype)
    step = tile * share + index
    calls = []
    for buffer, base in loads:
        moved = substitute(base, {loop.loop_var: step + ahead})
        address = tirx.address_of(tirx.BufferLoad(buffer, [moved]))
        calls.append(
            S.Evaluate(
                tirx.call_llvm_intrin(
                    "void", "llvm.prefetch.p0", address, tirx.IntImm("int32", 0),
                    tirx.IntImm("int32", LOCALITY_L2), tirx.IntImm("int32", 1),
                )
            )
        )  # fmt: skip
    body: Any = calls[0] if len(calls) == 1 else S.SeqStmt(calls)
    if share * tiles != steps:
        body = S.IfThenElse(step < steps, body, None)
    zero = tirx.IntImm(dtype, 0)
    return S.For(index, zero, tirx.IntImm(dtype, share), S.ForKind.SERIAL, body)


def add_prefetches(stmt: Any, loops: tuple[tuple[Any, int], ...] = ()) -> Any:
    """``stmt`` with every loop marked ``KEY`` preceded by its share of the prefetches of
    the next chunk (see the docstring); ``loops`` are the loops around ``stmt``."""
    from tvm import tirx
    from tvm.tirx import stmt as S

    if isinstance(stmt, S.For) and KEY in stmt.annotations:
        ahead = int(stmt.annotations[KEY])
        names = str(stmt.annotations.get(ROWS_KEY, "")).split(",")
        # the row loops that lowering kept (an unrolled one is gone: its copies share alike)
        rows = [(var, extent) for var, extent in loops if str(var.name) in names]
        annotations = {k: v for k, v in stmt.annotations.items() if k not in (KEY, ROWS_KEY)}
        loop = S.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, stmt.body,
            stmt.thread_binding, annotations, stmt.step, stmt.span,
        )  # fmt: skip
        ahead_loop = prefetch_loop(loop, ahead, rows)
        return loop if ahead_loop is None else S.SeqStmt([ahead_loop, loop])
    if isinstance(stmt, S.For) and isinstance(stmt.extent, tirx.IntImm):
        loops = (*loops, (stmt.loop_var, int(stmt.extent)))
    return map_children(stmt, lambda child: add_prefetches(child, loops))


def prefetch_pass() -> Any:
    """The module pass: every LLVM (CPU) PrimFunc of the module."""
    return cpu_module_pass("PrefetchAhead", add_prefetches)
