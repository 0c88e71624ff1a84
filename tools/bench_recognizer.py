"""Channel pruning and distillation of the CTC text-line recognizer (``models/ctc_lines.onnx``).

Variants, all with ``onnxpress.optimize`` on the bundled 256-line calibration set
(``models/data/ctc_lines_calib.npz``) and measured by greedy CTC decoding on the 300
held-out lines (``models/evaluate.py``: CER and line accuracy):

* ``prune-channels{macs=0.8}`` (sensitivity allocation, refit), no distillation;
* ``prune-channels{macs=0.6}`` and ``prune-channels{macs=0.6,allocation=uniform}``, each
  then distilled with ``onnxpress.distill`` against the original on 2000 unlabeled lines
  drawn from the training digits (``text_lines.draw_lines``; KD per time step on the
  logits behind the Softmax, ``--hints`` pairs with adapters).

Times: the whole ``optimize`` call with an empty sensitivity cache, again with the cache
filled, and the ``distill`` call. The allocation itself is also timed both ways on the same
groups, scores and batch: the former whole-model trials (``data.sensitivity_curves``) and
the fast curves (``sensitivity.fast_sensitivity_curves``).

    OPENBLAS_NUM_THREADS=1 python tools/bench_recognizer.py --json recognizer.json
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
import text_lines  # noqa: E402

import onnxpress  # noqa: E402

MODEL = MODELS / "ctc_lines.onnx"
CALIBRATION = MODELS / "data" / "ctc_lines_calib.npz"


def cer(model: onnx.ModelProto, folder: Path, name: str) -> tuple[float, float]:
    path = folder / f"{name}.onnx"
    onnx.save(model, str(path))
    result = model_eval.evaluate(path, kind="ctc_lines")
    return result.value, float(result.line_accuracy or 0.0)


def distill_lines(count: int) -> np.ndarray:
    from _common import mnist_split

    images, labels, _, _ = mnist_split()
    lines, _ = text_lines.draw_lines(images, labels, count, np.random.default_rng(7))
    return lines


def prune(spec: str, cache: Path) -> tuple[onnx.ModelProto, float, float, float]:
    """(pruned model, seconds without cache, seconds with it, MAC fraction)."""
    os.environ["ONNXPRESS_CACHE_DIR"] = str(cache)
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        out, report = onnxpress.optimize(MODEL, spec, calibration=CALIBRATION, verify="structure")
        timings.append(time.perf_counter() - started)
    record = report.passes[0]
    return out, timings[0], timings[1], record.after.macs / record.before.macs


def allocation_times() -> dict[str, float]:
    from onnxpress.passes.prune_channels.data import sensitivity_curves
    from onnxpress.passes.prune_channels.importance import weight_norms
    from onnxpress.passes.prune_channels.sensitivity import fast_sensitivity_curves

    from onnxpress import PassContext
    from onnxpress.analysis.channels.groups import ChannelGroups
    from onnxpress.analysis.channels.layout import node_key
    from onnxpress.core.ir import to_graph

    model = onnx.load(str(MODEL))
    graph = to_graph(model)
    groups = PassContext(template=model, original=model).analysis(ChannelGroups, graph)
    nodes = {node_key(n): n for n in graph.nodes}
    candidates = [g for g in groups.groups if g.producers and not g.refusals and g.size > 1]
    scores = {g.index: weight_norms(groups, g, nodes, 1) for g in candidates}
    with np.load(CALIBRATION) as archive:
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
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lines", type=int, default=2000, help="unlabeled distillation lines")
    parser.add_argument("--hints", type=int, default=4)
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = onnx.load(str(MODEL))
        rows.append({"variant": "fp32", "cer_line": cer(base, folder, "fp32")})
        print(rows[-1], flush=True)
        data = [{"input": distill_lines(args.lines)}]
        for spec, distil in (
            ("prune-channels{macs=0.8}", False),
            ("prune-channels{macs=0.6}", True),
            ("prune-channels{macs=0.6,allocation=uniform}", True),
        ):
            cache = folder / f"cache{len(rows)}"
            pruned, cold, warm, macs = prune(spec, cache)
            row: dict[str, Any] = {
                "variant": spec,
                "macs": round(macs, 4),
                "optimize_s": round(cold, 1),
                "optimize_cached_s": round(warm, 1),
                "cer_line": cer(pruned, folder, f"p{len(rows)}"),
            }
            if distil:
                started = time.perf_counter()
                tuned, report = onnxpress.distill(
                    pruned, base, data, epochs=args.epochs, hints=args.hints, batch_size=32
                )
                row["distill_s"] = round(time.perf_counter() - started, 1)
                row["distilled_cer_line"] = cer(tuned, folder, f"d{len(rows)}")
                row["distill"] = report.describe()
            rows.append(row)
            print(row, flush=True)
    allocation = allocation_times()
    print(allocation, flush=True)
    result = {
        "rows": rows,
        "allocation_s": allocation,
        "cpu": platform.processor() or platform.machine(),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
