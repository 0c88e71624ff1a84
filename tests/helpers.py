"""Test helpers: small ONNX models built in a few lines, and a CLI runner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]


def make_mlp(seed: int = 0, hidden: int = 16) -> onnx.ModelProto:
    """x[batch,8] -> MatMul -> Add -> Relu -> Identity -> MatMul -> y[batch,4], with metadata."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, hidden)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, 4)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "unused"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("Identity", ["h2"], ["h3"], name="noop"),
        helper.make_node("MatMul", ["h3", "W2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.producer_name = "onnxpress-tests"
    model.doc_string = "a test MLP"
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    return model


def residual_chain(
    blocks: int,
    size: int,
    activation: str = "Relu",
    scale: float = 1.0,
    named: bool = True,
) -> onnx.ModelProto:
    """x -> [x = x + act(x·W_i)] * blocks -> y, a residual stream like a transformer's: nodes
    ``mm{i}``, ``{act}{i}`` (lower case), ``add{i}`` (unnamed when not ``named``), tensors
    ``m{i}``, ``a{i}``, ``r{i}``; weights ``W{i}`` drawn from N(0, scale²), seed 0."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    act = activation.lower()
    for i in range(blocks):
        weight = (rng.standard_normal((size, size)) * scale).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"W{i}"))
        nodes += [
            helper.make_node("MatMul", [current, f"W{i}"], [f"m{i}"], name=f"mm{i}" * named),
            helper.make_node(activation, [f"m{i}"], [f"a{i}"], name=f"{act}{i}" * named),
            helper.make_node("Add", [current, f"a{i}"], [f"r{i}"], name=f"add{i}" * named),
        ]
        current = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", size])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["n", size])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real ``onnxpress`` entry point in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "onnxpress.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}
