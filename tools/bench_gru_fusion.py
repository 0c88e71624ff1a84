"""GRU fusion benchmark: unrolled GRU loops before and after the ``fuse-gru`` pass.

Models: a loop over ``torch.nn.GRUCell`` (batch-first, returns every step stacked and the
last state) exported by both torch exporters (TorchScript: ``dynamo=False``; dynamo: needs
onnxscript), and a hand-built Keras-style ``reset_after`` cell (gate order z, r, h, Slice
gate splits, ``z*h + (1-z)*n``), for each sequence length T and hidden size H.

For each model: node count before and after, the pass's wall time, the max abs error of
the fused model against the original on onnxruntime, and onnxruntime latency before and
after. Latency is measured side by side in one run, since the machine is noisy: the two
sessions alternate call by call (the order flips every pair) for ``--pairs`` pairs; the
table gives each one's median per-call time and the median of the per-pair ratios.
Sessions use onnxruntime's default graph optimizations and ``--threads`` threads.

    python tools/bench_gru_fusion.py --steps 10,50,200 --hidden 64,256 --pairs 200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from _timing import session
from onnx import TensorProto, helper, numpy_helper

import onnxpress

INPUT_SIZE = 32
BATCH = 8
OPSET = 17


def torch_loop(steps: int, hidden: int, dynamo: bool) -> onnx.ModelProto:
    """torch.nn.GRUCell over ``steps`` steps of x [batch, steps, INPUT_SIZE], exported."""
    import torch

    class Loop(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = torch.nn.GRUCell(INPUT_SIZE, hidden)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.zeros(x.shape[0], hidden)
            outputs = []
            for t in range(steps):
                h = self.cell(x[:, t], h)
                outputs.append(h)
            return torch.stack(outputs, 1), h

    torch.manual_seed(0)
    x = torch.randn(2, steps, INPUT_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(
                Loop(),
                (x,),
                dynamo=True,
                input_names=["x"],
                output_names=["y", "h"],
                dynamic_shapes={"x": {0: batch}},
                verbose=False,
            )
            assert program is not None
            return program.model_proto
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "loop.onnx")
            torch.onnx.export(
                Loop(),
                (x,),
                path,
                dynamo=False,
                input_names=["x"],
                output_names=["y", "h"],
                dynamic_axes={"x": {0: "batch"}},
                opset_version=OPSET,
            )
            return onnx.load(path)


def keras_loop(steps: int, hidden: int) -> onnx.ModelProto:
    """Keras GRU(reset_after=True, unroll=True) written out in primitive ops."""
    rng = np.random.default_rng(0)
    scale = 1 / np.sqrt(hidden)
    inits = {
        "kernel": rng.uniform(-scale, scale, (INPUT_SIZE, 3 * hidden)),
        "rec_kernel": rng.uniform(-scale, scale, (hidden, 3 * hidden)),
        "bias": rng.uniform(-scale, scale, 3 * hidden),
        "rec_bias": rng.uniform(-scale, scale, 3 * hidden),
        "one": np.array(1.0),
    }
    arrays = {k: v.astype(np.float32) for k, v in inits.items()}
    ints: dict[str, int | list[int]] = {"ax1": [1], "units": [hidden]}
    ints.update({f"s{k}": [k * hidden] for k in range(4)})
    nodes: list[onnx.NodeProto] = []

    def op(kind: str, *inputs: str, **attrs: Any) -> str:
        name = f"{kind}_{len(nodes)}"
        nodes.append(helper.make_node(kind, list(inputs), [name], name=name, **attrs))
        return name

    def split(tensor: str) -> list[str]:
        return [op("Slice", tensor, f"s{k}", f"s{k + 1}", "ax1") for k in range(3)]

    batch = op("Shape", "x", start=0, end=1)
    h = op("ConstantOfShape", op("Concat", batch, "units", axis=0))
    states = []
    for t in range(steps):
        ints[f"t{t}"] = t
        x_t = op("Gather", "x", f"t{t}", axis=1)
        xz, xr, xh = split(op("Add", op("MatMul", x_t, "kernel"), "bias"))
        hz, hr, hh = split(op("Add", op("MatMul", h, "rec_kernel"), "rec_bias"))
        z = op("Sigmoid", op("Add", xz, hz))
        r = op("Sigmoid", op("Add", xr, hr))
        n = op("Tanh", op("Add", xh, op("Mul", r, hh)))
        h = op("Add", op("Mul", z, h), op("Mul", op("Sub", "one", z), n))
        states.append(op("Unsqueeze", h, "ax1"))
    nodes.append(helper.make_node("Concat", states, ["y"], name="stack", axis=1))
    nodes.append(helper.make_node("Identity", [h], ["h"], name="last"))
    initializers = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    initializers += [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in ints.items()]
    graph = helper.make_graph(
        nodes,
        "keras_gru",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", steps, INPUT_SIZE])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", steps, hidden]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", hidden]),
        ],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


BUILDERS: dict[str, Callable[[int, int], onnx.ModelProto]] = {
    "torchscript": lambda steps, hidden: torch_loop(steps, hidden, dynamo=False),
    "dynamo": lambda steps, hidden: torch_loop(steps, hidden, dynamo=True),
    "keras": keras_loop,
}


@dataclass
class Row:
    source: str
    steps: int
    hidden: int
    nodes_before: int
    nodes_after: int
    gru_ops: int
    pass_seconds: float
    optimize_seconds: float
    max_abs_error: float
    before_ms: float
    after_ms: float
    speedup: float  # median over pairs of before/after, measured in the same pair


def paired_ms(
    before: ort.InferenceSession,
    after: ort.InferenceSession,
    feed: dict[str, np.ndarray],
    pairs: int,
) -> tuple[float, float, float]:
    """Median ms per call of each session, and the median of the per-pair ratios.

    The two sessions run alternately, one call each, the order flipping every pair, so
    both see the same machine load; a pair's ratio cancels load that lasts longer than it.
    """
    for _ in range(3):  # warm-up
        before.run(None, feed)
        after.run(None, feed)
    times: dict[int, list[float]] = {0: [], 1: []}
    for pair in range(pairs):
        for which in (0, 1) if pair % 2 == 0 else (1, 0):
            session_ = before if which == 0 else after
            start = time.perf_counter()
            session_.run(None, feed)
            times[which].append((time.perf_counter() - start) * 1e3)
    ratios = [b / a for b, a in zip(times[0], times[1], strict=True)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def measure(source: str, steps: int, hidden: int, args: argparse.Namespace) -> Row:
    model = BUILDERS[source](steps, hidden)
    start = time.perf_counter()
    fused, report = onnxpress.optimize(model, passes="fuse-gru")
    seconds = time.perf_counter() - start
    feed = {
        "x": np.random.default_rng(1).standard_normal((BATCH, steps, INPUT_SIZE)).astype(np.float32)
    }
    before, after = session(model, args.threads), session(fused, args.threads)
    error = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(before.run(None, feed), after.run(None, feed), strict=True)
    )
    before_ms, after_ms, speedup = paired_ms(before, after, feed, args.pairs)
    return Row(
        source,
        steps,
        hidden,
        len(model.graph.node),
        len(fused.graph.node),
        sum(n.op_type == "GRU" for n in fused.graph.node),
        report.passes[0].seconds,
        seconds,
        error,
        before_ms,
        after_ms,
        speedup,
    )


def table(rows: list[Row]) -> str:
    lines = [
        "| source | T | H | nodes before | nodes after | GRU ops | pass s | optimize s | max abs err "
        "| ORT before ms | ORT after ms | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.source} | {r.steps} | {r.hidden} | {r.nodes_before} | {r.nodes_after} "
            f"| {r.gru_ops} | {r.pass_seconds:.2f} | {r.optimize_seconds:.2f} | {r.max_abs_error:.1e} | {r.before_ms:.3f} "
            f"| {r.after_ms:.3f} | {r.speedup:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default="torchscript,dynamo,keras")
    parser.add_argument("--steps", default="10,50,200")
    parser.add_argument("--hidden", default="64,256")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = []
    for source in args.sources.split(","):
        for hidden in (int(h) for h in args.hidden.split(",")):
            for steps in (int(t) for t in args.steps.split(",")):
                row = measure(source, steps, hidden, args)
                print(f"{source} T={steps} H={hidden}: {row.speedup:.1f}x", file=sys.stderr)
                rows.append(row)
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.platform()}; "
        f"python {platform.python_version()}, onnxruntime {ort.__version__}; "
        f"date {datetime.date.today()}; batch {BATCH}, input size {INPUT_SIZE}, "
        f"{args.threads} thread(s), {args.pairs} alternating pairs of calls, medians"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
