"""Interleaved timing for the tools/bench_* scripts: every runner is sampled once per round,
the order reversed every other round, so that a noisy machine slows all runners alike;
the median per runner is reported (ratios are then taken within one run). Samples are
SETTLE_S apart: a runtime's idle threads spin for a while after its last call (onnxruntime's
intra-op threads by default, TVM's own pool for longer), and without the gap they took the
cores from the runner sampled next (mobilenet_v2 and the LSTM at batch 8 read 1.24 and 1.28
times onnxruntime's time right after an onnxruntime sample, 1.03 and 1.07 after a 0.1 s
gap, docs/BENCHMARKS.md run 14). ``busy_core`` keeps one CPU busy meanwhile, as another
process on a shared device would."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import onnx
import onnxruntime as ort

SAMPLE_S = 0.2
SETTLE_S = 0.1  # idle between two samples: the previous runner's spinning threads park


def session(model: onnx.ModelProto, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session on ``threads`` intra-op threads, warnings silenced."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def sample(run: Callable[[], Any], seconds: float = SAMPLE_S, calls: int | None = None) -> float:
    """Seconds per call of ``run``: one warm-up call, then ``calls`` calls or, without it, as
    many calls as fit ``seconds``."""
    run()
    done, start = 0, time.perf_counter()
    while (done < calls) if calls else (time.perf_counter() - start < seconds):
        run()
        done += 1
    return (time.perf_counter() - start) / max(done, 1)


def interleaved_ms(
    runners: Mapping[str, Callable[[], Any]], rounds: int, calls: int | None = None
) -> dict[str, float]:
    """Median milliseconds per call of each runner over ``rounds`` interleaved rounds (each
    sample ``calls`` calls, or ~SAMPLE_S seconds, each SETTLE_S after the one before)."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(rounds):
        order = list(runners) if index % 2 == 0 else list(reversed(list(runners)))
        for name in order:
            time.sleep(SETTLE_S)
            samples[name].append(sample(runners[name], calls=calls))
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


@contextlib.contextmanager
def busy_core() -> Iterator[int]:
    """Run a spinning Python process pinned to the last CPU this process may use, for the
    duration of the block; yields that CPU."""
    cpu = max(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(spinner.pid, {cpu})
        yield cpu
    finally:
        spinner.kill()
        spinner.wait()
