"""Channel-pruning benchmark: accuracy vs MACs kept, latency and file size, on trained models.

For each bundled model (``models/``: the residual CNN with BatchNorm, the transformer's FFN,
the GRU) and each MAC target, ``prune-channels{macs=T,...}`` runs by four methods:

* magnitude: L1 filter norms, one uniform ratio for the target, no reconstruction;
* + reconstruction: the same channels, then least-squares refit of the consumers;
* + sensitivity: per-group ratios from measured sensitivity on calibration data, refit;
* thinet + sensitivity: ThiNet's data-aware greedy channel choice, sensitivity, refit;
* + sensitivity, multiple=8: kept counts in multiples of 8 (onnxruntime's blocked CPU
  kernels run other counts padded and reordered: fewer MACs, yet slower).

All on the bundled calibration batch (64 samples), measured with ``models/evaluate.py`` on
the held-out set (accuracy; RMSE in sunspots for the GRU). Latency is onnxruntime (all
graph optimizations, one thread) of the pruned vs the original model in one process, in
interleaved rounds: the ratio of the medians (< 1 is faster). File size is the saved .onnx.

    OPENBLAS_NUM_THREADS=1 python tools/bench_prune.py --json prune.json --plot prune.png

(One BLAS thread: on a loaded machine a multi-threaded BLAS makes the XᵀX products of the
refit spin; the pass itself never sets thread counts.)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import onnxpress

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
TARGETS = {
    "cnn_mnist": (0.8, 0.6, 0.4),
    "transformer_mnist": (0.9, 0.75, 0.6),  # only the FFN is prunable: ~44 % of the MACs
    "gru_sunspots": (0.8, 0.6, 0.4),
}
METHODS = {
    "magnitude": "criterion=l1,allocation=uniform,reconstruct=false",
    "+ reconstruction": "criterion=l1,allocation=uniform",
    "+ sensitivity": "criterion=l1,allocation=sensitivity",
    "thinet + sensitivity": "criterion=reconstruction,allocation=sensitivity",
    "+ sensitivity, multiple=8": "criterion=l1,allocation=sensitivity,multiple=8",
}


def load_evaluate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("models_evaluate", MODELS / "evaluate.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("models/evaluate.py not found")
    module = sys.modules["models_evaluate"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ratio(
    original: Path,
    pruned: Path,
    feed: dict[str, np.ndarray],
    rounds: int,
    seconds_per_round: float = 0.1,
) -> float:
    """Median per-run seconds of pruned / original over rounds that interleave (and
    alternate) the two; each round runs a model about ``seconds_per_round``."""
    sessions = {"original": session(original), "pruned": session(pruned)}
    start = time.perf_counter()
    for sess in sessions.values():  # warm up, and size the rounds
        sess.run(None, feed)
    runs = max(1, int(seconds_per_round / max((time.perf_counter() - start) / 2, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for round_index in range(rounds):
        order = list(sessions) if round_index % 2 == 0 else list(sessions)[::-1]
        for name in order:
            start = time.perf_counter()
            for _ in range(runs):
                sessions[name].run(None, feed)
            times[name].append((time.perf_counter() - start) / runs)
    return statistics.median(times["pruned"]) / statistics.median(times["original"])


def latency_feed(evaluate: ModuleType, kind: str, batch: int) -> dict[str, np.ndarray]:
    inputs = evaluate.model_inputs(evaluate.load_eval_set(evaluate.default_data(kind)))
    return {"input": np.ascontiguousarray(inputs[:batch])}


def bench_model(
    kind: str, evaluate: ModuleType, folder: Path, rounds: int, batch: int
) -> dict[str, Any]:
    source = MODELS / f"{kind}.onnx"
    calibration = MODELS / "data" / f"{kind}_calib.npz"
    baseline = evaluate.evaluate(source)
    before = onnxpress.model_stats(onnx.load(str(source)))
    feed = latency_feed(evaluate, kind, batch)
    rows: list[dict[str, Any]] = []
    for target in TARGETS[kind]:
        for method, options in METHODS.items():
            spec = f"prune-channels{{macs={target},{options}}}"
            start = time.perf_counter()
            model, report = onnxpress.optimize(
                source, spec, calibration=calibration, verify="structure"
            )
            seconds = time.perf_counter() - start
            path = folder / f"{kind}_{target}_{len(rows)}.onnx"
            onnx.save(model, str(path))
            after = report.after
            rows.append(
                {
                    "method": method,
                    "spec": spec,
                    "macs_target": target,
                    "macs_kept": after.macs / before.macs,
                    "params_kept": after.params / before.params,
                    "metric": baseline.metric,
                    "value": evaluate.evaluate(path, kind=kind).value,
                    "file_ratio": path.stat().st_size / source.stat().st_size,
                    "latency_ratio": latency_ratio(source, path, feed, rounds),
                    "seconds": seconds,
                }
            )
            print(f"{kind} {spec}: {rows[-1]['metric']} {rows[-1]['value']:.4f}", file=sys.stderr)
    return {
        "model": kind,
        "metric": baseline.metric,
        "baseline": baseline.value,
        "macs": before.macs,
        "params": before.params,
        "batch": batch,
        "rows": rows,
    }


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        metric, base = result["metric"], result["baseline"]
        unit = "points" if metric == "accuracy" else "sunspots"
        scale = 100 if metric == "accuracy" else 1
        lines += [
            f"**{result['model']}**: {result['macs']:,} MACs, {result['params']:,} params, "
            f"{metric} {scale * base:.2f} unpruned; latency at batch {result['batch']}.",
            "",
            f"| MACs target | method | MACs kept | params kept | {metric} | Δ ({unit}) "
            "| file size | latency | prune time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            value = scale * row["value"]
            lines.append(
                f"| {row['macs_target']:.2f} | {row['method']} | {row['macs_kept']:.3f} "
                f"| {row['params_kept']:.3f} | {value:.2f} | {value - scale * base:+.2f} "
                f"| {row['file_ratio']:.3f} | {row['latency_ratio']:.3f} | {row['seconds']:.1f} s |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for axis, result in zip(np.atleast_1d(axes), results, strict=True):
        for method in METHODS:
            rows = [r for r in result["rows"] if r["method"] == method]
            axis.plot(
                [r["macs_kept"] for r in rows], [r["value"] for r in rows], "o-", label=method
            )
        axis.axhline(result["baseline"], color="gray", linestyle="--", label="unpruned")
        axis.set(title=result["model"], xlabel="MACs kept", ylabel=result["metric"])
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TARGETS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved latency rounds")
    parser.add_argument("--batch", type=int, default=64, help="latency batch size")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="accuracy vs MACs kept PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        print(
            "note: OPENBLAS_NUM_THREADS is not 1; the refit may be slow on a busy machine",
            file=sys.stderr,
        )
    evaluate = load_evaluate()
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            bench_model(kind, evaluate, Path(tmp), args.rounds, args.batch)
            for kind in args.models.split(",")
        ]
    header = (
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}, onnxruntime {ort.__version__}; "
        f"date: {started:%Y-%m-%d %H:%M} UTC"
    )
    print(header + "\n\n" + markdown(results))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=2))
    if args.plot and not plot(results, args.plot):
        print("matplotlib is not installed: no plot", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
