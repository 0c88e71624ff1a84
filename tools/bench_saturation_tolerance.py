"""qdq's saturation-tolerance against held-out quality: how many layers each tolerance moves to
u8 weights and what the model scores on this CPU and under emulated AVX2 arithmetic.

    python tools/bench_saturation_tolerance.py [--models cnn_mnist,...] [--tolerances 0.01,...]

Run from tools/. Uses the calibration and held-out data of bench_int8_targets.py (the bundled
models' own), so its figures sit beside that benchmark's table in docs/BENCHMARKS.md.
Prints one line per model and tolerance: the metric on this CPU, the metric under AVX2's
int16 pair sums, and the count of uint8 weight tensors.
"""

from __future__ import annotations

import argparse

from _qdq_quality import _evaluate_module, eval_set
from bench_int8_targets import DEFAULT, headline, onnxpress_variant, outputs
from onnx import TensorProto

from onnxpress.core.targets import PAIR_SATURATING

MODELS = "cnn_mnist,mobilenet_mnist,sr_photos,digit_detector"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--tolerances", default="0.01,0.005,0.002")
    args = parser.parse_args()
    scores_of = _evaluate_module().scores
    for name in args.models.split(","):
        inputs, data, _ = eval_set(name)
        for tolerance in args.tolerances.split(","):
            spec = DEFAULT.replace("qdq", f"qdq{{saturation-tolerance={tolerance}}}")
            model = onnxpress_variant(name, spec, None)
            values = [
                headline(scores_of(data, outputs(model, inputs, kind)))
                for kind in ("host", PAIR_SATURATING)
            ]
            widened = sum(
                t.data_type == TensorProto.UINT8 and len(t.dims) >= 2
                for t in model.graph.initializer
            )
            print(
                f"{name} tolerance={tolerance} {values[0][0]}: this CPU {values[0][1]:.4f}, "
                f"AVX2 {values[1][1]:.4f}, u8 weight tensors {widened}",
                flush=True,
            )


if __name__ == "__main__":
    main()
