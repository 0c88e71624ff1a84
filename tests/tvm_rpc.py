"""A TVM RPC tracker and one RPC server on loopback, each a subprocess (tests only).

Used by the tuning tests and by ``search --measure rpc://``; needs tvm and tornado (the
tracker's event loop, a dev dependency).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

RPC_KEY = "onnxpress-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(  # own session: its popen workers go with it
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def loopback_rpc_device(tmp_path: Path) -> Iterator[tuple[object, Path]]:
    """A TVM RPC tracker and one server registered under RPC_KEY, both on 127.0.0.1."""
    if importlib.util.find_spec("tornado") is None:
        pytest.skip("the TVM RPC tracker needs tornado")
    from tvm import rpc

    port = free_port()
    server_log = tmp_path / "server.log"
    tracker = _start(
        [
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        tmp_path / "tracker.log",
    )
    server = _start(
        [
            "tvm.exec.rpc_server",
            "--host",
            "127.0.0.1",
            f"--tracker=127.0.0.1:{port}",
            "--key",
            RPC_KEY,
        ],
        server_log,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                queues = rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]
                if queues.get(RPC_KEY, {}).get("free"):
                    break
            except Exception:  # not up yet
                pass
            assert time.monotonic() < deadline, (tmp_path / "tracker.log").read_text()
            time.sleep(0.3)
        from onnxpress.backends.tvm.rpc import RpcSpec

        yield RpcSpec("127.0.0.1", port, RPC_KEY), server_log
    finally:
        for process in (server, tracker):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
