"""TVM kernels shared by tests: for the parallel-launch tests (test_dynamic_parallel,
test_thread_pool) ``out[i, j] += 1`` over a parallel loop, whose result shows whether every
iteration ran exactly once; for the split-reduction tests (test_reduction_split,
test_prefetch) a Relax matmul by constant weights and a relu; for the layout tests
(test_blocked_layout, test_conv_as_conv2d) the ops and kernels a Relax ``main`` calls, and
an ONNX model from float "x" to float "y" (test_conv_as_conv2d, test_schedule), and such a
model compiled and run beside onnxruntime (test_conv_as_conv2d, test_height_one), and chains
of Conv / ConvTranspose layers (test_conv_as_conv2d, test_transposed_phases, test_dilated_taps),
and a Relax module built for llvm and run (test_transposed_phases, test_dilated_taps). TVM is
imported inside, so importing this module does not need it."""

from __future__ import annotations

from typing import Any

import numpy as np


def accumulate(extent: int, inner: int) -> Any:
    """``out[i, j] += 1`` for i in parallel(extent): each run adds exactly one per element
    only if every iteration runs once."""
    from tvm import te
    from tvm.s_tir import Schedule

    out = te.placeholder((extent, inner), "int32", name="out")
    bumped = te.compute((extent, inner), lambda i, j: out[i, j] + 1, name="bumped")
    func = te.create_prim_func([out, bumped])
    sch = Schedule(func.with_attr("global_symbol", "main"))
    i, _ = sch.get_loops(sch.get_sblock("bumped"))
    sch.parallel(i)
    return sch.mod


def relu_matmul(rows: int, depth: int, columns: int, weight: np.ndarray) -> Any:
    """A Relax module: ``relu(x @ weight)`` for x of shape (1, rows, depth), the weight
    (depth, columns) a constant."""
    from tvm import relax

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, rows, depth), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.matmul(x, relax.const(weight)))
            out = builder.emit_output(builder.emit(relax.op.nn.relu(y)))
        builder.emit_func_output(out)
    return builder.get()


def relax_calls(mod: Any) -> list[str]:
    """The ops and call_tir kernels (trailing digits stripped) of ``mod["main"]``, in order."""
    from tvm import relax

    names = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call):
                name = value.op.name
                if name == "relax.call_tir":
                    name = value.args[0].name_hint.rstrip("0123456789")
                names.append(name)
    return names


def xy_model(nodes: list[Any], inits: list[Any], x: list[int], y: list[int]) -> Any:
    """An opset-17 ONNX model of ``nodes`` from float input "x" to float output "y"."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "xy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def compiled_xy(model: Any, target: str, out: Any, x: np.ndarray) -> tuple[np.ndarray, Any]:
    """``model`` (x -> y) compiled for ``target`` into ``out``, checked at compile time
    (max-rel 1e-4), run on ``x``: (its y, onnxruntime's y)."""
    from onnxpress.backends.tvm.backend import compile_model
    from onnxpress.backends.tvm.runtime import CompiledModel
    from onnxpress.core.verify import Runner

    result = compile_model(model, target, out)
    assert max(result.manifest["verification"]["errors"].values()) <= 1e-4
    (got,) = CompiledModel(result.library)(x)
    (expected,) = Runner(model)({"x": x})
    return got, expected


def relu_chain(
    op: str, layers: list[tuple[int, tuple[int, ...], dict[str, Any]]], x: list[int], y: list[int]
) -> Any:
    """An x -> y ONNX model of ``op`` (Conv or ConvTranspose) layers, each with a bias and a
    Relu after it: (out channels, kernel, attributes); weights [out, in / group, *kernel]
    for Conv, [in, out / group, *kernel] for ConvTranspose (seeded, scaled by 0.3)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(3)
    nodes, inits, channels, name = [], [], x[1], "x"
    for index, (out, kernel, attrs) in enumerate(layers):
        group = int(attrs.get("group", 1))
        shape = (out, channels // group) if op == "Conv" else (channels, out // group)
        w = rng.normal(size=(*shape, *kernel)).astype(np.float32) * 0.3
        b = rng.normal(size=out).astype(np.float32) * 0.1
        inits += [numpy_helper.from_array(w, f"w{index}"), numpy_helper.from_array(b, f"b{index}")]
        inputs = [name, f"w{index}", f"b{index}"]
        nodes.append(helper.make_node(op, inputs, [f"c{index}"], kernel_shape=kernel, **attrs))
        name = f"r{index}" if index < len(layers) - 1 else "y"
        nodes.append(helper.make_node("Relu", [f"c{index}"], [name]))
        channels = out
    return xy_model(nodes, inits, x, y)


def run_relax(module: Any, *arrays: np.ndarray) -> np.ndarray:
    """``module``'s main built for llvm and run on ``arrays``: its (first) output."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(module, target="llvm"), tvm.cpu())
    out = vm["main"](*(tvm.runtime.tensor(a) for a in arrays))
    return (out if hasattr(out, "numpy") else out[0]).numpy()
