"""Kernel scratch buffers on the stack: a TIR pass for CPU functions that marks each
fixed-size buffer a kernel allocates (up to ``STACK_BYTES``) to stay a stack array.

TVM's CPU lowering (``LowerTVMBuiltin``) puts a kernel's own buffer on the stack only when
it is "global" scope and under 1 KB; every other one becomes a ``TVMBackendAllocWorkspace``
call and a free, at the place the buffer is allocated: inside the parallel loop for a
register tile's accumulators, so once per tile. The schedules keep their tiles "global"
(tile_schedule.py), which covers AVX2 (at most 12 vectors, 384 bytes), but AVX-512's
tiles (14 rows x 2 vectors of 16 floats, 1.8 KB) and the reduction split's accumulators
(reduction_split.py) are larger. Marked ``disable_lower_builtin``, the allocation is left
to code generation, which makes it an ``alloca`` in the function's entry block: no call,
and LLVM keeps a fully unrolled tile in registers. ``STACK_BYTES`` bounds what one buffer
may take of a worker thread's stack (8 MB by default on Linux).

Only the statements that hold others (sequences, loops, conditions, attributes) are
walked; the pass runs after TVM's TIR pipeline and before the host finalization, as
dynamic_parallel.py's does.
"""

from __future__ import annotations

import math
from typing import Any

STACK_BYTES = 16 << 10  # the largest kernel buffer kept on the stack
KEY = "disable_lower_builtin"  # LowerTVMBuiltin leaves an allocation so marked alone
SCOPES = ("global", "local")


def _fits(buffer: Any) -> bool:
    """Whether ``buffer`` has a constant size of at most STACK_BYTES in a CPU scope."""
    if str(buffer.scope()) not in SCOPES:
        return False
    try:
        elements = math.prod(int(d) for d in buffer.shape)
    except TypeError:  # a symbolic extent
        return False
    dtype = buffer.dtype
    return 0 < elements * int(dtype.bits) * int(dtype.lanes) // 8 <= STACK_BYTES


def mark(stmt: Any) -> Any:
    """``stmt`` with every fitting allocation marked (the same object where none is)."""
    from tvm import tirx
    from tvm.tirx import stmt as S

    if isinstance(stmt, S.AllocBuffer):
        if not _fits(stmt.buffer) or KEY in stmt.annotations:
            return stmt
        marked = {**stmt.annotations, KEY: tirx.IntImm("bool", 1)}
        return S.AllocBuffer(stmt.buffer, marked, span=stmt.span)
    if isinstance(stmt, S.SeqStmt):
        seq = [mark(s) for s in stmt.seq]
        if all(new.same_as(old) for new, old in zip(seq, stmt.seq, strict=True)):
            return stmt
        return S.SeqStmt(seq, stmt.span)
    if isinstance(stmt, S.For):
        body = mark(stmt.body)
        if body.same_as(stmt.body):
            return stmt
        return S.For(
            stmt.loop_var,
            stmt.min,
            stmt.extent,
            stmt.kind,
            body,
            stmt.thread_binding,
            stmt.annotations,
            stmt.step,
            stmt.span,
        )
    if isinstance(stmt, S.AttrStmt):
        body = mark(stmt.body)
        if body.same_as(stmt.body):
            return stmt
        return S.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body, stmt.span)
    if isinstance(stmt, S.IfThenElse):
        then = mark(stmt.then_case)
        other = mark(stmt.else_case) if stmt.else_case is not None else None
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return S.IfThenElse(stmt.condition, then, other, stmt.span)
    if isinstance(stmt, S.While):
        body = mark(stmt.body)
        return stmt if body.same_as(stmt.body) else S.While(stmt.condition, body, stmt.span)
    return stmt


def stack_scratch_pass() -> Any:
    """The module pass: every LLVM (CPU) PrimFunc of the module."""
    import tvm
    from tvm import tirx

    def on_cpu(func: Any) -> bool:
        target = func.attrs.get("target") if func.attrs is not None else None
        return target is not None and str(target.kind.name) == "llvm"

    @tvm.transform.module_pass(opt_level=0, name="StackScratch")
    def apply(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and on_cpu(func):
                body = mark(func.body)
                if not body.same_as(func.body):
                    updates[gvar] = func.with_body(body)
        if not updates:
            return mod
        functions = {gvar: updates.get(gvar, func) for gvar, func in mod.functions.items()}
        return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)

    return apply
