"""Run ONNX's backend node test cases through the default lossless pipeline and count outcomes.

Each case of ``onnx.backend.test.case.node`` (1,884 with onnx 1.23) is a one-node model with
its own input data. A case is

  ok          optimized, and the optimized model gives the original's outputs on the case's
              own inputs (both on onnxruntime);
  skipped     onnxruntime cannot run the original model on the case's inputs;
  refused     onnxpress refused with a one-line reason (an OnnxpressError);
  crashed     anything else escaped (an onnxpress bug: the CLI would say "internal error");
  wrong       optimized, but the outputs differ: a silent corruption.

    python tools/node_conformance.py                # all cases, counts and reasons
    python tools/node_conformance.py --sample 200   # the fixed sample the CI test runs
    python tools/node_conformance.py -k gather -v   # cases whose name contains "gather"

Done means 0 crashed and 0 wrong; docs/BENCHMARKS.md records the counts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import logging
import random
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.api import optimize
from onnxpress.core.errors import OnnxpressError
from onnxpress.core.verify import Runner, compare_lossless, lossless_tolerance

STATUSES = ("ok", "skipped", "refused", "crashed", "wrong")
SAMPLE_SEED = 20240516


@dataclass
class Outcome:
    name: str
    status: str
    reason: str = ""


def node_cases() -> list[Any]:
    """Every node test case of the installed onnx, sorted by name (models built in memory)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        np_state = np.geterr()
        np.seterr(all="ignore")
        try:
            cases = collect_testcases(None)
        finally:
            np.seterr(**np_state)
    return sorted(cases, key=lambda case: case.name)


def sample(cases: list[Any], count: int, seed: int = SAMPLE_SEED) -> list[Any]:
    """A fixed sample of ``count`` cases (the same for a given onnx version)."""
    if count >= len(cases):
        return cases
    picked = random.Random(seed).sample(range(len(cases)), count)
    return [cases[i] for i in sorted(picked)]


def _feeds(case: Any, model: onnx.ModelProto) -> Iterator[dict[str, Any]]:
    initializers = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    for inputs, _ in case.data_sets:
        if len(inputs) != len(names):
            continue
        yield {n: _array(v) for n, v in zip(names, inputs, strict=True)}


def _array(value: Any) -> Any:
    """A case's input as onnxruntime takes it (sequences stay lists of arrays)."""
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return value if isinstance(value, list) else np.asarray(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def run_case(case: Any) -> Outcome:
    """Optimize one case with the default pipeline and judge it (see the module docstring)."""
    model: onnx.ModelProto = case.model
    try:
        feeds = list(_feeds(case, model))
        reference = Runner(model)
        expected = [reference(feed) for feed in feeds]
    except Exception as exc:
        return Outcome(case.name, "skipped", _first_line(exc))
    try:
        optimized, _ = optimize(model)
    except OnnxpressError as exc:
        return Outcome(case.name, "refused", _first_line(exc))
    except Exception as exc:
        return Outcome(case.name, "crashed", f"{type(exc).__name__}: {_first_line(exc)}")
    try:
        candidate = Runner(optimized)
        got = [candidate(feed) for feed in feeds]
    except Exception as exc:
        return Outcome(case.name, "wrong", f"the optimized model fails: {_first_line(exc)}")
    names = reference.output_names
    tolerance = max((lossless_tolerance(ref.dtype) for ref in (expected or [[]])[0]), default=0)
    cmp = compare_lossless(names, expected, got, tolerance)
    if not cmp.ok:
        return Outcome(case.name, "wrong", f"{cmp.metric} {cmp.value:.3g} on '{cmp.output}'")
    return Outcome(case.name, "ok")


def _reason_key(reason: str) -> str:
    """A reason with names and numbers blanked, to group similar refusals."""
    key = re.sub(r"'[^']*'", "'…'", reason)
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", key)[:140]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", type=int, help="run a fixed sample of N cases")
    parser.add_argument("-k", help="only cases whose name contains this text")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    cases = node_cases()
    if args.k:
        cases = [c for c in cases if args.k in c.name]
    if args.sample:
        cases = sample(cases, args.sample)
    started = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    reasons: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    examples: dict[tuple[str, str], str] = {}
    for case in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = run_case(case)
        counts[outcome.status] += 1
        if outcome.status != "ok":
            key = _reason_key(outcome.reason)
            reasons[outcome.status][key] += 1
            examples.setdefault((outcome.status, key), f"{outcome.name}: {outcome.reason}")
        if args.verbose or outcome.status in ("crashed", "wrong"):
            print(f"{outcome.status:8} {outcome.name}: {outcome.reason}", flush=True)
    seconds = time.perf_counter() - started
    print(
        f"{len(cases)} cases in {seconds:.0f}s: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
    )
    for status in ("refused", "skipped", "crashed", "wrong"):
        for key, n in reasons[status].most_common():
            print(f"  {status} x{n}: {examples[(status, key)]}")
    return 1 if counts["crashed"] or counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
