"""A parallel launch whose tasks the calling thread can take over: linked into every CPU
library for Linux that ``onnxpress compile`` writes, installed when onnxpress loads it.

A TVM kernel runs each parallel loop through ``TVMBackendParallelLaunch(f, data, n)``:
tasks ``0..n)`` of the loop body ``f``. TVM's own pool hands task i to worker i and the
caller waits until every worker has run its task, so a worker that is off its core (another
process, the hypervisor, onnxruntime's spinning threads) holds every kernel up until it is
scheduled again, however little work its task has left (dynamic_parallel.py moves the work
of a late task to the others, but not the wait). mobilenet_v2 at batch 1 took 2-8x
onnxruntime's time with a busy process on the second core (0.88-0.96x with this launch,
docs/BENCHMARKS.md run 13), and a call right after onnxruntime's, whose threads still
spun, took 3x its own time.

Here tasks are claimed, not assigned: the caller and the workers take task indices from
one counter (a compare-and-swap on ``epoch << 32 | next``, so a worker that wakes late can
only claim tasks of the launch that is current), and the caller waits only for the tasks
that were claimed and are still running. A worker that never woke costs nothing: the caller
runs its task, which with the dynamic split finds its chunks already done. Workers spin for
a while after a launch, then sleep on a futex. Linux tends to wake a sleeper on its
waker's CPU; a worker woken there moves itself to another CPU it may use (its affinity
narrowed, then restored), else the caller and the worker share one CPU, the caller spinning
on the worker's task, until the load balancer parts them: squeezenet1_1 called every 50 ms
took 14.4 ms, 2.3x its time called back to back (onnxruntime: 1.2x), 8.6 ms with the move
(docs/BENCHMARKS.md run 22). A nested launch (from inside a task) or one
from a second thread while the pool is busy runs its tasks in order on the calling thread.
Every task runs exactly once with the same ``num_task``: results are bit-identical to TVM's
pool.

The generated code calls the launch through the library's ``__TVMBackendParallelLaunch``
pointer, which TVM's loader sets to its own pool; ``install`` points it at
``onnxpress_parallel_launch`` (CompiledModel does, so ``onnxpress run``, the compile-time
check and the benchmarks use it). A library loaded with plain TVM keeps TVM's pool and is
otherwise the same.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

LAUNCH = "onnxpress_parallel_launch"
THREADS = "onnxpress_pool_threads"
TVM_POINTER = "__TVMBackendParallelLaunch"
SPINS = 1 << 16  # pause instructions a worker spins (~1 ms) before it sleeps

SOURCE = r"""
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct { void* sync_handle; int32_t num_task; } Env;
typedef int (*Lambda)(int task_id, Env* penv, void* cdata);

static Lambda job_fn;
static void* job_cdata;
static int job_tasks;
static uint64_t job_state; /* epoch << 32 | next task to claim */
static int job_done, job_failed;
static uint32_t epoch_word; /* the futex word: the current epoch */
static int sleepers, started, threads = 1, busy, caller_cpu = -1;
static __thread int in_task;

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static int claim(uint32_t epoch) {
  uint64_t s = __atomic_load_n(&job_state, __ATOMIC_ACQUIRE);
  for (;;) {
    if ((uint32_t)(s >> 32) != epoch || (int)(uint32_t)s >= job_tasks) return -1;
    if (__atomic_compare_exchange_n(&job_state, &s, s + 1, 0, __ATOMIC_ACQ_REL,
                                    __ATOMIC_ACQUIRE))
      return (int)(uint32_t)s;
  }
}

static void run(int task) {
  Env env = {0, job_tasks};
  in_task = 1;
  if (job_fn(task, &env, job_cdata) != 0) __atomic_store_n(&job_failed, 1, __ATOMIC_RELAXED);
  in_task = 0;
  __atomic_add_fetch(&job_done, 1, __ATOMIC_RELEASE);
}

/* A worker woken on the caller's CPU moves to another CPU it may use (see the docstring). */
static void leave_caller_cpu(void) {
  int cpu = __atomic_load_n(&caller_cpu, __ATOMIC_RELAXED);
  cpu_set_t allowed, others;
  if (cpu < 0 || sched_getcpu() != cpu || sched_getaffinity(0, sizeof allowed, &allowed)) return;
  others = allowed;
  CPU_CLR(cpu, &others);
  if (CPU_COUNT(&others) == 0 || sched_setaffinity(0, sizeof others, &others)) return;
  sched_setaffinity(0, sizeof allowed, &allowed);
}

static void* worker(void* unused) {
  (void)unused;
  uint32_t seen = __atomic_load_n(&epoch_word, __ATOMIC_ACQUIRE);
  for (;;) {
    uint32_t now = seen;
    for (int i = 0; i < SPINS && now == seen; ++i) {
      relax();
      now = __atomic_load_n(&epoch_word, __ATOMIC_ACQUIRE);
    }
    if (now == seen) {
      __atomic_add_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&epoch_word, __ATOMIC_SEQ_CST) == seen)
        syscall(SYS_futex, &epoch_word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
      __atomic_sub_fetch(&sleepers, 1, __ATOMIC_SEQ_CST);
      leave_caller_cpu();
      continue;
    }
    seen = now;
    int task;
    while ((task = claim(seen)) >= 0) run(task);
  }
  return NULL;
}

int onnxpress_pool_threads(int count) {
  if (count >= 1) threads = count;
  return threads;
}

int onnxpress_parallel_launch(Lambda fn, void* cdata, int num_task) {
  int tasks = num_task > 0 ? num_task : threads, idle = 0;
  if (tasks == 1 || threads <= 1 || in_task ||
      !__atomic_compare_exchange_n(&busy, &idle, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
    Env env = {0, tasks};
    for (int t = 0; t < tasks; ++t)
      if (fn(t, &env, cdata) != 0) return -1;
    return 0;
  }
  for (; started < threads - 1; ++started) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, worker, NULL) != 0) break;
    pthread_detach(thread);
  }
  job_fn = fn;
  job_cdata = cdata;
  job_tasks = tasks;
  __atomic_store_n(&job_done, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&job_failed, 0, __ATOMIC_RELAXED);
  uint32_t epoch = __atomic_load_n(&epoch_word, __ATOMIC_RELAXED) + 1;
  __atomic_store_n(&job_state, (uint64_t)epoch << 32, __ATOMIC_RELEASE);
  __atomic_store_n(&epoch_word, epoch, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sleepers, __ATOMIC_SEQ_CST) > 0) {
    __atomic_store_n(&caller_cpu, sched_getcpu(), __ATOMIC_RELAXED);
    syscall(SYS_futex, &epoch_word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
  }
  int task;
  while ((task = claim(epoch)) >= 0) run(task);
  while (__atomic_load_n(&job_done, __ATOMIC_ACQUIRE) < tasks) relax();
  int failed = __atomic_load_n(&job_failed, __ATOMIC_RELAXED);
  __atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
  return failed ? -1 : 0;
}
"""


def object_file(folder: Path, compiler: str | None = None) -> Path:
    """Compile the launch into ``folder``/thread_pool.o with ``compiler`` (the library's own
    linker: g++ unless TVM's ``CXX`` or a cross compiler says otherwise), as C."""
    source, obj = folder / "thread_pool.c", folder / "thread_pool.o"
    source.write_text(f"#define SPINS {SPINS}\n{SOURCE}", encoding="utf-8")
    # CXX may carry a launcher or flags ("ccache g++", "g++ -m64"), as TVM's cc reads it
    command = [*shlex.split(compiler or os.environ.get("CXX", "g++")), "-x", "c", "-O2"]
    command += ["-fPIC", "-c"]
    done = subprocess.run(
        [*command, str(source), "-o", str(obj)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        first = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(first[0] if first else f"{command[0]} failed")
    return obj


def install(library: str | os.PathLike[str], threads: int) -> bool:
    """Point the loaded ``library``'s parallel launches at its own pool of ``threads``
    threads; False (TVM's pool stays) for a library without it."""
    try:
        handle = ctypes.CDLL(os.path.abspath(library))  # the handle TVM's loader opened
        launch = getattr(handle, LAUNCH)
        pointer = ctypes.c_void_p.in_dll(handle, TVM_POINTER)
    except (OSError, AttributeError, ValueError):
        return False
    getattr(handle, THREADS)(ctypes.c_int(threads))
    pointer.value = ctypes.cast(launch, ctypes.c_void_p).value
    logger.debug("%s: parallel launches on onnxpress's pool (%d threads)", library, threads)
    return True
