"""Parallel loops split dynamically: each thread works through its own share of the
iterations in chunks claimed from a counter, then claims the chunks other threads have not
reached, instead of TVM's static split (thread t runs iterations [t * N / T, (t + 1) * N /
T) and the kernel ends when the slowest thread does).

Under the static split a core that is slower for a moment (another process, the
hypervisor, onnxruntime's threads) holds up every kernel, and an odd count of channel
blocks leaves one core idle for a block; onnxruntime's pool hands the rest of a loop to
whichever thread is free. After TVM's lowering pipeline (plain loops, before the host
finalization) the outermost ``for i in parallel(N)`` of every CPU function becomes, for T
runtime threads and shares of S = ceil(N / T) iterations,

    counters[0..T) = 0                      # one per share, each on its own cache line
    for task in parallel(T):                # one task per runtime thread
        for turn in range(T):               # its own share first, then the others'
            owner = (task + turn) % T
            next = claim(counters[owner], C)    # atomically: old = counter; counter += C
            while owner * S + next < min((owner + 1) * S, N):
                for i in range(owner * S + next, ...C iterations, within the share): body(i)
                next = claim(counters[owner], C)

C = ceil(S / CHUNKS_PER_THREAD). On a quiet machine each thread runs exactly its static
share (the same cache lines as the kernels before and after it touch); a thread that falls
behind loses the chunks of its share it has not started. ``claim`` is a relaxed
``atomicrmw add`` in LLVM IR that each function imports through TVM's
``pragma_import_llvm`` (TIR has no CPU atomics), so it is compiled into the library itself.
Each iteration runs once, by one thread, with the same body: results are bit-identical to
the static split. The launch still waits for every worker to have run its task, so a worker
that the OS has descheduled for long still holds the kernel up (that needs onnxruntime's
revocable work items, which TVM's runtime does not have). mobilenet_v2 on two cores: fp32
-3%, int8 -5% (docs/BENCHMARKS.md, run 12).
"""

from __future__ import annotations

import math
from typing import Any

from onnxpress.backends.tvm.tir_passes import cpu_module_pass, map_children

PIPELINE = "onnxpress-dynamic-parallel"  # TIR pipeline names: this, then the thread count
CHUNKS_PER_THREAD = 4
LINE_INTS = 16  # each thread's counter on a 64-byte line of its own: no false sharing
CLAIM = "onnxpress_claim"
CLAIM_IR = f"""
define linkonce_odr i32 @{CLAIM}(ptr %counter, i32 %count) alwaysinline {{
  %old = atomicrmw add ptr %counter, i32 %count monotonic
  ret i32 %old
}}
"""


def chunk_size(iterations: int, threads: int) -> int:
    """Iterations per claimed chunk of one thread's share (see the module docstring)."""
    share = math.ceil(iterations / threads)
    return max(1, math.ceil(share / CHUNKS_PER_THREAD))


def _dynamic_loop(loop: Any, threads: int) -> Any:
    """The claimed-chunk form of one parallel ``loop`` (returned as is when it has a
    runtime extent or too few iterations to share)."""
    from tvm import ir, tirx
    from tvm.tirx import stmt as S

    if not isinstance(loop.extent, tirx.IntImm) or int(loop.extent.value) < 2:
        return loop
    if not isinstance(loop.min, tirx.IntImm) or int(loop.min.value) != 0:
        return loop  # loops are normalized to start at 0 by TVM's lowering
    if str(loop.loop_var.expr_ty()) != "int32":
        return loop  # one TVM could not narrow (over 2**31 iterations): left static
    count = int(loop.extent.value)
    share = math.ceil(count / threads)
    chunk = chunk_size(count, threads)
    i32 = "int32"

    def const(value: int) -> Any:
        return tirx.IntImm(i32, value)

    counters = tirx.decl_buffer((threads * LINE_INTS,), i32, name="claim_counters")
    next_ = tirx.decl_buffer((1,), i32, name="claim_next")
    task, turn, owner, start = (tirx.Var(name, i32) for name in ("task", "turn", "owner", "start"))
    first = owner * share  # the owner's share: [first, min(first + share, count))
    end = tirx.min(first + share, const(count))

    def claim() -> Any:
        pointer = tirx.address_of(tirx.BufferLoad(counters, [owner * LINE_INTS]))
        return tirx.call_extern(i32, CLAIM, pointer, const(chunk))

    chunk_loop = S.For(
        loop.loop_var,
        start,
        tirx.min(const(chunk), end - start),
        S.ForKind.SERIAL,
        loop.body,
        annotations=loop.annotations,
    )
    claimed = first + tirx.BufferLoad(next_, [0])
    drain = S.SeqStmt(
        [
            S.Bind(owner, tirx.truncmod(task + turn, const(threads))),
            S.BufferStore(next_, claim(), [0]),
            S.While(
                claimed < end,
                S.SeqStmt([S.Bind(start, claimed), chunk_loop, S.BufferStore(next_, claim(), [0])]),
            ),
        ]
    )
    task_body = S.SeqStmt(
        [S.AllocBuffer(next_), S.For(turn, const(0), const(threads), S.ForKind.SERIAL, drain)]
    )
    tasks = S.For(task, const(0), const(threads), S.ForKind.PARALLEL, task_body)
    line = tirx.Var("line", i32)
    zero = S.BufferStore(counters, const(0), [line * LINE_INTS])
    reset = S.For(line, const(0), const(threads), S.ForKind.SERIAL, zero)
    body = S.SeqStmt([S.AllocBuffer(counters), reset, tasks])
    return S.AttrStmt(const(0), "pragma_import_llvm", ir.StringImm(CLAIM_IR), body)


def rewrite(stmt: Any, threads: int) -> Any:
    """``stmt`` with each outermost parallel loop in the claimed-chunk form."""
    from tvm.tirx import stmt as S

    if isinstance(stmt, S.For) and stmt.kind == S.ForKind.PARALLEL:
        return _dynamic_loop(stmt, threads)
    return map_children(stmt, lambda child: rewrite(child, threads))


def dynamic_parallel_pass(threads: int) -> Any:
    """The module pass, for a runtime of ``threads`` worker threads: every LLVM (CPU)
    PrimFunc of the module."""
    return cpu_module_pass("DynamicParallel", lambda body: rewrite(body, threads))


def register(threads: int) -> str:
    """Register the TIR pipeline for ``threads`` runtime threads (TVM's default pipeline,
    then this pass) and return its name for ``tvm.compile(tir_pipeline=...)``."""
    import tvm
    from tvm.tirx import compilation_pipeline as pipelines

    name = f"{PIPELINE}-{threads}"

    def factory() -> Any:
        default, host, device = pipelines.get_tir_pipeline("s_tir")
        return tvm.transform.Sequential([default, dynamic_parallel_pass(threads)]), host, device

    if name not in pipelines.PIPELINE_MAP:
        pipelines.register_tir_pipeline(name, factory)
    return name
