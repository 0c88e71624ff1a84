"""SVD benchmark: accuracy vs kept params, latency ratio and calibration memory.

1. Accuracy: ``models/transformer_mnist.onnx`` (trained; 1000 held-out digits) factored with
   ``svd{budget=B,min-params=0}`` for B in 0.9, 0.75, 0.5 of its Linear (MatMul/Gemm) params,
   by three methods: plain SVD (whiten=false,refit=false), data-aware SVD (refit=false) and
   data-aware SVD + refit (the default with calibration), on the bundled calibration batch
   (64 training digits); the data-aware methods again on 512 training digits (a superset).
2. Latency: onnxruntime (all graph optimizations, one thread) of the factored vs the original
   model in one process, in interleaved rounds; the median per-round ratio (< 1: faster).
3. Memory: a synthetic-weight pre-norm encoder of ~22M params (vocab 30522, 6 layers, d 384,
   FFN 1536) calibrated on 256 sequences of 128 tokens (16 batches of 16) by ``svd{budget=0.75}``
   with refit, in a subprocess; its peak RSS (``ru_maxrss``), time and latency ratio.

    python tools/bench_svd.py                 # everything, markdown tables on stdout
    python tools/bench_svd.py --skip-memory --json svd.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from _timing import session
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress import CalibrationData, VerifyConfig

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "transformer_mnist.onnx"
CALIBRATION = REPO / "models" / "data" / "transformer_mnist_calib.npz"
EVAL = REPO / "models" / "data" / "transformer_mnist_eval.npz"
BUDGETS = (0.9, 0.75, 0.5)
METHODS = {
    "plain SVD": "whiten=false,refit=false",
    "data-aware SVD": "refit=false",
    "data-aware SVD + refit": "",
}
VOCAB, LAYERS, D_MODEL, HEADS, FFN, SEQ, CLASSES = 30522, 6, 384, 6, 1536, 128, 2
MEMORY_SAMPLES, MEMORY_BATCH = 256, 16


def logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    return np.asarray(session(model, threads=2).run(None, {"input": images})[0], np.float64)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((np.argmax(scores, axis=1) == labels).mean())


def linear_params(model: onnx.ModelProto) -> int:
    """Params of the weights read by MatMul and Gemm (B only), factors included."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    names = {
        n.input[1] if n.op_type == "Gemm" else i
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm")
        for i in n.input[:2]
    }
    return sum(sizes.get(name, 0) for name in names)


def latency_ratio(
    original: onnx.ModelProto,
    factored: onnx.ModelProto,
    feed: dict[str, np.ndarray],
    rounds: int,
    runs: int,
) -> dict[str, float]:
    """Median ms per run of each model, the median of the per-round ratios, and the ratio of
    the fastest rounds.

    Rounds alternate the order (ABBA...), and each ratio compares the two models within one
    round, so that load from other processes that drifts between rounds cancels out; the
    fastest rounds are the least disturbed by it.
    """
    sessions = {"original": session(original), "factored": session(factored)}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for s in sessions.values():  # warm up
        for _ in range(3):
            s.run(None, feed)
    for index in range(rounds):
        order = list(sessions) if index % 2 == 0 else list(reversed(sessions))
        for name in order:
            start = time.perf_counter()
            for _ in range(runs):
                sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) / runs)
    ratios = [f / o for f, o in zip(times["factored"], times["original"], strict=True)]
    return {
        "original_ms": 1e3 * statistics.median(times["original"]),
        "factored_ms": 1e3 * statistics.median(times["factored"]),
        "ratio": statistics.median(ratios),
        "min_ratio": min(times["factored"]) / min(times["original"]),
        "rounds": rounds,
    }


def training_calibration(samples: int) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` training digits of the model's split, in batches of 64.

    The bundled calibration batch is the first 64 of them (checked), so this only adds data.
    """
    sys.path.insert(0, str(REPO / "models"))
    mnist_split = importlib.import_module("_common").mnist_split
    images = mnist_split()[0][:samples].astype(np.float32) / np.float32(255.0)
    batches = [{"input": images[i : i + 64]} for i in range(0, samples, 64)]
    with np.load(CALIBRATION) as bundled:
        if not np.array_equal(bundled["input"], batches[0]["input"]):
            raise RuntimeError("the training split does not start with the bundled batch")
    return batches


def accuracy_table(
    rounds: int, calibration: str | list[dict[str, np.ndarray]], methods: dict[str, str]
) -> dict[str, Any]:
    """Every budget x method; latency only for the last method (data-aware + refit)."""
    model = onnx.load(str(MODEL))
    data = np.load(EVAL)
    images = (data["images"].astype(np.float32) / np.float32(data["divisor"])).astype(np.float32)
    labels = data["labels"]
    reference = logits(model, images)
    base = accuracy(reference, labels)
    dense = linear_params(model)
    rows = []
    for budget in BUDGETS:
        for method, extra in methods.items():
            spec = f"svd{{budget={budget},min-params=0{',' + extra if extra else ''}}}"
            start = time.perf_counter()
            out, report = onnxpress.optimize(
                model, passes=spec, calibration=calibration, verify=VerifyConfig(budget=1e9)
            )
            seconds = time.perf_counter() - start
            record = report.passes[0]
            scores = logits(out, images)
            held_out = float(np.linalg.norm(scores - reference) / np.linalg.norm(reference))
            rows.append(
                {
                    "budget": budget,
                    "method": method,
                    "spec": spec,
                    "kept_linear": linear_params(out) / dense,
                    "accuracy": accuracy(scores, labels),
                    "logits_rel_l2": record.verification.value,
                    "held_out_rel_l2": held_out,
                    "factored": record.result.counts.get("factored", 0),
                    "seconds": seconds,
                    "latency_b1": latency_ratio(model, out, {"input": images[:1]}, rounds, 200)
                    if rounds and method.endswith("refit")
                    else None,
                    "latency_b64": latency_ratio(model, out, {"input": images[:64]}, rounds, 20)
                    if rounds and method.endswith("refit")
                    else None,
                }
            )
            print(f"  {spec}: acc {rows[-1]['accuracy']:.4f}", file=sys.stderr)
    return {"original_accuracy": base, "linear_params": dense, "rows": rows}


def synthetic_encoder(seed: int = 0) -> onnx.ModelProto:
    """A pre-norm transformer encoder with random weights: ids [batch, SEQ] -> logits."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.02) -> str:
        inits.append(
            numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)
        )
        return name

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    def op(kind: str, inputs: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, inputs, [name], name=name, **attrs))
        return name

    def norm(x: str, name: str) -> str:
        scale = const(f"{name}.g", np.ones(D_MODEL, np.float32))
        return op(
            "LayerNormalization",
            [x, scale, const(f"{name}.b", np.zeros(D_MODEL, np.float32))],
            name,
            axis=-1,
        )

    def linear(x: str, name: str, k: int, n: int) -> str:
        h = op("MatMul", [x, weight(f"{name}.weight", (k, n))], f"{name}/MatMul")
        return op("Add", [h, weight(f"{name}.bias", (n,))], f"{name}/Add")

    heads = const("heads_shape", np.array([0, 0, HEADS, D_MODEL // HEADS], np.int64))
    merged = const("merged_shape", np.array([0, 0, D_MODEL], np.int64))
    scale = const("scale", np.array(1 / np.sqrt(D_MODEL // HEADS), np.float32))
    x = op("Gather", [weight("embed", (VOCAB, D_MODEL)), "input_ids"], "embed/Gather")
    x = op("Add", [x, weight("position", (SEQ, D_MODEL))], "embed/Add")
    for i in range(LAYERS):
        p = f"layers.{i}"
        h = norm(x, f"{p}/norm1")
        q, k, v = (
            op(
                "Transpose",
                [
                    op(
                        "Reshape",
                        [linear(h, f"{p}/{t}", D_MODEL, D_MODEL), heads],
                        f"{p}/{t}/Reshape",
                    )
                ],
                f"{p}/{t}/Transpose",
                perm=[0, 2, 3, 1] if t == "key" else [0, 2, 1, 3],
            )
            for t in ("query", "key", "value")
        )
        scores = op("Mul", [op("MatMul", [q, k], f"{p}/scores"), scale], f"{p}/scaled")
        context = op("MatMul", [op("Softmax", [scores], f"{p}/softmax", axis=-1), v], f"{p}/ctx")
        context = op(
            "Reshape",
            [op("Transpose", [context], f"{p}/ctx/T", perm=[0, 2, 1, 3]), merged],
            f"{p}/ctx/Reshape",
        )
        x = op("Add", [x, linear(context, f"{p}/out", D_MODEL, D_MODEL)], f"{p}/res1")
        f = op("Relu", [linear(norm(x, f"{p}/norm2"), f"{p}/ffn1", D_MODEL, FFN)], f"{p}/relu")
        x = op("Add", [x, linear(f, f"{p}/ffn2", FFN, D_MODEL)], f"{p}/res2")
    pooled = op("ReduceMean", [norm(x, "final_norm")], "pool", axes=[1], keepdims=0)
    nodes.append(
        helper.make_node(
            "Gemm",
            [pooled, weight("head.weight", (CLASSES, D_MODEL)), weight("head.bias", (CLASSES,))],
            ["logits"],
            name="head/Gemm",
            transB=1,
        )
    )
    graph = helper.make_graph(
        nodes,
        "synthetic_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def memory_child() -> None:
    """Run in a subprocess: calibrate and factor the synthetic encoder; print one JSON line."""
    model = synthetic_encoder()
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)

    def batches() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(1)
        for _ in range(MEMORY_SAMPLES // MEMORY_BATCH):
            yield {"input_ids": rng.integers(0, VOCAB, (MEMORY_BATCH, SEQ), dtype=np.int64)}

    calibration = CalibrationData(batches, MEMORY_SAMPLES // MEMORY_BATCH, "synthetic")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out, report = onnxpress.optimize(model, passes="svd{budget=0.75}", calibration=calibration)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    feed = {"input_ids": np.random.default_rng(2).integers(0, VOCAB, (1, SEQ), dtype=np.int64)}
    print(
        json.dumps(
            {
                "params": params,
                "params_after": report.after.params,
                "peak_rss_mb": peak,
                "rss_before_pass_mb": rss_before,
                "seconds": seconds,
                "factored": report.passes[0].result.counts.get("factored", 0),
                "latency_b1": latency_ratio(model, out, feed, rounds=9, runs=5),
            }
        )
    )


def memory_run() -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child"], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def markdown(results: dict[str, Any]) -> str:
    acc = results["accuracy"]
    lines = [
        f"Original accuracy {acc['original_accuracy']:.4f}; Linear params {acc['linear_params']}.",
        "",
        "| kept (budget) | method | calibration | kept Linear params | accuracy | Δ accuracy "
        "| logits rel-l2, calibration | logits rel-l2, held out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tables = [(acc, "64 (bundled)")]
    if results.get("accuracy_large"):
        tables.append((results["accuracy_large"], f"{results['large_samples']} (train)"))
    rows = sorted(
        ((row, label) for table, label in tables for row in table["rows"]),
        key=lambda item: -item[0]["budget"],
    )
    for row, label in rows:
        lines.append(
            f"| {row['budget']} | {row['method']} | {label} | {row['kept_linear']:.3f} | "
            f"{row['accuracy']:.4f} | {100 * (row['accuracy'] - acc['original_accuracy']):+.1f} pt | "
            f"{row['logits_rel_l2']:.3f} | {row['held_out_rel_l2']:.3f} |"
        )
    lines += [
        "",
        "| kept (budget) | batch | original ms | factored ms | ratio (median of rounds) "
        "| ratio (fastest rounds) |",
        "|---|---|---|---|---|---|",
    ]
    for row in acc["rows"]:
        for batch in ("b1", "b64"):
            lat = row[f"latency_{batch}"]
            if lat:
                lines.append(
                    f"| {row['budget']} | {batch[1:]} | {lat['original_ms']:.3f} | "
                    f"{lat['factored_ms']:.3f} | {lat['ratio']:.2f} | {lat['min_ratio']:.2f} |"
                )
    mem = results.get("memory")
    if mem:
        lat = mem["latency_b1"]
        lines += [
            "",
            "| model params | after | peak RSS | RSS before pass | time "
            "| latency b1 ratio (median / fastest) |",
            "|---|---|---|---|---|---|",
            f"| {mem['params'] / 1e6:.1f}M | {mem['params_after'] / 1e6:.1f}M | "
            f"{mem['peak_rss_mb']:.0f} MiB | {mem['rss_before_pass_mb']:.0f} MiB | "
            f"{mem['seconds']:.0f} s | {lat['ratio']:.2f} / {lat['min_ratio']:.2f} "
            f"({lat['original_ms']:.1f} → {lat['factored_ms']:.1f} ms) |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved latency rounds")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--large-calibration",
        type=int,
        default=512,
        help="also run the data-aware methods on this many training digits (0: skip)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child()
        return 0
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, "
        f"onnxruntime {ort.__version__}",
        "date": datetime.date.today().isoformat(),
        "accuracy": accuracy_table(args.rounds, str(CALIBRATION), METHODS),
        "large_samples": args.large_calibration,
    }
    if args.large_calibration:
        data_aware = {k: v for k, v in METHODS.items() if k != "plain SVD"}
        batches = training_calibration(args.large_calibration)
        results["accuracy_large"] = accuracy_table(0, batches, data_aware)
    if not args.skip_memory:
        results["memory"] = memory_run()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
