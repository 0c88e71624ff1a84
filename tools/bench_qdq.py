"""QDQ benchmark: onnxpress's ``qdq`` pass side by side with onnxruntime's ``quantize_static``.

For each bundled model (residual CNN, the same CNN without BatchNorm on raw pixels, a
MobileNetV3-style CNN, a YOLO-style digit detector, transformer encoder, GRU) and each quantizer
variant: held-out accuracy, mAP or RMSE (``_qdq_quality``) and agreement with the float model, model bytes, onnxruntime latency relative to the
float model (interleaved rounds, medians, one session per model, same process), and
calibration peak memory (VmHWM of a fresh subprocess) and time with many calibration batches.
Every quantizer starts from the same float model (constants and BatchNorm folded) and sees the
same calibration set. onnxruntime runs QDQ with per-channel weights for each of its calibration
methods, with uint8 activations (U8S8, its fast x86 form) and with its defaults (S8S8).

    python tools/bench_qdq.py --json qdq.json --markdown qdq.md
    python tools/bench_qdq.py --models mobilenet_mnist --memory-batches 50
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from _qdq_quality import eval_set, evaluate, quality_text, session

import onnxpress
from onnxpress.core.calibration_data import CalibrationData

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
FLOAT_PIPELINE = "fold-constants,fold-batchnorm,cleanup"
CALIBRATION_BATCH = 16
MEMORY_BATCH = 8
ONNXPRESS_VARIANTS: dict[str, list[str]] = {
    "default (auto)": ["qdq"],
    "mse (bias correction)": ["qdq{method=mse}"],
    "mse, no bias correction": ["qdq{method=mse,bias-correction=false}"],
    "minmax": ["qdq{method=minmax}"],
    "percentile": ["qdq{method=percentile}"],
    "entropy": ["qdq{method=entropy}"],
    "CLE + default": ["cross-layer-equalization", "qdq"],
    "default + refit=on": ["qdq{refit=on}"],
    "default + split-hardswish": ["qdq{split-hardswish=true}"],
    "default + fallback(max-drop=0.01)": ["qdq{max-drop=0.01}"],
}
ORT_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")
DEFAULT_MODELS = (
    "cnn_mnist,cnn_wide_mnist,mobilenet_mnist,digit_detector,sr_photos,transformer_mnist,"
    "gru_sunspots"
)
# variants that only apply to some models: CLE to Conv-ReLU chains, the split to HardSwish
ONLY_ON = {
    "CLE + default": ("cnn_mnist", "cnn_wide_mnist", "digit_detector", "sr_photos"),
    "default + split-hardswish": ("mobilenet_mnist",),
}


def float_model(name: str) -> onnx.ModelProto:
    model, _ = onnxpress.optimize(MODELS / f"{name}.onnx", FLOAT_PIPELINE, verify="off")
    return model


def calibration_inputs(name: str) -> np.ndarray:
    with np.load(MODELS / "data" / f"{name}_calib.npz") as data:
        return np.asarray(data["input"])


def calibration_batches(name: str) -> list[dict[str, np.ndarray]]:
    x = calibration_inputs(name)
    return [{"input": x[i : i + CALIBRATION_BATCH]} for i in range(0, len(x), CALIBRATION_BATCH)]


def onnxpress_variant(
    name: str, passes: list[str]
) -> tuple[onnx.ModelProto, float, dict[str, Any]]:
    spec = ",".join(passes)
    t0 = time.perf_counter()
    model, report = onnxpress.optimize(
        float_model(name), spec, calibration_batches(name), verify="structure"
    )
    seconds = time.perf_counter() - t0
    qdq = next(p for p in report.passes if p.name == "qdq")
    chosen = next(d["calibration"] for d in qdq.result.details if "calibration" in d)
    return (
        model,
        seconds,
        {
            "spec": spec,
            "counts": qdq.result.counts,
            "method": chosen["method"],
            "bias_correction": chosen["bias_correction"],
            "fallback": [
                r.node for r in qdq.result.refusals if r.reason.startswith("accuracy fallback")
            ],
        },
    )


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an iterator of feeds."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]]) -> None:
        self.batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def ort_variant(
    name: str,
    method: str,
    activation: str,
    batches: Iterator[dict[str, np.ndarray]],
    source: onnx.ModelProto | None = None,
) -> tuple[onnx.ModelProto, float]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        raw, pre, out = (str(Path(tmp) / f) for f in ("f.onnx", "pre.onnx", "q.onnx"))
        onnx.save(source if source is not None else float_model(name), raw)
        quant_pre_process(raw, pre)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            quantize_static(
                pre,
                out,
                _Reader(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=getattr(QuantType, activation),
                weight_type=QuantType.QInt8,
                calibrate_method=getattr(CalibrationMethod, method),
            )
        seconds = time.perf_counter() - t0
        return onnx.load(out), seconds


def latencies(
    models: dict[str, onnx.ModelProto], feed: dict[str, np.ndarray], rounds: int, sample_s: float
) -> dict[str, float]:
    """Median seconds per run of each model. Each sample times enough runs to last about
    ``sample_s``; every round takes one sample of every model, so load spikes hit all alike."""
    sessions = {k: session(m) for k, m in models.items()}
    runs: dict[str, int] = {}
    for key, s in sessions.items():
        s.run(None, feed)
        t0 = time.perf_counter()
        s.run(None, feed)
        runs[key] = max(1, int(sample_s / max(time.perf_counter() - t0, 1e-6)))
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for index in range(rounds):
        order = list(sessions.items())
        for key, s in order if index % 2 == 0 else order[::-1]:  # alternate the order
            t0 = time.perf_counter()
            for _ in range(runs[key]):
                s.run(None, feed)
            samples[key].append((time.perf_counter() - t0) / runs[key])
    return {k: statistics.median(v) for k, v in samples.items()}


def memory_batches(name: str, count: int) -> Iterator[dict[str, np.ndarray]]:
    """``count`` batches of MEMORY_BATCH samples, cycling through the calibration set."""
    x = calibration_inputs(name)
    for i in range(count):
        index = (np.arange(MEMORY_BATCH) + i * MEMORY_BATCH) % len(x)
        yield {"input": x[index]}


def child(tool: str, name: str, method: str, count: int) -> dict[str, Any]:
    """Runs in a fresh process: calibrate once, report peak RSS (MB) and seconds."""
    source = float_model(name)
    session(source).run(None, next(memory_batches(name, 1)))  # libraries and one session
    t0 = time.perf_counter()
    if tool == "onnxpress":
        calib = CalibrationData(lambda: memory_batches(name, count), count, "bench")
        onnxpress.optimize(source, f"qdq{{method={method}}}", calib, verify="off")
    elif tool == "onnxruntime":
        ort_variant(name, method, "QUInt8", memory_batches(name, count), source)
    elif tool == "onnxruntime-idle":  # its imports and pre-processing, no calibration
        from onnxruntime.quantization.shape_inference import quant_pre_process

        with tempfile.TemporaryDirectory() as tmp:
            onnx.save(source, str(Path(tmp) / "f.onnx"))
            quant_pre_process(str(Path(tmp) / "f.onnx"), str(Path(tmp) / "pre.onnx"))
    seconds = time.perf_counter() - t0
    peak_mb = _high_water_mb()
    return {
        "tool": tool,
        "model": name,
        "method": method,
        "batches": count,
        "peak_mb": round(peak_mb, 1),
        "seconds": round(seconds, 2),
    }


def _high_water_mb() -> float:
    """This process's peak resident memory. (ru_maxrss would do, except that a child forked
    from a big parent starts with the parent's figure.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(tool: str, name: str, method: str, count: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", tool, name, method, str(count)],
        capture_output=True,
        text=True,
        check=True,
        timeout=1800,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def bench_model(
    name: str, rounds: int, sample_s: float, memory_counts: list[int]
) -> dict[str, Any]:
    base = float_model(name)
    inputs, _, _ = eval_set(name)
    reference = session(base, threads=2).run(None, {"input": inputs})[0]
    rows: list[dict[str, Any]] = []
    models: dict[str, onnx.ModelProto] = {"fp32": base}
    rows.append(
        {"tool": "fp32", "variant": "float", "bytes": base.ByteSize(), **evaluate(base, name, None)}
    )
    for label, passes in ONNXPRESS_VARIANTS.items():
        if name not in ONLY_ON.get(label, (name,)):
            continue
        model, seconds, info = onnxpress_variant(name, passes)
        models[f"onnxpress {label}"] = model
        rows.append(
            {
                "tool": "onnxpress",
                "variant": label,
                "bytes": model.ByteSize(),
                "quantize_s": round(seconds, 2),
                **info,
                **evaluate(model, name, reference),
            }
        )
    for activation in ("QUInt8", "QInt8"):
        for method in ORT_METHODS if activation == "QUInt8" else ("MinMax",):
            key = f"{method} {'U8S8' if activation == 'QUInt8' else 'S8S8 (defaults)'}"
            model, seconds = ort_variant(name, method, activation, iter(calibration_batches(name)))
            models[f"onnxruntime {key}"] = model
            rows.append(
                {
                    "tool": "onnxruntime",
                    "variant": key,
                    "bytes": model.ByteSize(),
                    "quantize_s": round(seconds, 2),
                    **evaluate(model, name, reference),
                }
            )
    results: dict[str, Any] = {"rows": rows, "latency": {}}
    for batch in (1, 64):
        feed = {"input": inputs[:batch]}
        medians = latencies(models, feed, rounds, sample_s)
        results["latency"][batch] = {
            k: {"ms": v * 1e3, "ratio": v / medians["fp32"]} for k, v in medians.items()
        }
    memory = []
    for count in memory_counts:
        memory.append(run_child("onnxpress-idle", name, "-", count))
        for method in ("minmax", "percentile", "entropy", "mse"):
            memory.append(run_child("onnxpress", name, method, count))
        memory.append(run_child("onnxruntime-idle", name, "-", count))
        for method in ORT_METHODS:
            memory.append(run_child("onnxruntime", name, method, count))
    results["memory"] = memory
    return results


def _cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line]
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")),
        [],
    )
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{len(names)}x {names[0] if names else platform.machine()} ({', '.join(simd)})"


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [
        f"Machine: {_cpu()}, Python {platform.python_version()}, onnxruntime "
        f"{ort.__version__}, numpy {np.__version__}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"    {command}",
        "",
    ]
    for name, res in results.items():
        lines += [
            f"#### {name}",
            "",
            "| tool | variant | accuracy / mAP / PSNR / RMSE | agreement | rel-L2 vs fp32 | bytes | "
            "latency b=1 (ratio) | latency b=64 (ratio) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in res["rows"]:
            key = "fp32" if row["tool"] == "fp32" else f"{row['tool']} {row['variant']}"
            quality = quality_text(row)
            lat = [res["latency"][b][key] for b in (1, 64)]
            variant = row["variant"] + (
                f" (float: {', '.join(row['fallback'])})" if row.get("fallback") else ""
            )
            if row["variant"].startswith("default"):
                bias = "bias correction" if row["bias_correction"] else "no bias correction"
                variant += f": {row['method']}, {bias}"
            agreement = f"{row['agreement']:.4f}" if "agreement" in row else "-"
            lines.append(
                f"| {row['tool']} | {variant} | {quality} | {agreement} | "
                f"{row.get('rel_l2', 0):.4f} | {row['bytes']:,} | "
                f"{lat[0]['ms']:.3f} ms ({lat[0]['ratio']:.2f}) | "
                f"{lat[1]['ms']:.2f} ms ({lat[1]['ratio']:.2f}) |"
            )
        lines += [
            "",
            "| calibration | method | batches | peak RSS MB | above its idle MB | time s |",
            "|---|---|---|---|---|---|",
        ]
        idle = {(m["tool"], m["batches"]): m["peak_mb"] for m in res["memory"]}
        for m in res["memory"]:
            base = idle.get((m["tool"].split("-")[0] + "-idle", m["batches"]), m["peak_mb"])
            lines.append(
                f"| {m['tool']} | {m['method']} | {m['batches']} | {m['peak_mb']} | "
                f"{m['peak_mb'] - base:+.1f} | {m['seconds']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--sample-ms", type=float, default=40.0)
    parser.add_argument("--memory-batches", default="50,500")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "METHOD", "BATCHES"))
    args = parser.parse_args()
    if args.child:
        tool, name, method, count = args.child
        print(json.dumps(child(tool, name, method, int(count))))
        return
    counts = [int(c) for c in args.memory_batches.split(",") if c]
    results = {
        name: bench_model(name, args.rounds, args.sample_ms / 1e3, counts)
        for name in args.models.split(",")
    }
    command = "python " + " ".join(["tools/bench_qdq.py", *sys.argv[1:]])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    text = markdown(results, command)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
