"""Checking a compiled library against onnxruntime.

Float models: max |diff| / max |ref| per output (float reassociation only, limit 1e-4).
Integer-lowered QDQ models (int8.py): both sides compute integer convolutions and matmuls,
so they agree up to rounding ties in a requantization, which move a value by one
quantization step. Their error is measured in steps: max |diff| / step, where the step of
an output is the scale of the DequantizeLinear that produces it or, for a float output
(e.g. a last Gemm), the largest scale of the activations dequantized into the op(s) that
compute it. The limit is one step beyond onnxruntime's own spread: in a deep model a tie
rounded one way in an early layer moves many values of the next, so two exact integer
implementations drift apart with depth (onnxruntime's fixed-point QLinearAdd and its
requantization order are not the ONNX formulas). The spread is measured on the same input
as the distance in steps between onnxruntime and the exact integer result of the ONNX QDQ
semantics (``core.emulated_runner`` with exact int32 sums); it is recorded with the error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxpress.backends.tvm.prepare import graph_inputs
from onnxpress.backends.tvm.runtime import CompiledModel, max_rel
from onnxpress.core.emulated_runner import EmulatedRunner
from onnxpress.core.targets import EXACT
from onnxpress.core.verify import Runner, random_inputs

logger = logging.getLogger(__name__)

MAX_WALK = 8  # producers followed back from an output to find its quantized inputs
STEP_LIMIT = 1.0


def _scale(model: onnx.ModelProto, node: onnx.NodeProto) -> float | None:
    inits = {t.name: t for t in model.graph.initializer}
    if node.input[0] in inits or len(node.input) < 2 or node.input[1] not in inits:
        return None  # a weight's DequantizeLinear, or a scale that is not a constant
    return float(np.max(np.abs(numpy_helper.to_array(inits[node.input[1]]))))


def quantization_steps(model: onnx.ModelProto) -> dict[str, float | None]:
    """Output name -> one quantization step in that output's units (None: not quantized).
    A QuantizeLinear's output is in levels: its step is 1 (not the float scale of the
    DequantizeLinear above it, which made one level read as 1 / scale steps)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    steps: dict[str, float | None] = {}
    for output in model.graph.output:
        writer = producer.get(output.name)
        if writer is not None and writer.op_type == "QuantizeLinear":
            steps[output.name] = 1.0
            continue
        frontier, found = [output.name], []
        for _ in range(MAX_WALK):
            nodes = [producer[name] for name in frontier if name in producer]
            if not nodes:
                break
            for node in nodes:
                if node.op_type == "DequantizeLinear":
                    scale = _scale(model, node)
                    if scale is not None:
                        found.append(scale)
            if found:
                break
            frontier = [i for node in nodes for i in node.input if i]
        steps[output.name] = max(found) if found else None
    return steps


def differential_check(
    library: Path,
    reference_model: onnx.ModelProto,
    *,
    seed: int = 0,
    in_steps: bool = False,
    tolerance: float = 1e-4,
) -> dict[str, dict[str, Any]]:
    """Per output: the error of the library against onnxruntime on seeded inputs, its metric
    and its limit. ``in_steps`` (integer-lowered models): max-abs in quantization steps, limit
    one step, for every output with a step; otherwise max-rel, limit ``tolerance``."""
    feed = random_inputs(reference_model, seed)[0]
    expected = Runner(reference_model)(feed)
    compiled = CompiledModel(library)
    got = compiled(*[feed[vi.name] for vi in graph_inputs(reference_model)])
    names = [o.name for o in reference_model.graph.output]
    steps = quantization_steps(reference_model) if in_steps else {}
    spread = onnxruntime_spread(reference_model, feed, expected, steps) if steps else {}
    checks: dict[str, dict[str, Any]] = {}
    for name, ref, new in zip(names, expected, got, strict=True):
        step = steps.get(name)
        if step is None or ref.shape != new.shape:
            checks[name] = {"metric": "max-rel", "error": max_rel(ref, new), "limit": tolerance}
        else:
            diff = float(np.max(np.abs(ref.astype(np.float64) - new))) if ref.size else 0.0
            checks[name] = {
                "metric": "max-abs/step",
                "error": diff / step,
                "limit": STEP_LIMIT + spread.get(name, 0.0),
                "step": step,
                "onnxruntime_spread": spread.get(name, 0.0),
            }
    return checks


def onnxruntime_spread(
    model: onnx.ModelProto,
    feed: dict[str, np.ndarray],
    expected: list[np.ndarray],
    steps: dict[str, float | None],
) -> dict[str, float]:
    """Per output with a step: max |onnxruntime - exact integer QDQ result| in steps; empty
    (the limit stays one step) where the emulation cannot run this model."""
    try:
        exact = EmulatedRunner(model, EXACT)
        results = exact(feed) if exact.layers else []
    except Exception as exc:  # an emulation gap must not refuse a library: strict limit
        logger.warning("int8 check: no exact reference for the spread (%s)", exc)
        return {}
    names = [o.name for o in model.graph.output]
    spread = {}
    for name, ref, own in zip(names, expected, results, strict=False):
        step = steps.get(name)
        if step is not None and ref.shape == own.shape and ref.size:
            spread[name] = float(np.max(np.abs(ref.astype(np.float64) - own))) / step
    return spread


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
