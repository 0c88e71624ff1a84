"""Torch handlers for the ONNX GRU and LSTM ops, every direction (for ``torch_convert``).

  GRU:  z, r = σ(x Wz,r + h Rz,r + b),  n = tanh(x Wn + bWn + r*(h Rn + bRn))  (lbr=1)
                                         or tanh(x Wn + (r*h) Rn + bWn + bRn)   (lbr=0)
        h = (1-z)*n + z*h
  LSTM: i, o, f = σ(x W + h R + b [+ P ⊙ c]),  g = tanh(x Wc + h Rc + bc)
        c = f*c + i*g,  h = o * tanh(c)           (o's peephole reads the new c)
Gate orders are ONNX's (GRU z, r, h; LSTM i, o, f, c). direction forward, reverse or
bidirectional (Y [T, D, B, H]), layout 0 or 1; initial states and peepholes optional.
sequence_lens L: past a row's length the state is kept and Y is zero (a reverse direction
starts at step L-1); as in onnxruntime, a row of length 0 ends with zero states. The
default activations only; clip and input_forget=1 raise.

Without sequence_lens and peepholes (and for GRU with linear_before_reset=1, torch's own
form), the op runs on torch's fused recurrent kernel (``torch.lstm`` / ``torch.gru``, its
gates reordered from ONNX's): forward and backward without a Python loop over time, which
is what makes distilling a BiLSTM recognizer take minutes instead of half an hour. The
step-by-step loop covers the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from onnxpress.train.torch_ops import Handler, NodeArgs, Tensor

State = tuple[Tensor, ...]
Step = Callable[[Tensor, State, int], State]  # (x_t, state, direction) -> new state


def _check(a: NodeArgs) -> None:
    for unsupported in ("activations", "activation_alpha", "activation_beta", "clip"):
        if unsupported in a.attrs:
            raise ValueError(f"{a.op_type}: attribute {unsupported} is not supported")
    if a.attrs.get("input_forget", 0):
        raise ValueError("LSTM: input_forget=1 is not supported")


def _directions(a: NodeArgs) -> list[bool]:
    """Per direction of the op, whether it runs backwards in time."""
    direction = a.attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    table = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}
    if direction not in table:
        raise ValueError(f"{a.op_type}: direction {direction!r} is not supported")
    return table[direction]


def _outputs(ys: list[Tensor], finals: list[State], layout: int) -> list[Tensor]:
    """Y [T, D, B, H] from each direction's steps, then each state's final value per
    direction; batch first for layout 1."""
    y = torch.stack(ys, 1)
    states = [torch.stack([f[k] for f in finals]) for k in range(len(finals[0]))]
    if layout:
        return [y.permute(2, 0, 1, 3), *(o.transpose(0, 1) for o in states)]
    return [y, *states]


def _run(a: NodeArgs, initial: list[Tensor | None], step: Step) -> list[Tensor]:
    """Run ``step`` over time for each direction; Y, then the final value of each state."""
    layout = int(a.attrs.get("layout", 0))
    x = a.x(0).transpose(0, 1) if layout else a.x(0)  # [T, B, I]
    hidden = a.x(2).shape[-1]
    lengths = a.opt(4)
    ys, finals = [], []
    for d, backwards in enumerate(_directions(a)):
        state = tuple(s[d] if s is not None else x.new_zeros(x.shape[1], hidden) for s in initial)
        steps: list[Tensor] = []
        times = range(x.shape[0] - 1, -1, -1) if backwards else range(x.shape[0])
        for t in times:
            new = step(x[t], state, d)
            if lengths is None:
                state = new
                steps.append(new[0])
                continue
            valid = (t < lengths).unsqueeze(1)
            state = tuple(torch.where(valid, n, s) for n, s in zip(new, state, strict=True))
            steps.append(torch.where(valid, new[0], torch.zeros_like(new[0])))
        if lengths is not None:
            started = (lengths > 0).unsqueeze(1)
            state = tuple(torch.where(started, s, torch.zeros_like(s)) for s in state)
        if backwards:
            steps.reverse()
        ys.append(torch.stack(steps) if steps else x.new_zeros(0, x.shape[1], hidden))
        finals.append(state)
    return _outputs(ys, finals, layout)


# torch's gate blocks in ONNX's order: LSTM i, f, g(c), o from ONNX i, o, f, c; GRU r, z, n
# from ONNX z, r, h
_TORCH_GATES = {"LSTM": (0, 2, 3, 1), "GRU": (1, 0, 2)}


def _fusable(a: NodeArgs) -> bool:
    if a.opt(4) is not None:  # sequence_lens
        return False
    if a.op_type == "LSTM":
        return a.opt(7) is None  # no peepholes
    return bool(a.attrs.get("linear_before_reset", 0))


def _fused(a: NodeArgs) -> list[Tensor]:
    """The op on torch.lstm / torch.gru: one call per direction (a reverse one on the input
    flipped in time), weights and biases with their gate blocks in torch's order."""
    layout = int(a.attrs.get("layout", 0))
    x = a.x(0).transpose(0, 1) if layout else a.x(0)  # [T, B, I]
    w, r = a.x(1), a.x(2)
    hidden = r.shape[-1]
    order = _TORCH_GATES[a.op_type]
    gates = len(order)
    b = _bias(a, gates)

    def blocks(t: Tensor) -> Tensor:
        return torch.cat([t[..., k * hidden : (k + 1) * hidden, :] for k in order], dim=-2)

    def bias_blocks(t: Tensor) -> Tensor:
        return torch.cat([t[..., k * hidden : (k + 1) * hidden] for k in order], dim=-1)

    initial = [a.opt(5), a.opt(6)] if a.op_type == "LSTM" else [a.opt(5)]
    ys: list[Tensor] = []
    finals: list[State] = []
    for d, backwards in enumerate(_directions(a)):
        params = [
            blocks(w[d]),
            blocks(r[d]),
            bias_blocks(b[d, : gates * hidden]),
            bias_blocks(b[d, gates * hidden :]),
        ]
        states = tuple(
            (s[d] if s is not None else x.new_zeros(x.shape[1], hidden)).unsqueeze(0)
            for s in initial
        )
        seq = torch.flip(x, (0,)) if backwards else x
        if a.op_type == "LSTM":
            y, h, c = torch.lstm(seq, states, params, True, 1, 0.0, False, False, False)
            final: State = (h[0], c[0])
        else:
            y, h = torch.gru(seq, states[0], params, True, 1, 0.0, False, False, False)
            final = (h[0],)
        ys.append(torch.flip(y, (0,)) if backwards else y)
        finals.append(final)
    return _outputs(ys, finals, layout)


def _bias(a: NodeArgs, gates: int) -> Tensor:
    r = a.x(2)
    bias = a.opt(3)
    return bias if bias is not None else r.new_zeros(r.shape[0], 2 * gates * r.shape[-1])


def _gru(a: NodeArgs) -> list[Tensor]:
    _check(a)
    if _fusable(a):
        return _fused(a)
    w, r, b = a.x(1), a.x(2), _bias(a, 3)
    hidden = r.shape[-1]
    before_reset = bool(a.attrs.get("linear_before_reset", 0))

    def step(x: Tensor, state: State, d: int) -> State:
        (h,) = state
        xz, xr, xn = torch.split(x @ w[d].t() + b[d, : 3 * hidden], hidden, dim=-1)
        rz, rr, rn = torch.split(r[d], hidden, dim=0)
        bz, br, bn = torch.split(b[d, 3 * hidden :], hidden)
        z = torch.sigmoid(xz + h @ rz.t() + bz)
        reset = torch.sigmoid(xr + h @ rr.t() + br)
        if before_reset:
            n = torch.tanh(xn + reset * (h @ rn.t() + bn))
        else:
            n = torch.tanh(xn + (reset * h) @ rn.t() + bn)
        return ((1 - z) * n + z * h,)

    return _run(a, [a.opt(5)], step)


def _lstm(a: NodeArgs) -> list[Tensor]:
    _check(a)
    if _fusable(a):
        return _fused(a)
    w, r, b, p = a.x(1), a.x(2), _bias(a, 4), a.opt(7)
    hidden = r.shape[-1]

    def step(x: Tensor, state: State, d: int) -> State:
        h, c = state
        gates = x @ w[d].t() + h @ r[d].t() + b[d, : 4 * hidden] + b[d, 4 * hidden :]
        i, o, f, g = torch.split(gates, hidden, dim=-1)
        if p is not None:
            p_i, p_o, p_f = torch.split(p[d], hidden)
            i, f = i + p_i * c, f + p_f * c
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if p is not None:
            o = o + p_o * c
        return torch.sigmoid(o) * torch.tanh(c), c

    return _run(a, [a.opt(5), a.opt(6)], step)


HANDLERS: dict[str, Handler] = {"GRU": _gru, "LSTM": _lstm}
