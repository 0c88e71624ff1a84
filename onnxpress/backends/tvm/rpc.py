"""How tuning candidates are built (in this process) and where they run: this process, or a
device behind a TVM RPC tracker.

  parse_rpc("host:port:key") -> RpcSpec            (``onnxpress compile --rpc``)
  check_tracker(spec)       -> one RpcError line when the tracker or its key is unusable
  in_process_builder(cc, folder) -> a MetaSchedule builder that compiles candidates here
  session_runner(spec)      -> a MetaSchedule runner that measures each built candidate in
                               this process when spec is None, else in a session requested
                               from the tracker under the key (one session per batch)
  time_library(path, spec, inputs, device) -> the compiled model's latency on that device

Building and measuring synchronously in this process avoids MetaSchedule's stock
LocalBuilder / runners, which fork workers that each import TVM again (its tensor
intrinsics alone take 30-80 s); both measuring paths use MetaSchedule's own argument
allocation and time_evaluator helpers.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import statistics
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxpress.core.errors import OnnxpressError

logger = logging.getLogger(__name__)

# Per candidate: 3 runs per repeat, repeats until 40 ms elapsed (MetaSchedule's default: 100).
EVALUATOR = {"number": 3, "repeat": 1, "min_repeat_ms": 40, "enable_cpu_cache_flush": False}
SESSION_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 5


class RpcError(OnnxpressError):
    """A bad ``--rpc`` spec, or a tracker / device that cannot be reached."""


@dataclass(frozen=True)
class RpcSpec:
    """A TVM RPC tracker address and the key its device servers registered under."""

    host: str
    port: int
    key: str

    def __post_init__(self) -> None:
        if not self.host or not self.key:
            raise RpcError(f"--rpc {self}: host and key must not be empty")
        if not 0 < self.port < 65536:
            raise RpcError(f"--rpc {self}: port {self.port} is not in 1..65535")

    def __str__(self) -> str:
        return f"{self.host}:{self.port}:{self.key}"

    def to_json(self) -> dict[str, Any]:
        return {"tracker": f"{self.host}:{self.port}", "key": self.key}


def parse_rpc(text: str) -> RpcSpec:
    """``tracker-host:port:key`` (e.g. ``127.0.0.1:9190:rasp4``) -> RpcSpec, or RpcError."""
    parts = text.strip().rsplit(":", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        raise RpcError(f"--rpc '{text}': expected TRACKER_HOST:PORT:KEY, e.g. 127.0.0.1:9190:rasp4")
    return RpcSpec(parts[0], int(parts[1]), parts[2])


def _tracker(spec: RpcSpec) -> Any:
    """A tracker session; a plain connect first, because TVM's own retries for a minute."""
    from tvm import rpc

    try:
        socket.create_connection((spec.host, spec.port), timeout=CONNECT_TIMEOUT_S).close()
        return rpc.connect_tracker(spec.host, spec.port)
    except Exception as exc:
        raise RpcError(f"cannot reach the RPC tracker at {spec.host}:{spec.port} ({exc})") from None


def _request(spec: RpcSpec) -> Any:
    tracker = _tracker(spec)
    try:
        return tracker.request(spec.key, priority=1, session_timeout=SESSION_TIMEOUT_S, max_retry=2)
    except Exception as exc:
        line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise RpcError(
            f"RPC session for key '{spec.key}' at {spec.host}:{spec.port}: {line}"
        ) from None


def check_tracker(spec: RpcSpec) -> None:
    """Fail before tuning starts when the tracker is unreachable or has no server for the
    key (a request for such a key would wait forever), then open and close one session."""
    try:
        queues = _tracker(spec).summary().get("queue_info", {})
    except RpcError:
        raise
    except Exception as exc:
        raise RpcError(
            f"the RPC tracker at {spec.host}:{spec.port} did not answer ({exc})"
        ) from None
    if spec.key not in queues:
        keys = ", ".join(sorted(queues)) or "none"
        raise RpcError(
            f"no RPC server is registered under key '{spec.key}' at "
            f"{spec.host}:{spec.port} (keys: {keys})"
        )
    session = _request(spec)
    del session


def _measure(session: Any, runner_input: Any, config: Any) -> list[float]:
    """Run-times of one built candidate: in this process when session is None, else on the
    session's device (uploaded under a unique name: a reused path would make dlopen return
    the library loaded before)."""
    import tvm
    from tvm.s_tir.meta_schedule.runner import rpc_runner, utils

    local_path = str(runner_input.artifact_path)
    args_info = [arg.as_json() for arg in runner_input.args_info]
    if session is None:
        device = tvm.device(str(runner_input.device_type), 0)
        module = tvm.runtime.load_module(local_path)
        fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")
        args = utils.alloc_argument_common(fill, device, args_info, 1)
        return list(utils.run_evaluator_common(module, device, config, args))
    device = session.device(str(runner_input.device_type), 0)
    remote_path = f"{uuid.uuid4().hex}.so"
    try:
        module = rpc_runner.default_upload_module(session, local_path, remote_path)
        args = rpc_runner.default_alloc_argument(session, device, args_info, 1)
        return list(rpc_runner.default_run_evaluator(session, module, device, config, args))
    finally:
        session.remove(remote_path)


def in_process_builder(cross_compiler: str | None, folder: Path) -> Any:
    """A MetaSchedule builder compiling candidates in this process into folder/candidate-N/."""
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds candidates in this process and exports each as a shared library."""

        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for build_input in build_inputs:
                self.count += 1
                # MetaSchedule's RemoveBuildArtifact deletes the artifact's whole folder.
                path = folder / f"candidate-{self.count}" / "kernel.so"
                try:
                    path.parent.mkdir()
                    # What MetaSchedule's default builder does, without forking a worker.
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(build_input.mod)
                    built = tvm.tirx.build(mod, target=build_input.target)
                    if cross_compiler:
                        built.export_library(str(path), cc=cross_compiler)
                    else:
                        built.export_library(str(path))
                    results.append(BuilderResult(str(path), None))
                except Exception as exc:  # a candidate that does not compile
                    results.append(BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


@functools.cache
def _runner_class() -> type:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import (
        EvaluatorConfig,
        PyRunner,
        PyRunnerFuture,
        RunnerResult,
    )

    @derived_object
    class Finished(PyRunnerFuture):
        """A measurement that already happened (candidates are measured synchronously)."""

        def __init__(self, result: Any) -> None:
            super().__init__()
            self._result = result

        def done(self) -> bool:
            return True

        def result(self) -> Any:
            return self._result

    @derived_object
    class SessionRunner(PyRunner):
        """Measures each batch of candidates in one session (local or from the tracker)."""

        def __init__(self, spec: RpcSpec | None, on_measured: Callable[[bool], None]) -> None:
            super().__init__()
            self.spec = spec
            self.on_measured = on_measured
            self.config = EvaluatorConfig(**EVALUATOR)

        def run(self, runner_inputs: list[Any]) -> list[Any]:
            futures: list[Any] = []
            session = None
            if self.spec is not None:
                try:
                    session = _request(self.spec)
                except RpcError as exc:
                    return [Finished(RunnerResult(None, str(exc))) for _ in runner_inputs]
            for index, runner_input in enumerate(runner_inputs):
                try:
                    costs = _measure(session, runner_input, self.config)
                    futures.append(Finished(RunnerResult(costs, None)))
                except Exception as exc:  # a candidate that fails to load or run
                    futures.append(Finished(RunnerResult(None, f"{type(exc).__name__}: {exc}")))
                self.on_measured(index == 0)
            return futures

    return SessionRunner


def session_runner(spec: RpcSpec | None, on_measured: Callable[[bool], None]) -> Any:
    """A MetaSchedule runner measuring in this process (spec None) or on the RPC device;
    ``on_measured(first_of_batch)`` is called after each candidate (one session per batch)."""
    return _runner_class()(spec, on_measured)


def time_kernels(
    library: str | os.PathLike[str],
    kernels: dict[str, list[Any]],
    spec: RpcSpec | None,
    device_type: str,
) -> dict[str, float]:
    """Mean seconds per call of named kernels of a compiled library (name -> MetaSchedule
    args-info JSON), timed like tuning candidates, here or on the RPC device. Kernels the
    library does not export by that name are left out."""
    import tvm

    path = os.fspath(library)
    if spec is None:
        session = None
        module = tvm.runtime.load_module(path)
        device = tvm.device(device_type, 0)
        fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")
    else:
        session = _request(spec)
        remote = f"{uuid.uuid4().hex}.so"
        session.upload(path, remote)
        module = session.load_module(remote)
        device = session.device(device_type, 0)
        fill = session.get_function("tvm.contrib.random.random_fill_for_measure")
    from tvm.s_tir.meta_schedule.runner import utils

    seconds: dict[str, float] = {}
    for name, args_info in kernels.items():
        try:
            args = utils.alloc_argument_common(fill, device, args_info, 1)[0]
            timer = module.time_evaluator(
                name, device, number=EVALUATOR["number"], min_repeat_ms=EVALUATOR["min_repeat_ms"]
            )
            seconds[name] = statistics.mean(float(t) for t in timer(*args).results)
        except Exception as exc:  # not exported under the task's name: no baseline
            logger.debug("no default time for kernel %s: %s", name, exc)
    if session is not None:
        session.remove(remote)
    return seconds


def time_library(
    library: str | os.PathLike[str],
    spec: RpcSpec | None,
    inputs: list[dict[str, Any]],
    device: str = "cpu",
    repeat: int = 5,
) -> dict[str, Any]:
    """Time a compiled model library's ``main`` on zeros shaped like ``inputs`` (manifest
    entries), in this process (spec None) or uploaded to the RPC device: median and all
    repeats, in milliseconds."""
    import tvm
    from tvm import relax

    path = os.fspath(library)
    session = None if spec is None else _request(spec)
    name = f"{uuid.uuid4().hex}.so"
    try:
        if session is None:
            module, dev = tvm.runtime.load_module(path), tvm.device(device, 0)
        else:
            session.upload(path, name)
            module, dev = session.load_module(name), session.device(device, 0)
        vm = relax.VirtualMachine(module, dev)
        args = [tvm.runtime.tensor(np.zeros(e["shape"], dtype=e["dtype"]), dev) for e in inputs]
        timer = vm.time_evaluator("main", dev, number=10, repeat=repeat, min_repeat_ms=50)
        runs_ms = [float(t) * 1e3 for t in timer(*args).results]
    except RpcError:
        raise
    except Exception as exc:
        where = f"over RPC ({spec})" if spec is not None else "here"
        raise RpcError(f"timing {os.path.basename(path)} {where} failed: {exc}") from None
    finally:
        if session is not None:
            try:
                session.remove(name)
            except Exception:  # the session may already be gone; nothing else to clean
                pass
    return {
        "rpc": spec.to_json() if spec is not None else None,
        "median_ms": statistics.median(runs_ms),
        "runs_ms": [round(t, 4) for t in runs_ms],
    }
