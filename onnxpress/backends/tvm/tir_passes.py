"""onnxpress's passes over lowered TIR, run after TVM's TIR pipeline and before the host
finalization (build.tir_pipeline), and the walk they share (TVM 0.27 has no statement
mutator in Python): ``map_children`` rebuilds a statement that holds others (a loop, a
sequence, an attribute, a condition, a while loop) from its transformed children, and
``cpu_module_pass`` wraps a function-body rewrite as a module pass over the CPU (LLVM)
functions. dynamic_parallel.py's split of parallel loops is one; the other is here:

Kernel scratch on the stack (``stack_scratch_pass``): each fixed-size buffer a kernel
allocates, up to ``STACK_BYTES``, is marked to stay a stack array.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def map_children(stmt: Any, visit: Callable[[Any], Any]) -> Any:
    """``stmt`` with ``visit`` applied to each statement it holds; the same object when no
    child changed, and any other statement as it is."""
    from tvm.tirx import stmt as S

    if isinstance(stmt, S.SeqStmt):
        seq = [visit(s) for s in stmt.seq]
        if all(new.same_as(old) for new, old in zip(seq, stmt.seq, strict=True)):
            return stmt
        return S.SeqStmt(seq, stmt.span)
    if isinstance(stmt, S.IfThenElse):
        then = visit(stmt.then_case)
        other = visit(stmt.else_case) if stmt.else_case is not None else None
        if then.same_as(stmt.then_case) and (other is None or other.same_as(stmt.else_case)):
            return stmt
        return S.IfThenElse(stmt.condition, then, other, stmt.span)
    if not isinstance(stmt, (S.For, S.AttrStmt, S.While)):
        return stmt
    body = visit(stmt.body)
    if body.same_as(stmt.body):
        return stmt
    if isinstance(stmt, S.AttrStmt):
        return S.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body, stmt.span)
    if isinstance(stmt, S.While):
        return S.While(stmt.condition, body, stmt.span)
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


def cpu_module_pass(name: str, rewrite: Callable[[Any], Any]) -> Any:
    """A module pass named ``name`` that replaces the body of every LLVM (CPU) PrimFunc by
    ``rewrite(body)``; the module unchanged where no body changed."""
    import tvm
    from tvm import tirx

    def on_cpu(func: Any) -> bool:
        target = func.attrs.get("target") if func.attrs is not None else None
        return target is not None and str(target.kind.name) == "llvm"

    @tvm.transform.module_pass(opt_level=0, name=name)
    def apply(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and on_cpu(func):
                body = rewrite(func.body)
                if not body.same_as(func.body):
                    updates[gvar] = func.with_body(body)
        if not updates:
            return mod
        functions = {gvar: updates.get(gvar, func) for gvar, func in mod.functions.items()}
        return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)

    return apply


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
    return map_children(stmt, mark)


def stack_scratch_pass() -> Any:
    """The module pass: every LLVM (CPU) PrimFunc of the module."""
    return cpu_module_pass("StackScratch", mark)
