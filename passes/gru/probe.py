"""Numerical side of fuse-gru: recover a matched cell's GRU weights, then check the fusion.

The cell is cut out of the model into small ONNX graphs (inputs: x, h and, for the
candidate's pre-activation, the reset gate r; outputs: the gates' pre-activations, with
their Sigmoids turned into Identity, the Tanh's input, or the new state) and run on
onnxruntime over probe rows: zeros, the basis vectors of x and of h, and random rows. The
rows give the biases and the columns of W and R directly, whatever Split/Slice/Concat
layout or gate order the source used. The random rows check that the gates are affine
and decide ``linear_before_reset``: 1 when n = tanh(Wn x + bW + r*(Rn h + bR)), 0 when
n = tanh(Wn x + Rn (r*h) + b). Last, the cell and a one-step ONNX GRU with the recovered
weights run on the same random inputs: a fusion whose outputs differ is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxpress.core.verify import Runner

RANDOM_ROWS = 6
FIT_TOLERANCE = 1e-4  # relative to max(1, |pre-activation|): float32 probing noise is ~1e-6


@dataclass(frozen=True)
class CellSpec:
    """Tensor names of one matched cell in the exported model, and its sizes."""

    x: str
    h: str
    h_new: str
    z: str
    r: str
    n_pre: str  # input of the Tanh
    sigmoid_outputs: tuple[str, ...]
    input_size: int
    hidden: int
    z_keeps_state: bool
    batch: int | None  # static batch size of the cell, None when symbolic


@dataclass
class GruWeights:
    W: np.ndarray  # [1, 3H, I], gates in ONNX order z, r, h
    R: np.ndarray  # [1, 3H, H]
    B: np.ndarray  # [1, 6H]: Wb z r h, then Rb z r h
    linear_before_reset: int
    source_input_weights: dict[str, np.ndarray]  # gate -> [H, I] as the source wrote it


def submodel(
    model: onnx.ModelProto,
    inputs: dict[str, int],
    outputs: list[str],
    batch: int | None,
    identity_outputs: tuple[str, ...] = (),
) -> onnx.ModelProto:
    """The nodes computing ``outputs`` from ``inputs`` (name -> feature size) and constants."""
    producers = {out: node for node in model.graph.node for out in node.output if out}
    initializers = {t.name: t for t in model.graph.initializer}
    needed: set[int] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name in inputs:
            continue
        seen.add(name)
        if name in initializers:
            continue
        node = producers.get(name)
        if node is None:
            raise ValueError(f"the cell also reads '{name}'")
        if id(node) not in needed:
            needed.add(id(node))
            stack.extend(node.input)
    nodes = []
    for node in model.graph.node:
        if id(node) in needed:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            if node.op_type in ("Sigmoid", "Tanh") and node.output[0] in identity_outputs:
                copy.op_type = "Identity"
            nodes.append(copy)
    rows: int | str = batch if batch is not None else "rows"
    graph = helper.make_graph(
        nodes,
        "gru_cell_probe",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, d]) for n, d in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [t for name, t in initializers.items() if name in seen and name not in inputs],
    )
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    return sub


def run_rows(runner: Runner, feeds: dict[str, np.ndarray], batch: int | None) -> list[np.ndarray]:
    """Run row-wise feeds, in chunks of ``batch`` rows (padded) when the batch is static."""
    rows = len(next(iter(feeds.values())))
    if batch is None:
        return runner({k: v.astype(np.float32) for k, v in feeds.items()})
    chunks: list[list[np.ndarray]] = []
    for start in range(0, rows, batch):
        part = {k: v[start : start + batch].astype(np.float32) for k, v in feeds.items()}
        size = len(next(iter(part.values())))
        padded = {
            k: np.concatenate([v, np.repeat(v[-1:], batch - size, 0)]) for k, v in part.items()
        }
        chunks.append([out[:size] for out in runner(padded)])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def _probe_rows(spec: CellSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Rows: [zeros, r=0], [zeros, r=1], x = e_i, h = e_j, then random rows."""
    size_i, size_h = spec.input_size, spec.hidden
    count = 2 + size_i + size_h + RANDOM_ROWS
    x, h, r = np.zeros((count, size_i)), np.zeros((count, size_h)), np.ones((count, size_h))
    r[0] = 0
    x[2 : 2 + size_i] = np.eye(size_i)
    h[2 + size_i : 2 + size_i + size_h] = np.eye(size_h)
    x[-RANDOM_ROWS:] = rng.standard_normal((RANDOM_ROWS, size_i))
    h[-RANDOM_ROWS:] = rng.uniform(-1, 1, (RANDOM_ROWS, size_h))
    r[-RANDOM_ROWS:] = rng.uniform(0.05, 0.95, (RANDOM_ROWS, size_h))
    return {"x": x, "h": h, "r": r}


def _affine(pre: np.ndarray, size_i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W [H, I], R [H, H], bias [H]) from the probe rows of an affine pre-activation."""
    bias = pre[1]
    weight_x = (pre[2 : 2 + size_i] - bias).T
    weight_h = (pre[2 + size_i : len(pre) - RANDOM_ROWS] - bias).T
    return weight_x, weight_h, bias


def _misfit(pre: np.ndarray, predicted: np.ndarray) -> float:
    actual = pre[-RANDOM_ROWS:].astype(np.float64)
    return float(np.max(np.abs(actual - predicted)) / max(1.0, float(np.max(np.abs(actual)))))


def probe_weights(
    model: onnx.ModelProto, spec: CellSpec, seed: int, force_lbr: int | None = None
) -> GruWeights | str:
    """Recover the cell's GRU weights by probing it, or say why it is not a GRU."""
    rows = _probe_rows(spec, np.random.default_rng(seed))
    x, h, r = (rows[k][-RANDOM_ROWS:] for k in "xhr")
    sizes = {spec.x: spec.input_size, spec.h: spec.hidden}
    try:
        gates = Runner(submodel(model, sizes, [spec.z, spec.r], spec.batch, spec.sigmoid_outputs))
        cand = Runner(submodel(model, {**sizes, spec.r: spec.hidden}, [spec.n_pre], spec.batch))
        pre_z, pre_r = run_rows(gates, {spec.x: rows["x"], spec.h: rows["h"]}, spec.batch)
        (pre_n,) = run_rows(
            cand, {spec.x: rows["x"], spec.h: rows["h"], spec.r: rows["r"]}, spec.batch
        )
    except Exception as exc:
        return f"the cell cannot be run on its own: {str(exc).strip().splitlines()[0]}"
    if pre_z.shape[-1] != spec.hidden or pre_r.shape[-1] != spec.hidden:
        return f"gate width {pre_z.shape[-1]} is not the hidden size {spec.hidden}"
    fitted = {}
    for gate, pre in (("z", pre_z), ("r", pre_r)):
        w, u, b = _affine(pre.astype(np.float64), spec.input_size)
        if _misfit(pre, x @ w.T + h @ u.T + b) > FIT_TOLERANCE:
            return f"the {gate} gate's pre-activation is not affine in x and h"
        fitted[gate] = (w, u, b)
    pre_n = pre_n.astype(np.float64)
    w_n, u_n, b_sum = _affine(pre_n, spec.input_size)
    b_w = pre_n[0]
    misfits = {
        1: _misfit(pre_n, x @ w_n.T + b_w + r * (h @ u_n.T + b_sum - b_w)),
        0: _misfit(pre_n, x @ w_n.T + (r * h) @ u_n.T + b_sum),
    }
    lbr = force_lbr if force_lbr is not None else min(misfits, key=lambda k: (misfits[k], -k))
    if force_lbr is None and misfits[lbr] > FIT_TOLERANCE:
        return "the tanh's pre-activation matches neither linear_before_reset form"
    source = {"z": fitted["z"][0], "r": fitted["r"][0], "n": w_n}
    sign = 1.0 if spec.z_keeps_state else -1.0  # z*n + (1-z)*h: ONNX's z is 1 - z = σ(-a)
    w_z, u_z, b_z = (sign * a for a in fitted["z"])
    w_r, u_r, b_r = fitted["r"]
    zeros = np.zeros(spec.hidden)
    b_n = (b_w, b_sum - b_w) if lbr == 1 else (b_sum, zeros)
    return GruWeights(
        W=np.concatenate([w_z, w_r, w_n])[None].astype(np.float32),
        R=np.concatenate([u_z, u_r, u_n])[None].astype(np.float32),
        B=np.concatenate([b_z, b_r, b_n[0], zeros, zeros, b_n[1]])[None].astype(np.float32),
        linear_before_reset=lbr,
        source_input_weights=source,
    )


def gru_step_model(
    weights: GruWeights, input_size: int, hidden: int, batch: int | None
) -> onnx.ModelProto:
    """x [rows, I], h [rows, H] -> h' [rows, H] through one ONNX GRU step."""
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in ((weights.W, "W"), (weights.R, "R"), (weights.B, "B"))
    ] + [axes]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["X"]),
        helper.make_node("Unsqueeze", ["h", "axes"], ["H0"]),
        helper.make_node(
            "GRU",
            ["X", "W", "R", "B", "", "H0"],
            ["", "Y_h"],
            hidden_size=hidden,
            linear_before_reset=weights.linear_before_reset,
        ),
        helper.make_node("Squeeze", ["Y_h", "axes"], ["h_new"]),
    ]
    rows: int | str = batch if batch is not None else "rows"
    graph = helper.make_graph(
        nodes,
        "gru_step",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, input_size]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [rows, hidden]),
        ],
        [helper.make_tensor_value_info("h_new", TensorProto.FLOAT, [rows, hidden])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def random_steps(
    spec: CellSpec | Any, states: int, seed: int, zero_state: bool, rows: int = 16
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Self-check inputs: x ~ N(0, 2) and ``states`` tensors ~ U(-1, 1) (or zeros)."""
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((rows, spec.input_size)) * 2
    scale = 0.0 if zero_state else 1.0
    return x, [rng.uniform(-1, 1, (rows, spec.hidden)) * scale for _ in range(states)]


def max_difference(
    model: onnx.ModelProto,
    cell_feeds: dict[str, np.ndarray],
    outputs: list[str],
    op_model: onnx.ModelProto,
    op_feeds: dict[str, np.ndarray],
    batch: int | None,
) -> float:
    """Max |cell - op| over the outputs: the cell cut from ``model`` and the one-step op."""
    sizes = {name: int(value.shape[1]) for name, value in cell_feeds.items()}
    expected = run_rows(Runner(submodel(model, sizes, outputs, batch)), cell_feeds, batch)
    actual = run_rows(Runner(op_model), op_feeds, batch)
    if any(e.shape != a.shape for e, a in zip(expected, actual, strict=True)):
        return float("inf")
    return max(
        float(np.max(np.abs(e.astype(np.float64) - a)))
        for e, a in zip(expected, actual, strict=True)
    )


def self_check(
    model: onnx.ModelProto,
    spec: CellSpec,
    weights: GruWeights,
    seed: int,
    zero_state: bool = False,
) -> float:
    """Max |cell - GRU| of h' over random x ~ N(0, 2) and h ~ U(-1, 1) (or h = 0)."""
    x, (h,) = random_steps(spec, 1, seed, zero_state)
    gru = gru_step_model(weights, spec.input_size, spec.hidden, spec.batch)
    cell_feeds = {spec.x: x, spec.h: h}
    return max_difference(model, cell_feeds, [spec.h_new], gru, {"x": x, "h": h}, spec.batch)
