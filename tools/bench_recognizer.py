"""Channel pruning, distillation and int8 of the CTC text-line recognizers in models/.

``--model ctc_lines`` (default: CNN + attention over MNIST digit lines) or ``--model
crnn_lines`` (CNN + BiLSTM over printed lines). Variants, all with ``onnxpress.optimize`` on
the model's bundled 256-line calibration set (``models/data/<model>_calib.npz``) and
measured by greedy CTC decoding on its held-out lines (``models/evaluate.py``: CER,
character accuracy = 1 - CER, line accuracy):

* ``prune-channels{macs=0.8}`` (sensitivity allocation, refit), no distillation;
* ``prune-channels{macs=0.6}`` and ``prune-channels{macs=0.6,allocation=uniform}``, each
  then distilled with ``onnxpress.distill`` against the original on 2000 unlabeled lines
  drawn as the model's training lines were (``text_lines.draw_lines`` from the training
  digits, or ``printed_lines.draw_lines``; another seed than training); KD per time step on
  the logits behind the Softmax, ``--hints`` pairs with adapters;
* the default pipeline with calibration (``qdq``: static int8).

Each pruned row also names the groups the allocation stepped down while it removed the
first 20 % of the MACs (``first-fifth``).

Times: the whole ``optimize`` call with an empty sensitivity cache, again with the cache
filled, and the ``distill`` call. The allocation itself is also timed both ways on the same
groups, scores and batch: the former whole-model trials (``data.sensitivity_curves``) and
the fast curves (``sensitivity.fast_sensitivity_curves``).

    OPENBLAS_NUM_THREADS=1 python tools/bench_recognizer.py --json recognizer.json
    OPENBLAS_NUM_THREADS=1 python tools/bench_recognizer.py --model crnn_lines
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
sys.path.insert(0, str(MODELS))

import evaluate as model_eval  # noqa: E402
import printed_lines  # noqa: E402
import text_lines  # noqa: E402

import onnxpress  # noqa: E402

RECOGNIZERS = ("ctc_lines", "crnn_lines")


def cer(model: onnx.ModelProto, folder: Path, name: str, kind: str) -> tuple[float, float]:
    """(CER, line accuracy) on the held-out lines of ``kind``."""
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    result = model_eval.evaluate(path, kind=kind)
    return round(result.value, 5), round(float(result.line_accuracy or 0.0), 4)


def distill_lines(kind: str, count: int) -> np.ndarray:
    """Unlabeled lines drawn as ``kind``'s training lines were, with another seed."""
    rng = np.random.default_rng(7)
    if kind == "crnn_lines":
        return printed_lines.draw_lines(count, rng)[0]
    from _common import mnist_split

    images, labels, _, _ = mnist_split()
    return text_lines.draw_lines(images, labels, count, rng)[0]


def prune(
    model: Path, calibration: Path, spec: str, cache: Path
) -> tuple[onnx.ModelProto, float, float, float, list[str]]:
    """(pruned model, seconds without cache, seconds with it, MAC fraction, groups stepped
    down in the first 20 % of the MACs)."""
    os.environ["ONNXPRESS_CACHE_DIR"] = str(cache)
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        out, report = onnxpress.optimize(model, spec, calibration=calibration, verify="structure")
        timings.append(time.perf_counter() - started)
    record = report.passes[0]
    details = record.result.details
    first: list[str] = next((d["groups"] for d in details if d.get("kind") == "first-fifth"), [])
    return out, timings[0], timings[1], record.after.macs / record.before.macs, first


def allocation_times(model_path: Path, calibration: Path) -> dict[str, float]:
    from onnxpress.passes.prune_channels.data import sensitivity_curves
    from onnxpress.passes.prune_channels.importance import weight_norms
    from onnxpress.passes.prune_channels.sensitivity import fast_sensitivity_curves

    from onnxpress import PassContext
    from onnxpress.analysis.channels.groups import ChannelGroups
    from onnxpress.analysis.channels.layout import node_key
    from onnxpress.core.ir import to_graph

    model = onnx.load(str(model_path))
    graph = to_graph(model)
    groups = PassContext(template=model, original=model).analysis(ChannelGroups, graph)
    nodes = {node_key(n): n for n in graph.nodes}
    candidates = [g for g in groups.groups if g.producers and not g.refusals and g.size > 1]
    scores = {g.index: weight_norms(groups, g, nodes, 1) for g in candidates}
    with np.load(calibration) as archive:
        batches = [{"input": archive["input"]}]
    times = {"groups": float(len(candidates))}
    for label, fn in (
        ("whole-model trials", sensitivity_curves),
        ("fast", fast_sensitivity_curves),
    ):
        started = time.perf_counter()
        fn(groups, candidates, scores, model, batches, 1e-3)
        times[label] = time.perf_counter() - started
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=RECOGNIZERS, default="ctc_lines")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lines", type=int, default=2000, help="unlabeled distillation lines")
    parser.add_argument("--hints", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="distillation learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of distill")
    parser.add_argument("--patience", type=int, default=3, help="distill early-stop patience")
    parser.add_argument(
        "--rows",
        default="int8,0.8,0.6,0.6-uniform,allocation",
        help="which rows to run, comma-separated (default: all)",
    )
    args = parser.parse_args()
    wanted = set(args.rows.split(","))
    model_path = MODELS / f"{args.model}.onnx"
    calibration = MODELS / "data" / f"{args.model}_calib.npz"
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = onnx.load(str(model_path))
        rows.append({"variant": "fp32", "cer_line": cer(base, folder, "fp32", args.model)})
        print(rows[-1], flush=True)
        if "int8" in wanted:
            started = time.perf_counter()
            quantized, _ = onnxpress.optimize(
                model_path, calibration=calibration, verify="structure"
            )
            rows.append(
                {
                    "variant": "default pipeline (qdq int8)",
                    "optimize_s": round(time.perf_counter() - started, 1),
                    "cer_line": cer(quantized, folder, "int8", args.model),
                }
            )
            print(rows[-1], flush=True)
        data = [{"input": distill_lines(args.model, args.lines)}]
        for key, spec, distil in (
            ("0.8", "prune-channels{macs=0.8}", False),
            ("0.6", "prune-channels{macs=0.6}", True),
            ("0.6-uniform", "prune-channels{macs=0.6,allocation=uniform}", True),
        ):
            if key not in wanted:
                continue
            cache = folder / f"cache{len(rows)}"
            pruned, cold, warm, macs, first = prune(model_path, calibration, spec, cache)
            row: dict[str, Any] = {
                "variant": spec,
                "macs": round(macs, 4),
                "optimize_s": round(cold, 1),
                "optimize_cached_s": round(warm, 1),
                "first_fifth": first,
                "cer_line": cer(pruned, folder, f"p{len(rows)}", args.model),
            }
            if distil:
                started = time.perf_counter()
                tuned, report = onnxpress.distill(
                    pruned,
                    base,
                    data,
                    epochs=args.epochs,
                    hints=args.hints,
                    batch_size=32,
                    lr=args.lr,
                    threads=args.threads,
                    patience=args.patience,
                )
                row["distill_s"] = round(time.perf_counter() - started, 1)
                row["distilled_cer_line"] = cer(tuned, folder, f"d{len(rows)}", args.model)
                row["distill"] = report.describe()
            rows.append(row)
            print(row, flush=True)
    allocation = allocation_times(model_path, calibration) if "allocation" in wanted else {}
    print(allocation, flush=True)
    result = {
        "model": args.model,
        "rows": rows,
        "allocation_s": allocation,
        "cpu": platform.processor() or platform.machine(),
        "load": os.getloadavg(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
