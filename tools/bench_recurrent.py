"""Recurrent fusion benchmark: torch cell loops before and after onnxpress's default pipeline.

Models, all exported by ``torch.onnx.export(..., dynamo=False)`` (opset 17) with a dynamic
batch, all from zero states, random weights (seed 0):
  * decoder-step: one step of a decoder whose hand-written GRU cell splits its gates with
    ``chunk(3, 1)`` (Embedding -> cell -> Linear), the export ``fold-constants`` must fold
    partly symbolic shapes for; timed at batch 1 and 8;
  * bi-gru / bi-lstm: a forward ``GRUCell``/``LSTMCell`` loop and a reverse one over the same
    batch-first input, each stacked and joined with ``cat(..., -1)``;
  * keras-bi-gru: the same written Keras-style (one kernel per operand, gate order z, r, h,
    ``reset_after``, ``z*h + (1-z)*n``, the reverse layer reading x backwards and its outputs
    flipped back); keras-bi-lstm: a Keras-style LSTM cell (kernels [in, 4H] and [H, 4H],
    gate order i, f, c, o split by ``chunk``);
  * masked-bi-gru / masked-bi-lstm: bi-gru / bi-lstm over a padded batch with lengths
    ``lens`` (int64 input): past a row's length the state is kept (``where``) and the output
    zeroed, which fuses into the op's sequence_lens; timed on random lengths in [1, T].
For each: nodes before/after, the recurrent ops left, the max abs error of the optimized
model against the original on onnxruntime over all outputs (one random batch), and the
latency of both, measured side by side (``bench_gru_fusion.paired_ms``: one call each,
alternating, the order flipping every pair; medians and the median per-pair ratio).

    python tools/bench_recurrent.py --steps 20,50 --hidden 64,128 --pairs 300
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from _timing import session
from bench_gru_fusion import paired_ms

import onnxpress

BATCH, INPUT_SIZE, VOCAB, EMBED = 8, 32, 100, 64


def export(module: torch.nn.Module, args: tuple[Any, ...], names: list[str]) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(
            module.eval(),
            args,
            path,
            dynamo=False,
            opset_version=17,
            input_names=names,
            dynamic_axes={name: {0: "batch"} for name in names},
        )
        return onnx.load(path)


class ChunkedGruCell(torch.nn.Module):
    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.ih, self.hh = torch.nn.Linear(inputs, 3 * hidden), torch.nn.Linear(hidden, 3 * hidden)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x_r, x_z, x_n = self.ih(x).chunk(3, 1)
        h_r, h_z, h_n = self.hh(h).chunk(3, 1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return n + z * (h - n)


class DecoderStep(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, EMBED)
        self.cell = ChunkedGruCell(EMBED, hidden)
        self.out = torch.nn.Linear(hidden, VOCAB)

    def forward(self, token: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.cell(self.embed(token), h)
        return torch.log_softmax(self.out(h), -1), h


MODELS = {
    "bi-gru": "gru",
    "bi-lstm": "lstm",
    "keras-bi-gru": "keras",
    "keras-bi-lstm": "keras-lstm",
}


class KerasGruCell(torch.nn.Module):
    """Keras GRU(reset_after=True) arithmetic: kernels [in, 3H], gate order z, r, h."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.randn(inputs, 3 * hidden) * 0.2)
        self.recurrent = torch.nn.Parameter(torch.randn(hidden, 3 * hidden) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(2, 3 * hidden) * 0.1)
        self.hidden = hidden

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        size = self.hidden
        xs = x @ self.kernel + self.bias[0]
        hs = h @ self.recurrent + self.bias[1]
        z = torch.sigmoid(xs[:, :size] + hs[:, :size])
        r = torch.sigmoid(xs[:, size : 2 * size] + hs[:, size : 2 * size])
        n = torch.tanh(xs[:, 2 * size :] + r * hs[:, 2 * size :])
        return z * h + (1 - z) * n


class KerasLstmCell(torch.nn.Module):
    """Keras LSTM arithmetic: kernels [in, 4H] and [H, 4H], one bias, gate order i, f, c, o."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.randn(inputs, 4 * hidden) * 0.2)
        self.recurrent = torch.nn.Parameter(torch.randn(hidden, 4 * hidden) * 0.2)
        self.bias = torch.nn.Parameter(torch.randn(4 * hidden) * 0.1)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        z = x @ self.kernel + h @ self.recurrent + self.bias
        i, f, g, o = z.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


CELLS = {
    "gru": torch.nn.GRUCell,
    "lstm": torch.nn.LSTMCell,
    "keras": KerasGruCell,
    "keras-lstm": KerasLstmCell,
}


class BidirectionalLoops(torch.nn.Module):
    """Forward and reverse cell loops joined on features; with ``masked``, over a padded
    batch with lengths: past a row's length the state is kept and the output is zero."""

    def __init__(self, kind: str, steps: int, hidden: int, masked: bool = False) -> None:
        super().__init__()
        make = CELLS[kind]
        self.ahead, self.back = make(INPUT_SIZE, hidden), make(INPUT_SIZE, hidden)
        self.pairs = kind in ("lstm", "keras-lstm")  # the state is (h, c)
        self.steps, self.hidden, self.masked = steps, hidden, masked

    def run(
        self, cell: torch.nn.Module, x: torch.Tensor, order: list[int], lens: torch.Tensor | None
    ) -> torch.Tensor:
        zero = torch.zeros(x.shape[0], self.hidden)
        state: Any = (zero, zero) if self.pairs else zero
        outputs = {}
        for t in order:
            new = cell(x[:, t], state)
            out = new[0] if self.pairs else new
            if lens is not None:
                keep = (t < lens).unsqueeze(1)
                if self.pairs:
                    new = tuple(torch.where(keep, n, s) for n, s in zip(new, state, strict=True))
                else:
                    new = torch.where(keep, new, state)
                out = torch.where(keep, out, torch.zeros_like(out))
            state, outputs[t] = new, out
        return torch.stack([outputs[t] for t in range(self.steps)], 1)

    def forward(self, x: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
        order = list(range(self.steps))
        ahead = self.run(self.ahead, x, order, lens)
        return torch.cat([ahead, self.run(self.back, x, order[::-1], lens)], -1)


def build(
    kind: str, steps: int, hidden: int
) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """The exported model and the feeds it is timed on."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    if kind == "decoder-step":
        args = (torch.zeros(2, dtype=torch.long), torch.zeros(2, hidden))
        model = export(DecoderStep(hidden), args, ["token", "h"])
        feeds: list[dict[str, np.ndarray]] = [
            {
                "token": rng.integers(0, VOCAB, batch),
                "h": rng.uniform(-1, 1, (batch, hidden)).astype(np.float32),
            }
            for batch in (1, BATCH)
        ]
        return model, feeds
    masked = kind.startswith("masked-")
    cell = MODELS[kind.removeprefix("masked-")]
    module = BidirectionalLoops(cell, steps, hidden, masked)
    x = rng.standard_normal((BATCH, steps, INPUT_SIZE)).astype(np.float32)
    if not masked:
        return export(module, (torch.randn(2, steps, INPUT_SIZE),), ["x"]), [{"x": x}]
    args = (torch.randn(2, steps, INPUT_SIZE), torch.tensor([steps, 1]))
    lens = rng.integers(1, steps + 1, BATCH)
    lens[0] = steps
    return export(module, args, ["x", "lens"]), [{"x": x, "lens": lens}]


@dataclass
class Row:
    model: str
    steps: int
    hidden: int
    batch: int
    nodes_before: int
    nodes_after: int
    recurrent_ops: str
    optimize_seconds: float
    max_abs_error: float
    before_ms: float
    after_ms: float
    speedup: float


def measure(kind: str, steps: int, hidden: int, args: argparse.Namespace) -> list[Row]:
    model, feeds = build(kind, steps, hidden)
    start = time.perf_counter()
    fused, _ = onnxpress.optimize(model)  # the default pipeline
    seconds = time.perf_counter() - start
    ops = [n.op_type for n in fused.graph.node]
    recurrent = ", ".join(f"{ops.count(op)} {op}" for op in ("GRU", "LSTM") if op in ops) or "none"
    before, after = session(model, args.threads), session(fused, args.threads)
    rows = []
    for feed in feeds:
        error = max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(before.run(None, feed), after.run(None, feed), strict=True)
        )
        before_ms, after_ms, speedup = paired_ms(before, after, feed, args.pairs)
        batch = len(next(iter(feed.values())))
        rows.append(
            Row(
                kind,
                steps if kind != "decoder-step" else 1,
                hidden,
                batch,
                len(model.graph.node),
                len(fused.graph.node),
                recurrent,
                seconds,
                error,
                before_ms,
                after_ms,
                speedup,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| model | T | H | batch | nodes before | nodes after | recurrent ops | optimize s "
        "| max abs err | ORT before ms | ORT after ms | speed-up |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.steps} | {r.hidden} | {r.batch} | {r.nodes_before} "
            f"| {r.nodes_after} | {r.recurrent_ops} | {r.optimize_seconds:.2f} "
            f"| {r.max_abs_error:.1e} | {r.before_ms:.3f} | {r.after_ms:.3f} | {r.speedup:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="decoder-step,bi-gru,bi-lstm,keras-bi-gru,keras-bi-lstm,masked-bi-gru,masked-bi-lstm",
    )
    parser.add_argument("--steps", default="20,50")
    parser.add_argument("--hidden", default="64,128")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[Row] = []
    for kind in args.models.split(","):
        for hidden in (int(h) for h in args.hidden.split(",")):
            for steps in [1] if kind == "decoder-step" else [int(t) for t in args.steps.split(",")]:
                for row in measure(kind, steps, hidden, args):
                    print(
                        f"{kind} T={steps} H={hidden} b={row.batch}: {row.speedup:.2f}x",
                        file=sys.stderr,
                    )
                    rows.append(row)
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.platform()}; "
        f"python {platform.python_version()}, onnxruntime {ort.__version__}, torch "
        f"{torch.__version__}; input size {INPUT_SIZE}, {args.threads} thread(s), "
        f"{args.pairs} alternating pairs of calls, medians"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
