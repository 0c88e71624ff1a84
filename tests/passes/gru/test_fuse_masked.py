"""fuse-gru and fuse-lstm over loops masked by sequence length (padded batches): the op's
sequence_lens input, forward, reverse and bidirectional, from torch exports (Where) and a
Keras-style loop (float mask arithmetic); refusals where the op cannot express the loop.

Numerics: unrolled and fused outputs on onnxruntime within 1e-5, with lengths 0..T and out
of range (negative, > T: the loop treats them as 0 and T, so does the clipped
sequence_lens); structure: the exact ops left and the op's sequence_lens input.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper
from rnn_cells import HID, IN, Net, keras_cell, keras_lstm_cell, make, step_inputs
from rnn_exports import masked_loop

import onnxpress
from onnxpress.core.verify import Runner

LENGTHS = ([4, 1, 0, 2, 3], [9, -2, 4, 1, 2], [0, 0, 0, 0, 0])


def fuse(model: onnx.ModelProto, passes: str) -> tuple[onnx.ModelProto, Any]:
    """Run ``passes`` (the default pipeline for ""); the fuse pass's result."""
    out, report = onnxpress.optimize(model, passes=passes or None)
    assert all(p.verification.value <= 1e-5 for p in report.passes)
    entries = [p for p in report.passes if p.name.startswith("fuse-")]
    return out, next((p for p in entries if p.result.details), entries[-1]).result


def same_on_lengths(
    model: onnx.ModelProto, out: onnx.ModelProto, batch_first: bool, batch: int = 5
) -> None:
    rng = np.random.default_rng(1)
    for lengths in (row[:batch] for row in LENGTHS):
        shape = (batch, 4, IN) if batch_first else (4, batch, IN)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(
            model.graph.input[-1].type.tensor_type.elem_type
        )
        feed = {"x": rng.standard_normal(shape).astype(np.float32)}
        feed[model.graph.input[-1].name] = np.array(lengths, dtype)
        for expected, actual in zip(Runner(model)(feed), Runner(out)(feed), strict=True):
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


def recurrent_node(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type == op]
    return node


BIDIRECTIONAL = ["Slice", "Slice", "Transpose", "Squeeze", "Squeeze", "Reshape"]


@pytest.mark.parametrize(
    ("kind", "direction", "after"),
    [
        ("gru", "forward", ["Transpose", "GRU", "Squeeze", "Squeeze", "Transpose", "Concat"]),
        ("gru", "reverse", ["GRU", "Squeeze", "Squeeze", "Concat"]),
        ("gru", "bidirectional", ["Transpose", "GRU", *BIDIRECTIONAL]),
        ("lstm", "forward", ["Transpose", "LSTM", "Squeeze", "Squeeze", "Transpose", "Concat"]),
        ("lstm", "reverse", ["LSTM", "Squeeze", "Squeeze", "Concat"]),
        ("lstm", "bidirectional", ["Transpose", "LSTM", *BIDIRECTIONAL]),
    ],
)
def test_torch_masked_loops_take_sequence_lens(kind: str, direction: str, after: list[str]) -> None:
    batch_first = direction != "reverse"
    model = masked_loop(kind, 4, direction, batch_first)
    out, result = fuse(model, f"fuse-{kind}")
    op = kind.upper()
    node = recurrent_node(out, op)
    producers = {o: n for n in out.graph.node for o in n.output}
    clip = producers[node.input[4]]
    assert clip.op_type == "Clip" and producers[clip.input[0]].input == ["lens"]
    assert result.counts["cells_fused"] == (8 if direction == "bidirectional" else 4)
    assert all(r["sequence_lens"] == "lens" for r in result.details)
    if direction == "bidirectional":
        assert result.counts["bidirectional"] == 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["direction"] == b"bidirectional"
    assert sorted(n.op_type for n in out.graph.node) == sorted(["Cast", "Clip", *after])
    same_on_lengths(model, out, batch_first)


def keras_masked(
    steps: int, outputs_zeroed: bool = True, h0: bool = False, lstm: bool = False
) -> onnx.ModelProto:
    """A Keras-style GRU loop (or LSTM loop with peepholes) over x [batch, T, I] with
    lengths ``n`` (int32): a float mask m_t = Cast(t < n), each state kept as
    m*s' + (1-m)*s, the output m*h' (or h' itself, unmasked)."""
    net = Net()
    if h0:
        state = ["h0"]
    else:
        batch = net.op("Shape", "x", start=0, end=1)
        zero = net.op("ConstantOfShape", net.op("Concat", batch, net.ints("hidden", [HID]), axis=0))
        state = [zero, zero] if lstm else [zero]
    outs = []
    for t, x_t in enumerate(step_inputs(net, steps, 1, "gather")):
        step = net.op("Constant", value=helper.make_tensor("t", onnx.TensorProto.INT32, [], [t]))
        mask = net.op("Less", step, "n")
        m = net.op("Cast", net.op("Unsqueeze", mask, net.ints("ax1", [1])), to=1)
        if lstm:
            new = list(keras_lstm_cell(net, x_t, (state[0], state[1]), peepholes=True))
        else:
            new = [keras_cell(net, x_t, state[0])]
        off = net.op("Sub", "one", m)
        state = [
            net.op("Add", net.op("Mul", m, n), net.op("Mul", off, s))
            for n, s in zip(new, state, strict=True)
        ]
        out = net.op("Mul", new[0], m) if outputs_zeroed else new[0]
        outs.append(net.op("Unsqueeze", out, net.ints("ax1", [1])))
    net.nodes.append(helper.make_node("Concat", outs, ["y"], axis=1, name="stack"))
    net.nodes.append(helper.make_node("Identity", [state[0]], ["h_last"], name="last"))
    inputs: dict[str, Any] = {"x": ["batch", steps, IN]}
    if h0:
        inputs["h0"] = ["batch", HID]
    return make(net, inputs, ["y", "h_last"], lengths="n")


@pytest.mark.parametrize("lstm", [False, True])
def test_keras_style_float_mask(lstm: bool) -> None:
    model = keras_masked(4, lstm=lstm)
    out, result = fuse(model, "fuse-lstm" if lstm else "fuse-gru")
    op = "LSTM" if lstm else "GRU"
    ops = ["Clip", "Transpose", op, "Squeeze", "Transpose", "Squeeze", "Identity"]
    assert sorted(n.op_type for n in out.graph.node) == sorted(ops)
    assert result.details[0]["sequence_lens"] == "n"
    assert result.details[0].get("peepholes", False) == lstm  # LSTM inputs up to P at 7
    same_on_lengths(model, out, True)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: keras_masked(3, outputs_zeroed=False), "past the length the h output"),
        (lambda: keras_masked(3, h0=True), "a masked loop from a given initial state"),
    ],
)
def test_masks_the_op_cannot_express_are_refused(build: Any, reason: str) -> None:
    model = build()
    out, result = fuse(model, "fuse-gru")
    assert "GRU" not in [n.op_type for n in out.graph.node]
    assert any(reason in r.reason for r in result.refusals)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_masked_bidirectional_loop_read_only_through_y(kind: str) -> None:
    """The final kept states are dead (only y is an output): the last steps keep nothing."""
    model = masked_loop(kind, 4, "bidirectional")
    del model.graph.output[1:]
    out, result = fuse(model, f"fuse-{kind}")
    assert sorted(n.op_type for n in out.graph.node) == sorted(
        ["Cast", "Clip", "Transpose", kind.upper(), "Transpose", "Reshape"]
    )
    assert result.counts["bidirectional"] == 1 and not result.refusals
    same_on_lengths(model, out, True)


@pytest.mark.parametrize(("kind", "direction"), [("gru", "forward"), ("lstm", "bidirectional")])
def test_static_batch_export_writes_each_zero_apart(kind: str, direction: str) -> None:
    """With a static batch torch writes step 0's zero state as several constants (h @ R is
    folded too): the kept state and the zeroed output are then the same expression."""
    model = masked_loop(kind, 4, direction, dynamic=False)
    out, result = fuse(model, "")  # the default pipeline
    ops = [n.op_type for n in out.graph.node]
    assert ops.count(kind.upper()) == 1 and len(ops) <= 10
    assert all(r["sequence_lens"] == "lens" and r["cell_count"] == 4 for r in result.details)
    same_on_lengths(model, out, True, batch=2)
