"""Numerical side of fuse-lstm: recover a matched cell's LSTM weights, then check the fusion.

The cell is cut out of the model (probe.submodel) with inputs x, h, c and c', and outputs
the four gates with their activations turned into Identity, i.e. the pre-activations; it
runs on onnxruntime over probe rows: zeros, one row with c = c' = 1, the basis vectors of
x and of h, and random rows. The rows give each gate's bias, the columns of W and R and
the peephole weights (i, f read c; o reads c'); the random rows check that every
pre-activation is affine in x, h and its peephole state, and that the candidate g has no
peephole. Last, the cell (h', c' from x, h, c) and a one-step ONNX LSTM with the recovered
weights run on the same random inputs: a fusion whose outputs differ is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxpress.passes.gru.probe import (
    FIT_TOLERANCE,
    RANDOM_ROWS,
    max_difference,
    random_steps,
    run_rows,
    submodel,
)

from onnxpress.core.verify import Runner

ONNX_ORDER = ("i", "o", "f", "g")  # ONNX's i, o, f, c; g is the candidate c
PEEPHOLE_STATE = {"i": "c", "f": "c", "o": "c_new"}


@dataclass(frozen=True)
class LstmSpec:
    """Tensor names of one matched cell in the exported model, and its sizes."""

    x: str
    h: str
    c: str
    h_new: str
    c_new: str
    gates: dict[str, str]  # i, f, g, o -> the gate tensor as the cell uses it
    activation_outputs: tuple[str, ...]  # outputs of the gates' Sigmoid/Tanh nodes
    input_size: int
    hidden: int
    batch: int | None


@dataclass
class LstmWeights:
    W: np.ndarray  # [1, 4H, I], gates in ONNX order i, o, f, c
    R: np.ndarray  # [1, 4H, H]
    B: np.ndarray  # [1, 8H]: the bias in Wb, Rb zeros
    P: np.ndarray | None  # [1, 3H] peepholes i, o, f; None when all are zero
    source_input_weights: dict[str, np.ndarray]  # gate -> [H, I] as the source wrote it


def _rows(spec: LstmSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    size_i, size_h = spec.input_size, spec.hidden
    count = 2 + size_i + size_h + RANDOM_ROWS
    rows = {k: np.zeros((count, size_h)) for k in ("h", "c", "c_new")}
    rows["x"] = np.zeros((count, size_i))
    rows["c"][1] = rows["c_new"][1] = 1.0
    rows["x"][2 : 2 + size_i] = np.eye(size_i)
    rows["h"][2 + size_i : 2 + size_i + size_h] = np.eye(size_h)
    rows["x"][-RANDOM_ROWS:] = rng.standard_normal((RANDOM_ROWS, size_i))
    for k in ("h", "c", "c_new"):
        rows[k][-RANDOM_ROWS:] = rng.uniform(-1, 1, (RANDOM_ROWS, size_h))
    return rows


def probe_lstm(model: onnx.ModelProto, spec: LstmSpec, seed: int) -> LstmWeights | str:
    """Recover the cell's LSTM weights by probing it, or say why it is not an LSTM."""
    rows = _rows(spec, np.random.default_rng(seed))
    names = {"x": spec.x, "h": spec.h, "c": spec.c, "c_new": spec.c_new}
    sizes = {spec.x: spec.input_size, spec.h: spec.hidden, spec.c: spec.hidden}
    sizes[spec.c_new] = spec.hidden
    gates = [spec.gates[g] for g in ONNX_ORDER]
    try:
        cut = submodel(model, sizes, gates, spec.batch, spec.activation_outputs)
        feeds = {names[k]: v for k, v in rows.items() if names[k] in sizes}
        outputs = run_rows(Runner(cut), feeds, spec.batch)
    except Exception as exc:
        return f"the cell cannot be run on its own: {str(exc).strip().splitlines()[0]}"
    size_i, fitted = spec.input_size, {}
    for gate, pre in zip(ONNX_ORDER, outputs, strict=True):
        pre = pre.astype(np.float64)
        if pre.shape[-1] != spec.hidden:
            return f"gate {gate} has width {pre.shape[-1]}, not the hidden size {spec.hidden}"
        bias = pre[0]
        peephole = pre[1] - bias
        w = (pre[2 : 2 + size_i] - bias).T
        u = (pre[2 + size_i : len(pre) - RANDOM_ROWS] - bias).T
        state = rows[PEEPHOLE_STATE.get(gate, "c")][-RANDOM_ROWS:]
        if gate == "g" and np.max(np.abs(peephole)) > FIT_TOLERANCE:
            return "the candidate g reads the cell state (not an LSTM)"
        predicted = rows["x"][-RANDOM_ROWS:] @ w.T + rows["h"][-RANDOM_ROWS:] @ u.T + bias
        predicted = predicted + peephole * state
        actual = pre[-RANDOM_ROWS:]
        if np.max(np.abs(actual - predicted)) / max(1.0, float(np.max(np.abs(actual)))) > (
            FIT_TOLERANCE
        ):
            return f"the {gate} gate's pre-activation is not affine in x, h and its peephole"
        fitted[gate] = (w, u, bias, peephole)
    stack = [fitted[g] for g in ONNX_ORDER]
    peepholes = np.concatenate([fitted[g][3] for g in ("i", "o", "f")])
    has_peepholes = np.max(np.abs(peepholes)) > FIT_TOLERANCE
    return LstmWeights(
        W=np.concatenate([s[0] for s in stack])[None].astype(np.float32),
        R=np.concatenate([s[1] for s in stack])[None].astype(np.float32),
        B=np.concatenate([*(s[2] for s in stack), np.zeros(4 * spec.hidden)])[None].astype(
            np.float32
        ),
        P=peepholes[None].astype(np.float32) if has_peepholes else None,
        source_input_weights={g: fitted[g][0] for g in ("i", "f", "g", "o")},
    )


def lstm_step_model(
    weights: LstmWeights, input_size: int, hidden: int, batch: int | None
) -> onnx.ModelProto:
    """x [rows, I], h, c [rows, H] -> h', c' [rows, H] through one ONNX LSTM step."""
    arrays = {"W": weights.W, "R": weights.R, "B": weights.B, "axes": np.array([0], np.int64)}
    if weights.P is not None:
        arrays["P"] = weights.P
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axes"], ["X"]),
        helper.make_node("Unsqueeze", ["h", "axes"], ["H0"]),
        helper.make_node("Unsqueeze", ["c", "axes"], ["C0"]),
        helper.make_node(
            "LSTM",
            ["X", "W", "R", "B", "", "H0", "C0", "P" if weights.P is not None else ""],
            ["", "Y_h", "Y_c"],
            hidden_size=hidden,
        ),
        helper.make_node("Squeeze", ["Y_h", "axes"], ["h_new"]),
        helper.make_node("Squeeze", ["Y_c", "axes"], ["c_new"]),
    ]
    rows: int | str = batch if batch is not None else "rows"
    graph = helper.make_graph(
        nodes,
        "lstm_step",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, input_size]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [rows, hidden]),
            helper.make_tensor_value_info("c", TensorProto.FLOAT, [rows, hidden]),
        ],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, hidden])
            for n in ("h_new", "c_new")
        ],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def lstm_self_check(
    model: onnx.ModelProto,
    spec: LstmSpec,
    weights: LstmWeights,
    seed: int,
    zero_state: bool = False,
) -> float:
    """Max |cell - LSTM| of h' and c' over random x ~ N(0, 2) and h, c ~ U(-1, 1) (or 0)."""
    x, (h, c) = random_steps(spec, 2, seed, zero_state)
    lstm = lstm_step_model(weights, spec.input_size, spec.hidden, spec.batch)
    cell_feeds = {spec.x: x, spec.h: h, spec.c: c}
    outputs = [spec.h_new, spec.c_new]
    return max_difference(model, cell_feeds, outputs, lstm, {"x": x, "h": h, "c": c}, spec.batch)
