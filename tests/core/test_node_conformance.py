"""ONNX's backend node tests through the default lossless pipeline: a fixed sample of 200 in
CI (tools/node_conformance.py runs all of them), and the two cases that used to fail."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
from helpers import REPO


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "node_conformance", REPO / "tools" / "node_conformance.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["node_conformance"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return _tool()


@pytest.fixture(scope="module")
def cases(tool: ModuleType) -> list:
    return tool.node_cases()


def test_a_sample_of_200_never_crashes_and_is_never_silently_wrong(
    tool: ModuleType, cases: list
) -> None:
    outcomes = [tool.run_case(case) for case in tool.sample(cases, 200)]
    bad = [
        f"{o.name}: {o.status}: {o.reason}" for o in outcomes if o.status in ("crashed", "wrong")
    ]
    assert not bad, bad
    assert all(o.reason for o in outcomes if o.status == "refused")  # every refusal says why
    assert sum(o.status == "ok" for o in outcomes) >= 150


@pytest.mark.parametrize("name", ["test_if_opt", "test_mvn"])
def test_former_failures_are_optimized(tool: ModuleType, cases: list, name: str) -> None:
    """test_if_opt failed export (an optional-typed If output, graphsurgeon's 'onnx_tensor');
    test_mvn failed after folding (onnx's own inference of the function's Constant)."""
    outcome = tool.run_case(next(c for c in cases if c.name == name))
    assert outcome.status == "ok", outcome.reason
