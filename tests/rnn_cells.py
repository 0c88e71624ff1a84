"""Recurrent cells written in primitive ONNX ops, built node by node, for the fusion tests.

``Net`` accumulates nodes and initializers; the cells are the GRU forms exporters write
(Keras, a hand-written decoder, TF1) and ``step_inputs`` slices x per time step the ways
exporters do (Gather, Split, Slice); ``make`` turns a Net into a checked model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

IN, HID = 3, 4  # input and hidden sizes of the hand-built cells


class Net:
    """Accumulates nodes and initializers; ``op`` returns the new tensor's name."""

    def __init__(self, seed: int = 0) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {"one": np.array(1.0, np.float32)}
        self.rng = np.random.default_rng(seed)
        self.state = ""  # a second layer's state, for cells that stack two layers

    def weight(self, name: str, *shape: int) -> str:
        self.inits[name] = (self.rng.standard_normal(shape) * 0.6).astype(np.float32)
        return name

    def ints(self, name: str, values: Any) -> str:
        self.inits[name] = np.asarray(values, np.int64)
        return name

    def op(self, op: str, *inputs: str, outputs: int = 1, **attrs: Any) -> Any:
        names = [f"t{len(self.nodes)}_{k}" for k in range(outputs)]
        self.nodes.append(
            helper.make_node(op, list(inputs), names, name=f"{op}{len(self.nodes)}", **attrs)
        )
        return names[0] if outputs == 1 else names

    def gate_slice(self, tensor: str, k: int) -> str:
        return self.op(
            "Slice",
            tensor,
            self.ints(f"s{k}", [k * HID]),
            self.ints(f"e{k}", [(k + 1) * HID]),
            self.ints("ax1", [1]),
        )


def update(net: Net, form: str, z: str, n: str, h: str) -> str:
    """h' in one of the algebraic forms; 'mirrored' uses z where GRU uses 1 - z."""
    if form == "expanded":  # n - z*n + z*h
        return net.op("Add", net.op("Sub", n, net.op("Mul", z, n)), net.op("Mul", z, h))
    one_minus_z = net.op("Sub", "one", z)
    if form == "keras":  # z*h + (1-z)*n
        return net.op("Add", net.op("Mul", z, h), net.op("Mul", one_minus_z, n))
    if form == "residual":  # h + (1-z)*(n-h)
        return net.op("Add", h, net.op("Mul", one_minus_z, net.op("Sub", n, h)))
    assert form == "mirrored"  # z*n + (1-z)*h
    return net.op("Add", net.op("Mul", z, n), net.op("Mul", one_minus_z, h))


def keras_cell(
    net: Net,
    x: str,
    h: str,
    reset_after: bool = True,
    form: str = "keras",
    tag: str = "",
    inputs: int = IN,
) -> str:
    """Keras GRU cell, gate order z, r, h; reset_after=False keeps separate recurrent kernels."""
    kernel = net.weight(f"kernel{tag}", inputs, 3 * HID)
    bias = net.weight(f"bias{tag}", 3 * HID)
    projected = net.op("Add", net.op("MatMul", x, kernel), bias)
    xz, xr, xh = (net.gate_slice(projected, k) for k in range(3))
    if reset_after:
        rec = net.op(
            "Add",
            net.op("MatMul", h, net.weight(f"rec{tag}", HID, 3 * HID)),
            net.weight(f"rbias{tag}", 3 * HID),
        )
        hz, hr, hh = (net.gate_slice(rec, k) for k in range(3))
    else:
        rec = net.op("MatMul", h, net.weight(f"rec_zr{tag}", HID, 2 * HID))
        hz, hr = (net.gate_slice(rec, k) for k in range(2))
    z = net.op("Sigmoid", net.op("Add", xz, hz))
    r = net.op("Sigmoid", net.op("Add", xr, hr))
    if reset_after:
        pre = net.op("Add", xh, net.op("Mul", r, hh))
    else:
        pre = net.op(
            "Add", xh, net.op("MatMul", net.op("Mul", r, h), net.weight(f"rec_h{tag}", HID, HID))
        )
    return update(net, form, z, net.op("Tanh", pre), h)


def handwritten_cell(net: Net, x: str, h: str) -> str:
    """A decoder's own cell: one Gemm per gate and operand, r first, h + (1-z)*(n-h)."""

    def project(name: str, operand: str, size: int) -> str:
        weight, bias = net.weight(f"W{name}", HID, size), net.weight(f"b{name}", HID)
        return net.op("Gemm", operand, weight, bias, transB=1)

    r = net.op("Sigmoid", net.op("Add", project("xr", x, IN), project("hr", h, HID)))
    z = net.op("Sigmoid", net.op("Add", project("hz", h, HID), project("xz", x, IN)))
    n = net.op("Tanh", net.op("Add", project("xn", x, IN), net.op("Mul", r, project("hn", h, HID))))
    return update(net, "residual", z, n, h)


def tf_cell(net: Net, x: str, h: str) -> str:
    """TF1 GRUCell: one Sigmoid over concat([x, h]) @ K, split into r, u; linear_before_reset=0."""
    gates = net.op(
        "Sigmoid",
        net.op(
            "Add",
            net.op(
                "MatMul",
                net.op("Concat", x, h, axis=1),
                net.weight("gate_kernel", IN + HID, 2 * HID),
            ),
            net.weight("gate_bias", 2 * HID),
        ),
    )
    r, u = net.op("Split", gates, net.ints("halves", [HID, HID]), outputs=2, axis=1)
    candidate = net.op(
        "MatMul",
        net.op("Concat", x, net.op("Mul", r, h), axis=1),
        net.weight("cand_kernel", IN + HID, HID),
    )
    c = net.op("Tanh", net.op("Add", candidate, net.weight("cand_bias", HID)))
    return update(net, "keras", u, c, h)


def step_inputs(net: Net, steps: int, axis: int, how: str, reverse: bool = False) -> list[str]:
    """x_t for every step (last first if ``reverse``): Gather(x, t), Squeeze(Split(x)[t]) or
    Squeeze(Slice(x, t:t+1))."""
    squeeze = net.ints("time_axis", [axis])
    order = list(reversed(range(steps))) if reverse else list(range(steps))
    if how == "gather":
        return [net.op("Gather", "x", net.ints(f"t{t}", t), axis=axis) for t in order]
    if how == "split":
        parts = net.op("Split", "x", net.ints("ones", [1] * steps), outputs=steps, axis=axis)
        return [net.op("Squeeze", parts[t], squeeze) for t in order]
    return [
        net.op(
            "Squeeze",
            net.op("Slice", "x", net.ints(f"t{t}", [t]), net.ints(f"t{t + 1}", [t + 1]), squeeze),
            squeeze,
        )
        for t in order
    ]


def cell_loop(
    net: Net,
    cell: Any,
    steps: int,
    axis: int,
    how: str,
    reverse: bool = False,
    h0: str | None = None,
    **kwargs: Any,
) -> tuple[str, str]:
    """T cells over x from h0 or zeros: (every h_t stacked in time order on ``axis``, h_T)."""
    h = h0 or ""
    if not h:
        batch = net.op("Shape", "x", start=1 - axis, end=2 - axis)
        h = net.op("ConstantOfShape", net.op("Concat", batch, net.ints("hidden", [HID]), axis=0))
    states = []
    for x_t in step_inputs(net, steps, axis, how, reverse):
        h = cell(net, x_t, h, **kwargs)
        states.append(net.op("Unsqueeze", h, net.ints("time_axis", [axis])))
    stacked = net.op("Concat", *(reversed(states) if reverse else states), axis=axis)
    return stacked, h


def loop(
    cell: Any,
    steps: int,
    batch_first: bool = True,
    how: str = "gather",
    reverse: bool = False,
    **kwargs: Any,
) -> onnx.ModelProto:
    """x -> T cells from a zero state; outputs every h_t stacked, and h_T."""
    net = Net()
    axis = 1 if batch_first else 0
    _, h = cell_loop(net, cell, steps, axis, how, reverse, **kwargs)
    net.nodes[-1].output[0] = "y"  # the stacking Concat
    net.nodes.append(helper.make_node("Identity", [h], ["h_last"], name="last"))
    x_shape = ["batch", steps, IN] if batch_first else [steps, "batch", IN]
    return make(net, {"x": x_shape}, ["y", "h_last"])


def bidirectional(
    cell: Any,
    steps: int,
    batch_first: bool,
    join: str,
    how: str = "gather",
    states: bool = False,
    **kwargs: Any,
) -> onnx.ModelProto:
    """A forward and a reverse loop of ``cell`` (own weights) over x, joined on features;
    from zeros, or from the graph inputs h0_f and h0_r with ``states``."""
    net = Net()
    axis = 1 if batch_first else 0
    h0 = ("h0_f", "h0_r") if states else (None, None)
    ahead, _ = cell_loop(net, cell, steps, axis, how, h0=h0[0], tag="f", **kwargs)
    back, _ = cell_loop(net, cell, steps, axis, how, reverse=True, h0=h0[1], tag="r", **kwargs)
    if join == "concat":
        net.nodes.append(helper.make_node("Concat", [ahead, back], ["y"], axis=-1, name="join"))
    else:
        net.nodes.append(helper.make_node("Add", [ahead, back], ["y"], name="join"))
    x_shape = ["batch", steps, IN] if batch_first else [steps, "batch", IN]
    inputs: dict[str, Any] = {"x": x_shape}
    if states:
        inputs |= {"h0_f": ["batch", HID], "h0_r": ["batch", HID]}
    return make(net, inputs, ["y"])


def make(
    net: Net, inputs: dict[str, Any], outputs: list[str], lengths: str = ""
) -> onnx.ModelProto:
    """A checked model; output types come from shape inference. ``lengths`` names an int32
    [batch] input, after the float ones."""
    values = [
        helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs.items()
    ]
    if lengths:
        values.append(helper.make_tensor_value_info(lengths, onnx.TensorProto.INT32, ["batch"]))
    graph = helper.make_graph(
        net.nodes,
        "cells",
        values,
        [],
        [numpy_helper.from_array(v, n) for n, v in net.inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    model.graph.output.extend(inferred[name] for name in outputs)
    onnx.checker.check_model(model, full_check=True)
    return model


def keras_lstm_cell(
    net: Net,
    x: str,
    state: tuple[str, str],
    tag: str = "",
    order: str = "ifgo",
    peepholes: bool = False,
    projection: int = 0,
) -> tuple[str, str]:
    """An LSTM cell, one kernel for x and one for h with its gates in ``order`` (Keras and
    torch: i, f, g, o; ONNX: i, o, f, g), optional peepholes (i, f read c; o reads c') and
    an optional projection of h (LSTMP). Returns (h', c')."""
    h, c = state
    width = projection or HID
    kernel = net.weight(f"lstm_kernel{tag}", IN, 4 * HID)
    recurrent = net.weight(f"lstm_rec{tag}", width, 4 * HID)
    bias = net.weight(f"lstm_bias{tag}", 4 * HID)
    pre = net.op(
        "Add", net.op("Add", net.op("MatMul", x, kernel), net.op("MatMul", h, recurrent)), bias
    )
    part = {g: net.gate_slice(pre, order.index(g)) for g in "ifgo"}
    if peepholes:
        for gate in "if":
            peep = net.op("Mul", net.weight(f"peep_{gate}{tag}", HID), c)
            part[gate] = net.op("Add", part[gate], peep)
    i, f = net.op("Sigmoid", part["i"]), net.op("Sigmoid", part["f"])
    g = net.op("Tanh", part["g"])
    c_new = net.op("Add", net.op("Mul", f, c), net.op("Mul", i, g))
    pre_o = part["o"]
    if peepholes:
        pre_o = net.op("Add", pre_o, net.op("Mul", net.weight(f"peep_o{tag}", HID), c_new))
    h_new = net.op("Mul", net.op("Sigmoid", pre_o), net.op("Tanh", c_new))
    if projection:
        h_new = net.op("MatMul", h_new, net.weight(f"proj{tag}", HID, projection))
    return h_new, c_new


def lstm_loop(
    net: Net, steps: int, axis: int, reverse: bool = False, how: str = "gather", **kwargs: Any
) -> tuple[str, str, str]:
    """T LSTM cells over x from zeros: (every h_t stacked in time order, h_T, c_T)."""
    batch = net.op("Shape", "x", start=1 - axis, end=2 - axis)
    zeros = [
        net.op("ConstantOfShape", net.op("Concat", batch, net.ints(f"width{w}", [w]), axis=0))
        for w in (kwargs.get("projection") or HID, HID)
    ]
    state = (zeros[0], zeros[1])
    states = []
    for x_t in step_inputs(net, steps, axis, how, reverse):
        state = keras_lstm_cell(net, x_t, state, **kwargs)
        states.append(net.op("Unsqueeze", state[0], net.ints("time_axis", [axis])))
    stacked = net.op("Concat", *(reversed(states) if reverse else states), axis=axis)
    return stacked, state[0], state[1]


def tf_lstm_cell(net: Net, x: str, state: tuple[str, str], tag: str = "") -> tuple[str, str]:
    """TF1 BasicLSTMCell: one kernel over concat([x, h]), split i, j, f, o, forget_bias 1,
    c' = c*σ(f + 1) + σ(i)*tanh(j), h' = tanh(c')*σ(o)."""
    h, c = state
    kernel = net.weight(f"tf_kernel{tag}", IN + HID, 4 * HID)
    pre = net.op(
        "Add",
        net.op("MatMul", net.op("Concat", x, h, axis=1), kernel),
        net.weight(f"tf_bias{tag}", 4 * HID),
    )
    i, j, f, o = net.op("Split", pre, net.ints("quarters", [HID] * 4), outputs=4, axis=1)
    forget = net.op("Sigmoid", net.op("Add", f, "one"))
    c_new = net.op(
        "Add", net.op("Mul", c, forget), net.op("Mul", net.op("Sigmoid", i), net.op("Tanh", j))
    )
    return net.op("Mul", net.op("Tanh", c_new), net.op("Sigmoid", o)), c_new
