"""Single convolutions (Conv + bias + Relu) compiled by onnxpress's default TVM CPU pipeline,
timed against onnxruntime in the same interleaved rounds: GFLOP/s per kernel shape.

  python tools/bench_tvm_convs.py [--target x86|avx2|...] [--shapes NAMES] [--rounds 5] [--json]

The shapes are the kernels that dominate the zoo's convnets (resnet 3x3 stages, the stem,
mobilenet depthwise and pointwise layers). onnxruntime runs with all graph optimizations on
every core; TVM on its runtime pool (one thread per physical core, see
onnxpress.backends.tvm.targets.configure_threads). GFLOP/s = 2 x multiply-adds / time.
With ``--target avx2`` TVM runs AVX2 code on this CPU while onnxruntime keeps its own
kernels, so only the TVM column compares across targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np
import onnx
from _timing import interleaved_ms, session
from onnx import TensorProto, helper, numpy_helper

# name -> (in channels, out channels, image size, kernel, stride, groups)
SHAPES = {
    "3x3-64@56": (64, 64, 56, 3, 1, 1),
    "3x3-128@28": (128, 128, 28, 3, 1, 1),
    "3x3-256@14": (256, 256, 14, 3, 1, 1),
    "3x3-512@7": (512, 512, 7, 3, 1, 1),
    "3x3s2-64-128@56": (64, 128, 56, 3, 2, 1),
    "stem-7x7s2@224": (3, 64, 224, 7, 2, 1),
    "dw3x3-144@56": (144, 144, 56, 3, 1, 144),
    "dw3x3s2-144@56": (144, 144, 56, 3, 2, 144),
    "1x1-24-144@56": (24, 144, 56, 1, 1, 1),
    "1x1-64-256@56": (64, 256, 56, 1, 1, 1),
    "1x1-16-96@112": (16, 96, 112, 1, 1, 1),
    "1x1-256-1024@14": (256, 1024, 14, 1, 1, 1),
    "1x1-576-96@14": (576, 96, 14, 1, 1, 1),
}


def conv_model(shape: tuple[int, ...]) -> tuple[onnx.ModelProto, int]:
    """Conv + bias + Relu on a [1, C, S, S] input, and its multiply-add count."""
    channels, outputs, size, kernel, stride, groups = shape
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((outputs, channels // groups, kernel, kernel)) * 0.1
    bias = rng.standard_normal(outputs)
    out = (size + 2 * (kernel // 2) - kernel) // stride + 1
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["c"],
            pads=[kernel // 2] * 4,
            strides=[stride] * 2,
            group=groups,
        ),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs, out, out])],
        [
            numpy_helper.from_array(weight.astype(np.float32), "w"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, outputs * (channels // groups) * kernel * kernel * out * out


def measure(name: str, target: str, rounds: int) -> dict[str, Any]:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from onnxpress.backends.tvm.schedule import cpu_pipeline
    from onnxpress.backends.tvm.targets import parse_target, tvm_target

    model, macs = conv_model(SHAPES[name])
    built = tvm_target(parse_target(target))
    executable = tvm.compile(
        from_onnx(model, keep_params_in_input=False),
        target=built,
        relax_pipeline=cpu_pipeline(built),
    )
    vm = relax.VirtualMachine(executable, tvm.cpu())
    channels, size = SHAPES[name][0], SHAPES[name][2]
    x = np.random.default_rng(1).standard_normal((1, channels, size, size)).astype(np.float32)
    ort = session(model, threads=os.cpu_count() or 1)
    expected = ort.run(None, {"x": x})[0]
    tensor = tvm.runtime.tensor(x)
    got = vm["main"](tensor).numpy()
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    timed = interleaved_ms(
        {"tvm": lambda: vm["main"](tensor), "ort": lambda: ort.run(None, {"x": x})}, rounds
    )
    return {
        "shape": name,
        "tvm_ms": timed["tvm"],
        "ort_ms": timed["ort"],
        "tvm_gflops": 2 * macs / timed["tvm"] / 1e6,
        "ort_gflops": 2 * macs / timed["ort"] / 1e6,
        "ratio": timed["tvm"] / timed["ort"],
        "max_rel_err": error,
    }


def main(argv: list[str] | None = None) -> int:
    import onnxpress.backends.tvm  # noqa: F401  (sizes TVM's thread pool first)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="x86")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in args.shapes.split(",") if n]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    if not args.json:
        print("| shape | TVM ms | TVM GFLOP/s | ORT ms | ORT GFLOP/s | ratio | max-rel |")
        print("|---|---|---|---|---|---|---|")
    for name in names:
        row = measure(name, args.target, args.rounds)
        if args.json:
            print(
                json.dumps(
                    {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}
                )
            )
        else:
            print(
                f"| {name} | {row['tvm_ms']:.3f} | {row['tvm_gflops']:.0f} | {row['ort_ms']:.3f} | "
                f"{row['ort_gflops']:.0f} | {row['ratio']:.2f} | {row['max_rel_err']:.1e} |"
            )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
