"""Pass-test helpers, served by the ``kit`` fixture: build a model in a few lines, run one
pass, compare the result with the original on onnxruntime.

(Test modules cannot import a helper module here: the test path is ``tests`` and
``passes`` is the name of the source package, hence a fixture.)"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpress import Pass, PassContext, PassResult
from onnxpress.core.ir import to_graph, to_model

Shape = Sequence[int | str | None]


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, Shape],
    outputs: dict[str, Shape | None],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 17,
    input_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A checked model; inputs get ``input_type``, outputs are typed by shape inference."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, input_type, s) for n, s in inputs.items()],
        [helper.make_empty_tensor_value_info(n) for n in outputs],
        [numpy_helper.from_array(v, n) for n, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    for out in model.graph.output:  # declare the shapes the test asked for, if any
        wanted = outputs[out.name]
        if wanted is not None:
            out.CopyFrom(
                helper.make_tensor_value_info(out.name, out.type.tensor_type.elem_type, wanted)
            )
    outputs_seen = {o.name for o in model.graph.output}
    value_info = [v for v in model.graph.value_info if v.name not in outputs_seen]
    del model.graph.value_info[:]
    model.graph.value_info.extend(value_info)
    onnx.checker.check_model(model, full_check=True)
    return model


def const(name: str, value: Any, dtype: Any = np.float32) -> onnx.NodeProto:
    """A Constant node holding ``value``."""
    array = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
    return helper.make_node("Constant", [], [name], value=array, name=f"{name}_const")


def run_pass(pass_: Pass[Any], model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    """Run one pass directly (no verification) and export the result."""
    ctx = PassContext(template=model, original=model)
    graph = to_graph(model)
    result = pass_.run(graph, ctx)
    return to_model(graph, model), result


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        tensor_type = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 3 for d in tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def assert_same_outputs(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, rtol: float = 1e-5, seed: int = 0
) -> None:
    """Same output names, dtypes and shapes, and values within rtol of each output's scale."""
    feeds = feeds_for(original, seed)
    expected, actual = run_ort(original, feeds), run_ort(rewritten, feeds)
    assert list(actual) == list(expected)
    for name, ref in expected.items():
        new = actual[name]
        assert new.dtype == ref.dtype and new.shape == ref.shape, name
        scale = max(float(np.max(np.abs(ref))), 1e-6) if ref.size else 1.0
        np.testing.assert_allclose(new, ref, rtol=0, atol=rtol * scale, err_msg=name)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    raise KeyError(name)


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    return SimpleNamespace(
        model=make_model,
        const=const,
        run_pass=run_pass,
        same_outputs=assert_same_outputs,
        ops=ops,
        initializer=initializer,
        run_ort=run_ort,
        feeds=feeds_for,
    )
