"""onnxpress's parallel launch (onnxpress.backends.tvm.thread_pool): linked into the CPU
libraries compile writes and installed by CompiledModel; every task runs exactly once (more
tasks than threads, static and dynamic splits), outputs bit-identical to TVM's own pool,
two threads sharing one library's pool, a forked child without the parent's workers (in a
process of its own), a worker woken on its caller's CPU leaving it, and a library without
the launch left on TVM's pool; skipped without TVM."""

from __future__ import annotations

import ctypes
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import REPO
from tvm_kernels import accumulate

tvm = pytest.importorskip("tvm")

from onnxpress.backends.tvm import thread_pool  # noqa: E402
from onnxpress.backends.tvm.backend import compile_model  # noqa: E402
from onnxpress.backends.tvm.build import export  # noqa: E402
from onnxpress.backends.tvm.dynamic_parallel import register  # noqa: E402
from onnxpress.backends.tvm.runtime import CompiledModel  # noqa: E402
from onnxpress.backends.tvm.targets import parse_target, tvm_target  # noqa: E402

HOST = parse_target("x86")
BATCH = 32  # large enough for parallel kernels


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pool")
    shapes = {"input": [BATCH, 1, 28, 28]}
    result: Any = compile_model(
        REPO / "models" / "cnn_mnist.onnx", HOST, folder, input_shapes=shapes
    )
    return Path(result.library)


def _inputs(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((BATCH, 1, 28, 28)).astype(np.float32)


def _tvm_pool(library: Path, folder: Path) -> Any:
    """The same library loaded by plain TVM from another path: TVM's own pool."""
    from tvm import relax

    copy = folder / "copy.so"
    shutil.copyfile(library, copy)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(copy)), tvm.cpu())
    return lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()


def test_libraries_carry_the_launch_and_match_tvm_s_pool(library: Path, tmp_path: Path) -> None:
    pooled = CompiledModel(library)
    assert pooled.pool  # installed: the library exports it, this is a CPU device
    manifest = json.loads((library.parent / "manifest.json").read_text())
    assert manifest["parallel"]["launch"] == "onnxpress"
    stock = _tvm_pool(library, tmp_path)
    for seed in range(10):
        x = _inputs(seed)
        np.testing.assert_array_equal(pooled(x)[0], stock(x))


@pytest.mark.parametrize("split", [0, 3])  # TVM's static split; a dynamic one for 3 tasks
def test_every_task_runs_exactly_once(split: int, tmp_path: Path) -> None:
    pipeline = register(split) if split else "default"
    executable = tvm.compile(accumulate(37, 5), target=tvm_target(HOST), tir_pipeline=pipeline)
    path = export(executable, HOST, tmp_path)
    module = tvm.runtime.load_module(str(path))
    assert thread_pool.install(path, 2)
    values = tvm.runtime.tensor(np.zeros((37, 5), np.int32))
    for _ in range(300):
        module["main"](values, values)  # in place: out = out + 1, once per iteration
    np.testing.assert_array_equal(values.numpy(), np.full((37, 5), 300, np.int32))


def test_two_threads_share_one_pool(library: Path) -> None:
    expected = CompiledModel(library)(_inputs(0))[0]
    errors: list[str] = []

    def calls() -> None:
        model = CompiledModel(library)  # the same loaded library: the same pool
        for _ in range(25):
            if not np.array_equal(model(_inputs(0))[0], expected):
                errors.append("differs")

    threads = [threading.Thread(target=calls) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


FORK_SCRIPT = """
import os, sys, numpy as np
from onnxpress.backends.tvm.runtime import CompiledModel
model = CompiledModel(sys.argv[1])
x = np.random.default_rng(1).standard_normal((%d, 1, 28, 28)).astype(np.float32)
expected = model(x)[0]  # the parent's workers are running now
pid = os.fork()
if pid == 0:
    os._exit(0 if np.array_equal(CompiledModel(sys.argv[1])(x)[0], expected) else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_runs_without_the_parent_s_workers(library: Path) -> None:
    # in a process of its own: forking pytest itself (with torch loaded) ended the run later
    script = FORK_SCRIPT % BATCH
    done = subprocess.run(
        [sys.executable, "-c", script, str(library)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


# A task in C: Python tasks take the GIL first, and the GIL's hand-over wakes the worker
# on the caller's CPU again before the task could read where it runs.
WAKE_TASK = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int task(int index, void* env, void* data) {
  long* out = (long*)data;
  struct timespec start, now;
  (void)env;
  out[2 * index] = syscall(SYS_gettid);
  out[2 * index + 1] = sched_getcpu();
  clock_gettime(CLOCK_MONOTONIC, &start);
  do clock_gettime(CLOCK_MONOTONIC, &now);
  while ((now.tv_sec - start.tv_sec) * 1000000000L + now.tv_nsec - start.tv_nsec < 2000000L);
  return 0;
}
"""

WAKE_SCRIPT = """
import ctypes, os, sys, threading, time
import tvm
tvm.runtime.load_module(sys.argv[1])
lib = ctypes.CDLL(sys.argv[1])
lib.onnxpress_pool_threads(2)
task = ctypes.CDLL(sys.argv[2]).task
TASKS = 8
runs = (ctypes.c_long * (2 * TASKS))()
launch = lib.onnxpress_parallel_launch
launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

def first_runs():
    assert launch(ctypes.cast(task, ctypes.c_void_p), ctypes.addressof(runs), TASKS) == 0
    first = {}
    for index in range(TASKS):  # tasks are claimed in index order
        first.setdefault(runs[2 * index], runs[2 * index + 1])
    return first

cpus = sorted(os.sched_getaffinity(0))
caller, cpu = threading.get_native_id(), cpus[0]
workers = set()
while not workers:  # a launch the worker takes part in: it exists and is awake
    workers = set(first_runs()) - {caller}
(worker,) = workers
os.sched_setaffinity(0, {cpu})  # the caller on one CPU
for _ in range(5):
    os.sched_setaffinity(worker, {cpu})  # still spinning: the worker moves to that CPU
    time.sleep(0.05)  # ... and falls asleep there, free to run anywhere again
    os.sched_setaffinity(worker, set(cpus))
    where = first_runs().get(worker)
    assert where is not None and where != cpu, (cpu, where)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_worker_woken_on_the_caller_s_cpu_leaves_it(library: Path, tmp_path: Path) -> None:
    """The worker falls asleep on the caller's CPU; each launch wakes it there, and its first
    task runs on another CPU (without the move it stayed there in 5 launches of 5, on the
    2-CPU VM this was written on)."""
    source = tmp_path / "task.c"
    source.write_text(WAKE_TASK)
    task = tmp_path / "task.so"
    compiler = [*shlex.split(os.environ.get("CXX", "g++")), "-x", "c", "-O2", "-shared", "-fPIC"]
    subprocess.run([*compiler, "-o", str(task), str(source)], check=True, timeout=120)
    done = subprocess.run(
        [sys.executable, "-c", WAKE_SCRIPT, str(library.resolve()), str(task)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_library_without_the_launch_keeps_tvm_s_pool() -> None:
    runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime.so"
    assert runtime.is_file()
    before = ctypes.CDLL(str(runtime))
    assert thread_pool.install(runtime, 2) is False
    assert not hasattr(before, thread_pool.LAUNCH)
