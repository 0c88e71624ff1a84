"""``onnxpress search`` on the bundled models, and TPE against random search.

    OPENBLAS_NUM_THREADS=1 python tools/bench_search.py fronts --minutes 7 --json fronts.json
    OPENBLAS_NUM_THREADS=1 python tools/bench_search.py random --model cnn_mnist --trials 20

``fronts``: per model a search (TPE, objectives accuracy, latency, size; onnxruntime latency
on this host, interleaved with the float model, batch 64) under a time budget, then each
single-technique row of docs/BENCHMARKS.md (accuracy, file size and latency ratios, copied
below) is checked for a front point at equal or better accuracy that is no larger and no
slower. Accuracy is the held-out top-1 (MNIST models) or minus the RMSE in sunspots (GRU).

``workers``: the wall time of N trials by one ``--worker`` process and by two sharing one
SQLite study (each process one onnxruntime thread; the setup of each process included).

``statistics``: the same search with and without reusing calibration statistics across
trials (``onnxpress.calibration.cache``): wall time, time in qdq trials, tensors reused.

``random``: the same space and trial budget searched by TPE and by random sampling, 3 seeds
each, objectives accuracy and size (both deterministic, so the comparison is not latency
noise); hypervolume of each front (reference: accuracy 0.1 below the float model's, size
1.0), and both fronts in one figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from optuna._hypervolume import compute_hypervolume

from onnxpress.search.engine import SearchConfig, search
from onnxpress.search.study import failed

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
METRICS = {
    "gru_sunspots": f"{ROOT / 'tools' / 'search_metrics.py'}:negative_sunspots_rmse",
}
TOP1 = "onnxpress.search.objectives:top1_accuracy"
# docs/BENCHMARKS.md single-technique rows: (label, accuracy, size ratio, latency ratio at
# batch 64). Accuracy of gru_sunspots is minus the RMSE. SVD sizes are estimated from the
# kept params (that table reports params, not bytes).
REPORTED: dict[str, list[tuple[str, float, float, float]]] = {
    "cnn_mnist": [
        ("prune 0.8 thinet+sensitivity", 0.982, 0.688, 1.318),
        ("prune 0.8 sensitivity multiple=8", 0.976, 0.616, 0.869),
        ("prune 0.6 sensitivity", 0.977, 0.560, 0.879),
        ("prune 0.6 sensitivity multiple=8", 0.969, 0.541, 0.769),
        ("prune 0.4 thinet+sensitivity", 0.962, 0.430, 0.922),
        ("prune 0.4 sensitivity multiple=8", 0.912, 0.312, 0.729),
        ("qdq default (QDQ table)", 0.9820, 0.444, 0.93),
        ("qdq default (target-aware table)", 0.9810, 0.45, 0.93),
    ],
    "mobilenet_mnist": [
        ("qdq default (QDQ table)", 0.9880, 0.488, 1.73),
        ("qdq split-hardswish", 0.9850, 0.517, 1.29),
        ("qdq default (target-aware table)", 0.9860, 0.49, 0.83),
    ],
    "transformer_mnist": [
        ("prune 0.9 thinet+sensitivity", 0.976, 0.898, 0.944),
        ("prune 0.75 sensitivity", 0.966, 0.749, 0.869),
        ("prune 0.6 thinet+sensitivity", 0.931, 0.598, 0.806),
        ("svd 0.75 data-aware+refit", 0.972, 0.761, 1.03),
        ("svd 0.5 data-aware+refit", 0.971, 0.522, 0.89),
        ("qdq default (target-aware table)", 0.9740, 0.44, 0.88),
    ],
    "gru_sunspots": [
        ("prune 0.8 thinet+sensitivity", -18.38, 0.753, 0.854),
        ("prune 0.6 reconstruction", -19.71, 0.579, 0.779),
        ("prune 0.6 thinet+sensitivity", -20.53, 0.579, 0.666),
        ("prune 0.4 thinet+sensitivity", -20.18, 0.431, 0.712),
        ("prune 0.4 sensitivity multiple=8", -20.74, 0.307, 0.571),
        ("qdq default (target-aware table)", -18.614, 0.56, 1.03),
    ],
}


THINET = {"criterion": "reconstruction"}
# the search space's settings of each row: queued as the first trials (the warm start), so
# the same run measures them under the same load
SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "prune 0.9 thinet+sensitivity": ("prune", {"macs": 0.9, **THINET}),
    "prune 0.8 thinet+sensitivity": ("prune", {"macs": 0.8, **THINET}),
    "prune 0.8 sensitivity multiple=8": ("prune", {"macs": 0.8, "multiple": 8}),
    "prune 0.75 sensitivity": ("prune", {"macs": 0.75}),
    "prune 0.6 sensitivity": ("prune", {"macs": 0.6}),
    "prune 0.6 sensitivity multiple=8": ("prune", {"macs": 0.6, "multiple": 8}),
    "prune 0.6 reconstruction": ("prune", {"macs": 0.6, "allocation": "uniform"}),
    "prune 0.6 thinet+sensitivity": ("prune", {"macs": 0.6, **THINET}),
    "prune 0.4 thinet+sensitivity": ("prune", {"macs": 0.4, **THINET}),
    "prune 0.4 sensitivity multiple=8": ("prune", {"macs": 0.4, "multiple": 8}),
    "svd 0.75 data-aware+refit": ("svd", {"budget": 0.75}),
    "svd 0.5 data-aware+refit": ("svd", {"budget": 0.5}),
    "qdq split-hardswish": ("qdq", {"split_hardswish": True}),
    "qdq default (QDQ table)": ("qdq", {}),
    "qdq default (target-aware table)": ("qdq", {}),
}


def _config(model: str, out: Path, **changes: Any) -> SearchConfig:
    settings: dict[str, Any] = {
        "model": str(MODELS / f"{model}.onnx"),
        "calibration": str(MODELS / "data" / f"{model}_calib.npz"),
        "eval_data": str(MODELS / "data" / f"{model}_eval.npz"),
        "metric": METRICS.get(model, TOP1),
        "out": out,
    }
    settings.update(changes)
    return SearchConfig(**settings)


def _points(outcome: Any) -> list[dict[str, Any]]:
    names = outcome.config.objectives
    return [
        {
            "trial": t.number,
            **dict(zip(names, t.values, strict=True)),
            "pipeline": t.user_attrs["pipeline"].split("cleanup,")[-1],
        }
        for t in outcome.front
    ]


def _dominating(front: list[dict[str, Any]], row: dict[str, float]) -> dict[str, Any] | None:
    """The smallest, then fastest, front point at equal or better accuracy that is no larger
    and no slower than ``row``."""
    winners = [
        p
        for p in front
        if p["accuracy"] >= row["accuracy"] - 1e-9
        and p["size"] <= row["size"] + 1e-9
        and p["latency"] <= row["latency"] + 1e-9
    ]
    return min(winners, key=lambda p: (p["size"], p["latency"])) if winners else None


def fronts(models: list[str], minutes: float, seed: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for model in models:
        rows = REPORTED.get(model, [])
        warm = tuple(dict.fromkeys(_as_key(SETTINGS[label]) for label, *_ in rows))
        with tempfile.TemporaryDirectory() as folder:
            config = _config(
                model,
                Path(folder),
                trials=10_000,
                time_budget=60 * minutes,
                seed=seed,
                warm_start=tuple((name, dict(items)) for name, items in warm),
            )
            outcome = search(config)
            trials = outcome.trials
            pipelines: dict[str, Any] = {}
            for t in trials:  # the first trial of each pipeline (later ones repeat it)
                if t.values and not failed(t):
                    pipelines.setdefault(str(t.user_attrs.get("pipeline")), t)
            space = outcome.space
        front = _points(outcome)
        checks = []
        for label, accuracy, size, latency in rows:
            name, settings = SETTINGS[label]
            params = space.single(name, **settings)
            same_run = pipelines.get(space.pipeline({k: v for k, v in params.items() if "." in k}))
            measured = (
                dict(zip(config.objectives, same_run.values, strict=True), trial=same_run.number)
                if same_run is not None
                else None
            )
            reported = {"accuracy": accuracy, "size": size, "latency": latency}
            checks.append(
                {
                    "row": label,
                    "reported": reported,
                    "dominated_by": _dominating(front, reported),
                    "same_run": measured,
                    "same_run_dominated_by": _dominating(front, measured) if measured else None,
                }
            )
        results[model] = {
            "baseline_accuracy": outcome.baseline.accuracy,
            "trials": len(trials),
            "failed": sum(1 for t in trials if failed(t)),
            "seconds": outcome.seconds,
            "front": front,
            "references": outcome.references,
            "checks": checks,
        }
        print(json.dumps({model: results[model]}, indent=1), flush=True)
    return results


def _as_key(setting: tuple[str, dict[str, Any]]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    return setting[0], tuple(sorted(setting[1].items()))


def random_vs_tpe(model: str, trials: int, seeds: int, plot: Path | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    colors = {"tpe": "#d1495b", "random": "#00798c"}
    for sampler in ("tpe", "random"):
        volumes = []
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as folder:
                config = _config(
                    model,
                    Path(folder),
                    trials=trials,
                    sampler=sampler,
                    seed=seed,
                    objectives=("accuracy", "size"),
                )
                outcome = search(config)
            base = outcome.baseline.accuracy
            losses = np.array([[-t.values[0], t.values[1]] for t in outcome.front])
            reference = np.array([-(base - 0.1), 1.0])
            inside = losses[np.all(losses < reference, axis=1)]
            volume = float(compute_hypervolume(inside, reference)) if len(inside) else 0.0
            volumes.append(volume)
            ordered = sorted(zip(losses[:, 1], -losses[:, 0], strict=True))
            ax.step(
                [s for s, _ in ordered],
                [a for _, a in ordered],
                where="post",
                color=colors[sampler],
                alpha=0.8,
                lw=1,
                label=f"{sampler} (3 seeds)" if seed == 0 else None,
            )
            ax.scatter([s for s, _ in ordered], [a for _, a in ordered], s=10, c=colors[sampler])
            print(f"{sampler} seed {seed}: hypervolume {volume:.5f}", flush=True)
        results[sampler] = {"hypervolumes": volumes, "mean": float(np.mean(volumes))}
    ax.axhline(base, color="black", lw=0.8, ls="--", label="float model")
    ax.set_xlabel("size on disk vs float model")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{model}: TPE vs random, {trials} trials each", fontsize=9)
    ax.set_ylim(base - 0.1, base + 0.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    if plot is not None:
        fig.savefig(plot)
    return results


def workers(model: str, trials: int) -> dict[str, Any]:
    """Wall time of ``trials`` trials run by one worker and by two sharing a SQLite study."""
    import subprocess
    import sys
    import time

    results: dict[str, Any] = {}
    for count in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            config = _config(model, Path(folder))
            command = [
                sys.executable, "-m", "onnxpress.cli", "search", config.model,
                "--calibration", config.calibration, "--eval", str(config.eval_data),
                "--metric", str(config.metric), "--objectives", "accuracy,size",
                "--trials", str(trials), "--storage", f"sqlite:///{folder}/study.db",
                "--out", folder, "--worker", "--json",
            ]  # fmt: skip
            start = time.perf_counter()
            procs = [
                subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(count)
            ]
            ran = [json.loads(p.communicate()[0])["trials_run"] for p in procs]
            results[f"{count} worker(s)"] = {
                "seconds": time.perf_counter() - start,
                "trials_per_worker": ran,
            }
        print(json.dumps(results), flush=True)
    return results


def statistics(model: str, trials: int) -> dict[str, Any]:
    """The same search (objectives accuracy and size, TPE, seed 0) with and without reusing
    calibration statistics across trials: wall time, tensors reused, and the same front."""
    import time

    results: dict[str, Any] = {}
    fronts: dict[bool, list[Any]] = {}
    for reuse in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            config = _config(
                model,
                Path(folder),
                trials=trials,
                objectives=("accuracy", "size"),
                reuse_statistics=reuse,
            )
            start = time.perf_counter()
            outcome = search(config)
            seconds = time.perf_counter() - start
            done = outcome.trials  # read before the folder (and its journal) goes
        qdq = [t for t in done if "qdq" in str(t.user_attrs.get("pipeline"))]
        fronts[reuse] = sorted((t.user_attrs["pipeline"], tuple(t.values)) for t in outcome.front)
        cache = outcome.statistics
        results["reuse" if reuse else "no reuse"] = {
            "seconds": seconds,
            "qdq_trial_seconds": sum(
                (t.datetime_complete - t.datetime_start).total_seconds()
                for t in qdq
                if t.datetime_complete and t.datetime_start and "repeats" not in t.user_attrs
            ),
            "qdq_trials": len([t for t in qdq if "repeats" not in t.user_attrs]),
            "tensors_reused": cache.hits if cache else 0,
            "tensors_measured": cache.misses if cache else None,
        }
        print(json.dumps(results), flush=True)
    results["same_front"] = fronts[False] == fronts[True]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    a = sub.add_parser("fronts")
    a.add_argument("--models", default="cnn_mnist,mobilenet_mnist,transformer_mnist,gru_sunspots")
    a.add_argument("--minutes", type=float, default=7.0)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", type=Path)
    b = sub.add_parser("random")
    b.add_argument("--model", default="cnn_mnist")
    b.add_argument("--trials", type=int, default=20)
    b.add_argument("--seeds", type=int, default=3)
    b.add_argument("--plot", type=Path)
    b.add_argument("--json", type=Path)
    c = sub.add_parser("workers")
    c.add_argument("--model", default="mlp_digits")
    c.add_argument("--trials", type=int, default=12)
    c.add_argument("--json", type=Path)
    d = sub.add_parser("statistics")
    d.add_argument("--model", default="cnn_mnist")
    d.add_argument("--trials", type=int, default=20)
    d.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.part == "statistics":
        results = statistics(args.model, args.trials)
    elif args.part == "workers":
        results = workers(args.model, args.trials)
    elif args.part == "fronts":
        results = fronts(args.models.split(","), args.minutes, args.seed)
    else:
        results = random_vs_tpe(args.model, args.trials, args.seeds, args.plot)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
