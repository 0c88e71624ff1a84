"""Target-aware int8 on every bundled model: quality under each CPU kind's arithmetic, size,
and latency against fp32, for onnxpress and its peers, in one run.

    python tools/bench_int8_targets.py [--models cnn_mnist,...] [--nncf-python PATH]

Variants: fp32; onnxpress's default (targets avx2, avx512-vnni, arm64) and ``--target host``;
its saturation remedies one by one (off, reround only, narrow only, u8 only); onnxruntime's
``quantize_static`` with its defaults (QDQ, per-tensor, uint8 activations, MinMax) and with
``reduce_range=True``; NNCF's ``nncf.quantize`` with its defaults (built with
``--nncf-python``, a Python that has nncf installed: NNCF is not a dependency). Quality is
the held-out metric of ``models/evaluate.py`` three ways: onnxruntime on this CPU, and the
emulated int8 arithmetic of VNNI/ARM (exact int32) and of AVX2 without VNNI (int16 pair
sums; ``onnxpress.core.emulated_runner``). Latency is onnxruntime on this CPU at one thread,
interleaved with fp32, as a ratio. Prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from _qdq_quality import _evaluate_module, eval_set
from bench_qdq import _cpu, _Reader, calibration_batches, float_model, latencies

import onnxpress
from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.targets import EXACT, PAIR_SATURATING, host_target

MODELS = [
    "cnn_mnist",
    "cnn_wide_mnist",
    "mobilenet_mnist",
    "transformer_mnist",
    "digit_detector",
    "sr_photos",
    "gru_sunspots",
]
DEFAULT = "fold-constants,fold-batchnorm,fuse-gru,cleanup,qdq,toposort"
NNCF_SCRIPT = """
import sys, numpy as np, onnx, nncf
model = onnx.load(sys.argv[1])
data = np.load(sys.argv[2])["input"]
name = model.graph.input[0].name
batch = [{name: data[i:i + 1]} for i in range(min(len(data), 300))]
onnx.save(nncf.quantize(model, nncf.Dataset(batch)), sys.argv[3])
"""


def onnxpress_variant(name: str, spec: str, targets: list[str] | None) -> onnx.ModelProto:
    model, _ = onnxpress.optimize(
        float_model(name), spec, calibration_batches(name), verify="structure", targets=targets
    )
    return model


def ort_variant(name: str, reduce_range: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        raw, pre, out = (str(Path(tmp) / f) for f in ("f.onnx", "pre.onnx", "q.onnx"))
        onnx.save(float_model(name), raw)
        quant_pre_process(raw, pre)
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                pre,
                out,
                _Reader(iter(calibration_batches(name))),
                quant_format=QuantFormat.QDQ,
                reduce_range=reduce_range,
            )
        return onnx.load(out)


def nncf_variant(name: str, python: str) -> onnx.ModelProto | None:
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = str(Path(tmp) / "f.onnx"), str(Path(tmp) / "q.onnx")
        onnx.save(float_model(name), raw)
        data = Path(__file__).resolve().parents[1] / "models" / "data" / f"{name}_calib.npz"
        done = subprocess.run(
            [python, "-c", NNCF_SCRIPT, raw, str(data), out],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            print(
                f"nncf failed on {name}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr
            )
            return None
        return onnx.load(out)


def outputs(model: onnx.ModelProto, inputs: np.ndarray, arithmetic: str) -> np.ndarray:
    if arithmetic == "host":
        from _timing import session

        return np.asarray(session(model, threads=2).run(None, {"input": inputs})[0])
    runner = EmulatedRunner(model, arithmetic)  # type: ignore[arg-type]
    name = model.graph.input[0].name
    return np.concatenate(
        [runner({name: inputs[i : i + 250]})[0] for i in range(0, len(inputs), 250)]
    )


def headline(scores: dict[str, float]) -> tuple[str, float]:
    for key in ("accuracy", "map", "psnr", "rmse"):
        if key in scores:
            return key, float(scores[key])
    raise KeyError(scores)


def bench(name: str, nncf_python: str | None) -> dict[str, Any]:
    variants: dict[str, onnx.ModelProto | None] = {
        "fp32": float_model(name),
        "onnxpress default": onnxpress_variant(name, DEFAULT, None),
        "onnxpress --target host": onnxpress_variant(name, DEFAULT, ["host"]),
        "onnxpress saturation=off": onnxpress_variant(
            name, DEFAULT.replace("qdq", "qdq{saturation=off,recover=false}"), None
        ),
        "onnxpress saturation=reround": onnxpress_variant(
            name, DEFAULT.replace("qdq", "qdq{saturation=reround,recover=false}"), None
        ),
        "onnxpress saturation=narrow": onnxpress_variant(
            name, DEFAULT.replace("qdq", "qdq{saturation=narrow,recover=false}"), None
        ),
        "onnxpress saturation=u8": onnxpress_variant(
            name, DEFAULT.replace("qdq", "qdq{saturation=u8,recover=false}"), None
        ),
        "onnxruntime quantize_static": ort_variant(name, False),
        "onnxruntime reduce_range": ort_variant(name, True),
    }
    if nncf_python:
        variants["nncf quantize"] = nncf_variant(name, nncf_python)
    inputs, data, _ = eval_set(name)
    scores_of = _evaluate_module().scores
    models = {k: m for k, m in variants.items() if m is not None}
    feed = {"input": inputs[:64]}
    times = latencies(models, feed, rounds=7, sample_s=0.2)
    rows = []
    for variant, model in models.items():
        quality = {}
        for arithmetic in ("host", EXACT, PAIR_SATURATING):
            metric, value = headline(scores_of(data, outputs(model, inputs, arithmetic)))
            quality[arithmetic] = value
        rows.append(
            {
                "variant": variant,
                "metric": metric,
                **quality,
                "bytes": model.ByteSize(),
                "latency": times[variant] / times["fp32"],
            }
        )
    return {"model": name, "rows": rows}


def markdown(results: list[dict[str, Any]], command: str) -> str:
    host = host_target()
    lines = [
        f"Command: `{command}`",
        "",
        f"CPU: {_cpu()}; onnxruntime's int8 kernels here are the `{host.name}` kind "
        f"({host.arithmetic} arithmetic).",
        "",
        "| model | variant | metric | this CPU | emulated exact (VNNI, ARM) | "
        "emulated AVX2 | size | latency vs fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        fp32 = result["rows"][0]["bytes"]
        for row in result["rows"]:
            fmt = "{:.4f}" if row["metric"] in ("accuracy", "map") else "{:.3f}"
            lines.append(
                f"| {result['model']} | {row['variant']} | {row['metric']} | "
                f"{fmt.format(row['host'])} | {fmt.format(row[EXACT])} | "
                f"{fmt.format(row[PAIR_SATURATING])} | {row['bytes'] / fp32:.2f}x | "
                f"{row['latency']:.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--nncf-python", help="a Python with nncf installed")
    args = parser.parse_args()
    results = [bench(name, args.nncf_python) for name in args.models.split(",")]
    print(markdown(results, "python " + " ".join(sys.argv)))


if __name__ == "__main__":
    main()
