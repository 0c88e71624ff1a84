"""torch recurrent modules exported by ``torch.onnx.export``, for the fuse-gru/fuse-lstm tests.

Each builder returns an ONNX model as torch writes it (TorchScript exporter, opset 17,
dynamic batch unless told otherwise): a GRUCell loop, a decoder step whose hand-written
cell splits its gates with ``chunk`` (Slice bounds read from Shape), bidirectional loops of
two GRUCells or LSTMCells joined by Concat or Add, and plain LSTMCell loops.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import onnx
import pytest

IN, HID = 3, 4


def export(
    module: Any,
    args: tuple[Any, ...],
    names: list[str],
    outputs: list[str],
    batch_axes: dict[str, int] | None,
    dynamo: bool = False,
) -> onnx.ModelProto:
    """``module`` exported with the given input/output names and symbolic batch axes."""
    torch = pytest.importorskip("torch")
    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            dims = {k: {v: torch.export.Dim("batch")} for k, v in (batch_axes or {}).items()}
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=names,
                dynamic_shapes=dims,
                output_names=outputs,
                verbose=False,
            )
            return program.model_proto
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=outputs,
            dynamic_axes={k: {v: "batch"} for k, v in batch_axes.items()} if batch_axes else None,
        )
    return onnx.load_from_string(buffer.getvalue())


def gru_cell_loop(
    steps: int, batch_first: bool, dynamo: bool, dynamic: bool = True
) -> onnx.ModelProto:
    """A GRUCell loop from zeros, returning every state stacked and the last one."""
    torch = pytest.importorskip("torch")

    class Loop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = torch.nn.GRUCell(IN, HID)

        def forward(self, x: Any) -> Any:
            h = torch.zeros(x.shape[0 if batch_first else 1], HID)
            outputs = []
            for t in range(steps):
                h = self.cell(x[:, t] if batch_first else x[t], h)
                outputs.append(h)
            return torch.stack(outputs, 1 if batch_first else 0), h

    torch.manual_seed(0)
    x = torch.randn(2, steps, IN) if batch_first else torch.randn(steps, 2, IN)
    axes = {"x": 0 if batch_first else 1} if dynamic else None
    return export(Loop(), (x,), ["x"], ["y", "h"], axes, dynamo)


def chunked_decoder_step(vocab: int = 11, embed: int = 6, hidden: int = 8) -> onnx.ModelProto:
    """One decoder step: Embedding -> a GRU cell written with ``chunk(3, 1)`` -> Linear."""
    torch = pytest.importorskip("torch")

    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ih = torch.nn.Linear(embed, 3 * hidden)
            self.hh = torch.nn.Linear(hidden, 3 * hidden)

        def forward(self, x: Any, h: Any) -> Any:
            x_r, x_z, x_n = self.ih(x).chunk(3, 1)
            h_r, h_z, h_n = self.hh(h).chunk(3, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            return n + z * (h - n)

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, embed)
            self.cell = Cell()
            self.out = torch.nn.Linear(hidden, vocab)

        def forward(self, token: Any, h: Any) -> Any:
            h = self.cell(self.embed(token), h)
            return self.out(h), h

    torch.manual_seed(0)
    args = (torch.zeros(2, dtype=torch.long), torch.zeros(2, hidden))
    return export(Step(), args, ["token", "h"], ["logits", "h_new"], {"token": 0, "h": 0})


def bidirectional_loop(
    kind: str,
    steps: int,
    batch_first: bool,
    join: str = "concat",
    hidden: int = HID,
    layers: int = 1,
) -> onnx.ModelProto:
    """Forward and reverse GRUCell/LSTMCell loops over x from zeros, joined on features;
    ``layers`` such pairs stacked (each reading the previous join)."""
    torch = pytest.importorskip("torch")
    cell_type = {"gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}[kind]
    width = 2 * hidden if join == "concat" else hidden

    class Loops(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            sizes = [IN] + [width] * (layers - 1)
            self.ahead = torch.nn.ModuleList(cell_type(size, hidden) for size in sizes)
            self.back = torch.nn.ModuleList(cell_type(size, hidden) for size in sizes)

        def run(self, cell: Any, x: Any, order: list[int]) -> Any:
            batch = x.shape[0 if batch_first else 1]
            zero = torch.zeros(batch, hidden)
            state = zero if kind == "gru" else (zero, zero)
            outputs = {}
            for t in order:
                state = cell(x[:, t] if batch_first else x[t], state)
                outputs[t] = state if kind == "gru" else state[0]
            return torch.stack([outputs[t] for t in range(steps)], 1 if batch_first else 0)

        def forward(self, x: Any) -> Any:
            for ahead_cell, back_cell in zip(self.ahead, self.back, strict=True):
                ahead = self.run(ahead_cell, x, list(range(steps)))
                back = self.run(back_cell, x, list(reversed(range(steps))))
                x = torch.cat([ahead, back], -1) if join == "concat" else ahead + back
            return x

    torch.manual_seed(0)
    x = torch.randn(2, steps, IN) if batch_first else torch.randn(steps, 2, IN)
    return export(Loops(), (x,), ["x"], ["y"], {"x": 0 if batch_first else 1})


def lstm_cell_loop(
    steps: int, batch_first: bool, reverse: bool = False, dynamic: bool = True
) -> onnx.ModelProto:
    """An LSTMCell loop from zeros, returning every h stacked and the last (h, c)."""
    torch = pytest.importorskip("torch")

    class Loop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = torch.nn.LSTMCell(IN, HID)

        def forward(self, x: Any) -> Any:
            zero = torch.zeros(x.shape[0 if batch_first else 1], HID)
            state, outputs = (zero, zero), {}
            order = reversed(range(steps)) if reverse else range(steps)
            for t in order:
                state = self.cell(x[:, t] if batch_first else x[t], state)
                outputs[t] = state[0]
            stacked = torch.stack([outputs[t] for t in range(steps)], 1 if batch_first else 0)
            return stacked, state[0], state[1]

    torch.manual_seed(0)
    x = torch.randn(2, steps, IN) if batch_first else torch.randn(steps, 2, IN)
    axes = {"x": 0 if batch_first else 1} if dynamic else None
    return export(Loop(), (x,), ["x"], ["y", "h", "c"], axes)


def masked_loop(
    kind: str, steps: int, direction: str, batch_first: bool = True, dynamic: bool = True
) -> onnx.ModelProto:
    """GRUCell/LSTMCell loops over a padded batch x with lengths ``lens`` (the usual export of
    packed sequences): past a row's length the state is kept and the output is zero. One
    loop forward or reverse, or both joined by Concat; outputs y and each final h."""
    torch = pytest.importorskip("torch")
    cell_type = {"gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}[kind]
    runs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]

    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cells = torch.nn.ModuleList(cell_type(IN, HID) for _ in runs)

        def run(self, cell: Any, x: Any, lens: Any, backwards: bool) -> tuple[Any, Any]:
            zero = torch.zeros(x.shape[0 if batch_first else 1], HID)
            state = (zero,) if kind == "gru" else (zero, zero)
            outputs = {}
            for t in reversed(range(steps)) if backwards else range(steps):
                new = cell(x[:, t] if batch_first else x[t], state[0] if kind == "gru" else state)
                new = (new,) if kind == "gru" else new
                keep = (t < lens).unsqueeze(1)
                state = tuple(torch.where(keep, n, s) for n, s in zip(new, state, strict=True))
                outputs[t] = torch.where(keep, new[0], torch.zeros_like(new[0]))
            stacked = torch.stack([outputs[t] for t in range(steps)], 1 if batch_first else 0)
            return stacked, state[0]

        def forward(self, x: Any, lens: Any) -> Any:
            done = [self.run(c, x, lens, b) for c, b in zip(self.cells, runs, strict=True)]
            return torch.cat([d[0] for d in done], -1), *(d[1] for d in done)

    torch.manual_seed(0)
    x = torch.randn(2, steps, IN) if batch_first else torch.randn(steps, 2, IN)
    finals = [f"h{k}" for k in range(len(runs))]
    axes = {"x": 0 if batch_first else 1, "lens": 0} if dynamic else None
    return export(Masked(), (x, torch.tensor([steps, 1])), ["x", "lens"], ["y", *finals], axes)
