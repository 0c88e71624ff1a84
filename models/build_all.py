"""Rebuild every bundled model, its held-out data and its calibration batch, then evaluate them.

    python models/build_all.py                 # all models
    python models/build_all.py cnn_mnist       # only some

Each build script runs in its own Python process, so a model comes out the same whether it
is built alone or with the others. Needs the ``models`` extra (torch, scikit-learn,
mlxtend, statsmodels); nothing is downloaded. Exits non-zero if any build fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent
BUILDS = {
    "cnn_mnist": ["cnn_mnist.onnx"],
    "cnn_wide_mnist": ["cnn_wide_mnist.onnx"],
    "mobilenet_mnist": ["mobilenet_mnist.onnx"],
    "mlp_digits": ["mlp_digits.onnx"],
    "transformer_mnist": ["transformer_mnist.onnx"],
    "encoder_digits": ["encoder_digits.onnx"],
    "gru_sunspots": ["gru_sunspots.onnx", "gru_sunspots_unrolled.onnx"],
    "digit_detector": ["digit_detector.onnx"],
    "sr_photos": ["sr_photos.onnx"],
    "ctc_lines": ["ctc_lines.onnx"],
    "crnn_lines": ["crnn_lines.onnx"],
}


def build(name: str) -> float:
    """Run ``build_<name>.py``; return its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(MODELS_DIR / f"build_{name}.py")], check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to build (default: all of {', '.join(BUILDS)})",
    )
    args = parser.parse_args(argv)
    names = args.names or list(BUILDS)
    unknown = sorted(set(names) - set(BUILDS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(BUILDS)}")
    timings: dict[str, float] = {}
    for name in names:
        print(f"== building {name}", flush=True)
        try:
            timings[name] = build(name)
        except subprocess.CalledProcessError as exc:
            print(
                f"error: build_{name}.py failed with exit status {exc.returncode}", file=sys.stderr
            )
            return 1
    print("== held-out metrics (onnxruntime)", flush=True)
    for name in names:
        for file in BUILDS[name]:
            subprocess.run(
                [sys.executable, str(MODELS_DIR / "evaluate.py"), str(MODELS_DIR / file)],
                check=True,
            )
    print("== build times: " + ", ".join(f"{n} {t:.0f}s" for n, t in timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
