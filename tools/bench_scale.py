"""Scale benchmark: the lossless pipeline on synthetic graphs of 5k, 20k and 80k nodes.

Each graph is a deterministic chain of small blocks that look like a real CNN and give every
lossless pass work to do (channels and spatial size are tiny so that onnxruntime is cheap)::

    Conv -> BatchNormalization -> Relu -> Identity -> Add(residual)   (fold-batchnorm, cleanup)
    MatMul -> Add                                                     (a dense layer)
    Constant, Constant -> Mul, Constant -> Add = 0.5 -> Mul -> Tanh   (fold-constants)
    Shape -> Gather -> Concat -> Reshape -> Reshape(back)             (shape arithmetic)
    Mul -> Sigmoid, outputs unused                                    (dead branch, cleanup)

The batch axis is symbolic, as in exported models. ``onnxpress.optimize`` with the default
lossless pipeline is timed end to end, per-pass verification included (``--verify``, default
numeric), in wall-clock and CPU seconds (CPU is steadier on a shared machine); repeats run in
rounds over all sizes and the median is kept. The report gives each pass's own time;
``--phases`` also times, in CPU seconds, each step the manager repeats per pass (export,
checker, onnxruntime session and run, statistics) on the input model. The figure of merit is
t(80k) / t(20k): 4 when time is linear in nodes; ``--max-ratio 5`` makes more than 5 an error.

    python tools/bench_scale.py --sizes 5000,20000,80000 --repeat 3 --phases --json scale.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.core.ir import to_graph, to_model
from onnxpress.core.pipeline import DEFAULT_LOSSLESS
from onnxpress.core.stats import model_stats
from onnxpress.core.verify import Runner, check_structure, run_all, verification_inputs

CHANNELS = 8
SPATIAL = 4
OPSET = 17
BLOCK_NODES = 21  # nodes written by one call of GraphBuilder.block()
DEFAULT_SIZES = (5_000, 20_000, 80_000)


@dataclass
class GraphBuilder:
    """Accumulates nodes and initializers of one synthetic graph, with unique names."""

    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        output = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def normal(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        return self.weight(name, (scale * self.rng.standard_normal(shape)).astype(np.float32))

    def constant(self, name: str, value: float) -> str:
        tensor = numpy_helper.from_array(np.array([value], dtype=np.float32), f"{name}_value")
        return self.node("Constant", [], name, value=tensor)

    def block(self, x: str, k: int) -> str:
        """One block of BLOCK_NODES nodes from running tensor ``x`` [N, C, S, S]; returns its output."""
        p = f"b{k}"
        c, s = CHANNELS, SPATIAL
        # Conv -> BatchNormalization -> Relu -> Identity -> residual Add: 5 nodes
        w = self.normal(f"{p}_conv_w", (c, c, 3, 3), 0.3 / np.sqrt(9 * c))
        b = self.normal(f"{p}_conv_b", (c,), 0.1)
        conv = self.node("Conv", [x, w, b], f"{p}_conv", pads=[1, 1, 1, 1])
        bn_inputs = [
            self.weight(
                f"{p}_bn_scale", (1 + 0.1 * self.rng.standard_normal(c)).astype(np.float32)
            ),
            self.normal(f"{p}_bn_bias", (c,), 0.1),
            self.normal(f"{p}_bn_mean", (c,), 0.1),
            self.weight(f"{p}_bn_var", (0.5 + self.rng.random(c)).astype(np.float32)),
        ]
        bn = self.node("BatchNormalization", [conv, *bn_inputs], f"{p}_bn", epsilon=1e-5)
        relu = self.node("Relu", [bn], f"{p}_relu")
        ident = self.node("Identity", [relu], f"{p}_identity")
        residual = self.node("Add", [x, ident], f"{p}_residual")
        # MatMul -> Add over the last axis: 2 nodes
        mm = self.node("MatMul", [residual, self.normal(f"{p}_fc_w", (s, s), 0.5)], f"{p}_fc")
        dense = self.node("Add", [mm, self.normal(f"{p}_fc_b", (s,), 0.1)], f"{p}_fc_bias")
        # Constant arithmetic that folds to 0.5, then scale and squash: 7 nodes
        half = self.node(
            "Add",
            [
                self.node(
                    "Mul",
                    [self.constant(f"{p}_c1", 1.0), self.constant(f"{p}_c2", 0.25)],
                    f"{p}_cmul",
                ),
                self.constant(f"{p}_c3", 0.25),
            ],
            f"{p}_cadd",
        )
        h = self.node("Tanh", [self.node("Mul", [dense, half], f"{p}_scale")], f"{p}_tanh")
        # Shape -> Gather -> Concat -> Reshape (flatten) -> Reshape (back): 5 nodes
        shape = self.node("Shape", [h], f"{p}_shape")
        index = self.weight(f"{p}_axis0", np.array([0], dtype=np.int64))
        batch = self.node("Gather", [shape, index], f"{p}_gather", axis=0)
        minus_one = self.weight(f"{p}_minus_one", np.array([-1], dtype=np.int64))
        flat_shape = self.node("Concat", [batch, minus_one], f"{p}_concat", axis=0)
        flat = self.node("Reshape", [h, flat_shape], f"{p}_flatten")
        out = self.node("Reshape", [flat, shape], f"{p}_unflatten")
        # Dead branch: 2 nodes whose outputs nothing reads
        dead = self.node("Mul", [out, self.normal(f"{p}_dead_w", (1,), 1.0)], f"{p}_dead_mul")
        self.node("Sigmoid", [dead], f"{p}_dead_sigmoid")
        return out


def synthetic_model(nodes: int, seed: int = 0) -> onnx.ModelProto:
    """A valid model of exactly ``nodes`` nodes: whole blocks, Identity padding, one output."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, not {nodes}")
    builder = GraphBuilder(np.random.default_rng(seed))
    h = "x"
    k = 0
    while len(builder.nodes) + BLOCK_NODES < nodes:
        h = builder.block(h, k)
        k += 1
    while len(builder.nodes) < nodes - 1:
        h = builder.node("Identity", [h], f"pad{len(builder.nodes)}")
    builder.nodes.append(helper.make_node("Identity", [h], ["y"], name="output_identity"))
    dims: list[str | int] = ["batch", CHANNELS, SPATIAL, SPATIAL]
    graph = helper.make_graph(
        builder.nodes,
        f"synthetic_{nodes}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "onnxpress-bench-scale"
    assert len(model.graph.node) == nodes
    return model


@dataclass
class SizeResult:
    """Medians over the repeats; wall-clock and CPU (all threads of this process) seconds."""

    nodes: int
    nodes_after: int
    seconds: float  # end to end, wall clock
    cpu_seconds: float  # end to end, CPU
    runs: list[float]  # wall clock of each repeat
    cpu_runs: list[float]
    pass_seconds: dict[str, float]  # each pass's own wall time, from the report
    rest_seconds: float  # the rest: export, checks, onnxruntime, statistics, import
    phase_cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def per_1k(self) -> float:
        return 1000 * self.seconds / self.nodes


def _cpu_timed(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def phase_timings(model: onnx.ModelProto) -> dict[str, float]:
    """CPU seconds of each step the manager repeats per pass, on the unoptimized model."""
    graph = to_graph(model)
    feeds = verification_inputs(model, None, 0)
    runner: list[Runner] = []
    return {
        "import": _cpu_timed(lambda: to_graph(model)),
        "export": _cpu_timed(lambda: to_model(graph, model)),
        "check_structure": _cpu_timed(lambda: check_structure(model)),
        "ort_session": _cpu_timed(lambda: runner.append(Runner(model))),
        "ort_run": _cpu_timed(lambda: run_all(runner[0], feeds)),
        "model_stats": _cpu_timed(lambda: model_stats(model)),
    }


@dataclass
class _Samples:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    passes: dict[str, list[float]] = field(default_factory=dict)
    nodes_after: int = 0


def _optimize_once(model: onnx.ModelProto, pipeline: str, verify: str, into: _Samples) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    optimized, report = onnxpress.optimize(model, passes=pipeline, verify=verify)
    into.wall.append(time.perf_counter() - wall)
    into.cpu.append(time.process_time() - cpu)
    into.nodes_after = len(optimized.graph.node)
    for record in report.passes:
        into.passes.setdefault(record.name, []).append(record.seconds)


def bench(
    sizes: list[int], pipeline: str, verify: str, repeat: int, phases: bool
) -> list[SizeResult]:
    """Repeats run in rounds over all sizes, so that load on the machine hits every size."""
    models = {size: synthetic_model(size) for size in sizes}
    samples = {size: _Samples() for size in sizes}
    for round_index in range(repeat):
        for size in sizes:
            print(f"round {round_index + 1}/{repeat}: {size} nodes", file=sys.stderr, flush=True)
            _optimize_once(models[size], pipeline, verify, samples[size])
    results = []
    for size in sizes:
        got = samples[size]
        pass_seconds = {name: statistics.median(v) for name, v in got.passes.items()}
        seconds = statistics.median(got.wall)
        results.append(
            SizeResult(
                nodes=size,
                nodes_after=got.nodes_after,
                seconds=seconds,
                cpu_seconds=statistics.median(got.cpu),
                runs=got.wall,
                cpu_runs=got.cpu,
                pass_seconds=pass_seconds,
                rest_seconds=max(0.0, seconds - sum(pass_seconds.values())),
                phase_cpu_seconds=phase_timings(models[size]) if phases else {},
            )
        )
    return results


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = [
        " | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in [head, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def render(results: list[SizeResult]) -> str:
    names = list(results[0].pass_seconds)
    head = ["nodes", "after", "wall s", "s/1k nodes", "cpu s", *names, "verify+rest"]
    rows = [
        [
            str(r.nodes),
            str(r.nodes_after),
            f"{r.seconds:.2f}",
            f"{r.per_1k:.3f}",
            f"{r.cpu_seconds:.2f}",
            *(f"{r.pass_seconds[n]:.2f}" for n in names),
            f"{r.rest_seconds:.2f}",
        ]
        for r in results
    ]
    text = _table(head, rows)
    if results[0].phase_cpu_seconds:
        phases = list(results[0].phase_cpu_seconds)
        rows = [[str(r.nodes), *(f"{r.phase_cpu_seconds[p]:.2f}" for p in phases)] for r in results]
        text += "\n\nCPU seconds of one step on the input model:\n" + _table(
            ["nodes", *phases], rows
        )
    return text


def ratios(results: list[SizeResult], cpu: bool = False) -> dict[str, float]:
    """t(b)/t(a) for consecutive sizes, keyed 'b/a' (e.g. '80000/20000')."""
    return {
        f"{b.nodes}/{a.nodes}": (b.cpu_seconds / a.cpu_seconds) if cpu else (b.seconds / a.seconds)
        for a, b in itertools.pairwise(results)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default=",".join(str(s) for s in DEFAULT_SIZES),
        help="comma-separated node counts (default: %(default)s)",
    )
    parser.add_argument("--verify", default="numeric", choices=["off", "structure", "numeric"])
    parser.add_argument("--repeat", type=int, default=1, help="runs per size; the median is kept")
    parser.add_argument("--pipeline", default=DEFAULT_LOSSLESS, help="default: %(default)s")
    parser.add_argument("--phases", action="store_true", help="also time the per-pass steps")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument(
        "--max-ratio",
        type=float,
        help="exit 1 when t(largest)/t(next largest), wall clock, exceeds this (the issue: 5)",
    )
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    results = bench(sizes, args.pipeline, args.verify, args.repeat, args.phases)
    print(f"pipeline {args.pipeline}, verify {args.verify}, median of {args.repeat} run(s)")
    print(render(results))
    wall, cpu = ratios(results), ratios(results, cpu=True)
    for key, value in wall.items():
        big, small = (int(n) for n in key.split("/"))
        print(f"t({key}) = {value:.2f} wall, {cpu[key]:.2f} cpu, for {big / small:.1f}x the nodes")
    if args.json:
        data = {
            "pipeline": args.pipeline,
            "verify": args.verify,
            "repeat": args.repeat,
            "python": platform.python_version(),
            "onnxpress": onnxpress.__version__,
            "results": [{**asdict(r), "seconds_per_1k_nodes": r.per_1k} for r in results],
            "ratios": wall,
            "cpu_ratios": cpu,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
    if args.max_ratio is not None and wall and list(wall.values())[-1] > args.max_ratio:
        print(f"over the limit: ratio {list(wall.values())[-1]:.2f} > {args.max_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
