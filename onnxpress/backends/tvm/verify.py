"""Checking a compiled library against onnxruntime.

Float models: max |diff| / max |ref| per output (float reassociation only, limit 1e-4, or
for a float16 / bfloat16 output two ulps of it: both sides round once there, and a value
near a rounding boundary lands one ulp apart).
Integer-lowered QDQ models (int8.py): both sides compute integer convolutions and matmuls,
so they agree up to rounding ties in a requantization, which move a value by one
quantization step. Their error is measured in steps: max |diff| / step, where the step of
an output is the scale of the DequantizeLinear that produces it or, for a float output
(e.g. a last Gemm), the largest scale of the activations dequantized into the op(s) that
compute it. A float output written by a normalization (LayerNormalization, RMSNormalization,
through reshapes) has a step per element: the step above it times |scale| / the row's
standard deviation (or RMS), read from onnxruntime's run of the normalization's input,
where that gain exceeds 1, as the normalization amplifies its input's error by that much (a
Whisper encoder's final LayerNorm failed at 1.67 steps of the step above it, every earlier
output within one). A gain below 1 keeps the step above it: a normalization that shrinks
its input's error is not held to a finer step than the layers before it (its input is often
a residual sum of two dequantized tensors, whose ties add up, while the step above counts
the largest of their scales once).

The limit is one step beyond onnxruntime's own spread: in a deep model a tie rounded one
way in an early layer moves many values of the next, so two exact integer implementations
drift apart with depth (onnxruntime's fixed-point QLinearAdd and its requantization order
are not the ONNX formulas). The spread is measured on the same input
as the distance in steps between onnxruntime and two other valid results: the exact integer
result of the ONNX QDQ semantics (``core.emulated_runner`` with exact int32 sums), and
onnxruntime's own run with each quantizer's input moved by a few float32 ulps either way
(``nudged``), as a float op between integer layers (a LayerNorm, a softmax) computed in
another order rounds: a RoBERTa encoder's embedding LayerNorm put one value one level off
its quantizer in TVM, 1.95 steps at the output where the exact reference read 2e-5 (with
the nudge, 1.92). It is recorded with the error.

Every float output is also held to ``tolerance`` beyond how far onnxruntime's own output moves
when the float inputs move by ``NUDGE`` (``input_spread``): a model that amplifies rounding
that much (random weights without trained normalization statistics) cannot be checked
tighter by any float implementation; a well-scaled model moves by about 1e-7.

Dynamically quantized models (``DynamicQuantizeLinear``, as onnxruntime's ``quantize_dynamic``
writes them) have no constant step: each quantizer takes its scale from the tensor it reads,
at run time, and its rounding ties move with any change in the float sums before it. Their
float outputs are held to max-rel ``tolerance`` beyond onnxruntime's own spread, measured the
same way: onnxruntime's run with every dynamic quantizer's input moved by ``NUDGE`` either
way (``dynamic_nudged``). A dynamically quantized resnet18 moves by 0.006 max-rel under that
nudge in onnxruntime itself; TVM's library of it differs by 0.005.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxpress.backends.tvm.prepare import graph_inputs
from onnxpress.backends.tvm.runtime import CompiledModel, max_rel
from onnxpress.calibration.activations import stream_activations
from onnxpress.core.emulated_runner import INTEGER_KERNEL_OPS, EmulatedRunner, exact_int8_runner
from onnxpress.core.partition import PartitionedRunner
from onnxpress.core.precision import lossless_tolerance
from onnxpress.core.targets import EXACT, host_target
from onnxpress.core.verify import Runner, random_inputs

logger = logging.getLogger(__name__)

NUDGE = 2.0**-21  # relative move of each quantizer's input: four float32 ulps
MAX_WALK = 8  # producers followed back from an output to find its quantized inputs
STEP_LIMIT = 1.0
NORMALIZATIONS = ("LayerNormalization", "RMSNormalization")
SAME_ORDER = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")  # keep element order
MakeRunner = Callable[[onnx.ModelProto], Runner | PartitionedRunner]


def reference_runner(model: onnx.ModelProto) -> MakeRunner:
    """How onnxruntime runs the reference: as the library computes, with exact int32 sums (TVM's
    on every target). Where this CPU's onnxruntime kernels saturate int16 pair sums, a model
    with integer-kernel ops runs on its exact kernels (``exact_int8_runner``): a dynamically
    quantized MLP's MatMulInteger read 0.15 max-rel from the exact result there, and its
    library was refused. Otherwise as before: unoptimized (QDQ as float fake-quant)."""
    if host_target().saturates and any(n.op_type in INTEGER_KERNEL_OPS for n in model.graph.node):
        return exact_int8_runner
    return Runner


def _scale(model: onnx.ModelProto, node: onnx.NodeProto) -> float | None:
    inits = {t.name: t for t in model.graph.initializer}
    if node.input[0] in inits or len(node.input) < 2 or node.input[1] not in inits:
        return None  # a weight's DequantizeLinear, or a scale that is not a constant
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        # a zero point computed at run time: a dynamic quantizer's bytes, shifted at scale 1
        # (lower-conv-integer), whose float step is only known at run time
        return None
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


def _normalization(model: onnx.ModelProto, output: str) -> onnx.NodeProto | None:
    """The normalization that writes ``output`` (through reshapes only), with a constant
    scale; None otherwise."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    node = producer.get(output)
    while node is not None and node.op_type in SAME_ORDER:
        node = producer.get(node.input[0])
    if node is None or node.op_type not in NORMALIZATIONS or len(node.input) < 2:
        return None
    return node if node.input[1] in inits else None


def normalized_steps(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], steps: dict[str, float | None]
) -> dict[str, np.ndarray]:
    """Per-element steps of the outputs written by a normalization (module docstring):
    output name -> an array of the output's shape; outputs without one are left out."""
    found = {}
    for name, step in steps.items():
        node = _normalization(model, name) if step is not None else None
        if node is not None:
            found[name] = node
    if not found:
        return {}
    # the normalizations' inputs and the outputs themselves, in one onnxruntime run
    wanted = [*found, *(node.input[0] for node in found.values())]
    ran = next(stream_activations(model, wanted, [feed]))
    inits = {t.name: t for t in model.graph.initializer}
    result = {}
    for name, node in found.items():
        x = ran[node.input[0]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = int(attrs.get("axis", -1)) % max(x.ndim, 1)
        axes = tuple(range(axis, x.ndim))
        eps = float(attrs.get("epsilon", 1e-5))
        x64 = x.astype(np.float64)
        if node.op_type == "LayerNormalization":
            x64 = x64 - x64.mean(axis=axes, keepdims=True)
        sigma = np.sqrt((x64 * x64).mean(axis=axes, keepdims=True) + eps)
        scale = np.abs(numpy_helper.to_array(inits[node.input[1]]).astype(np.float64))
        gain = np.maximum(np.broadcast_to(scale / sigma, x.shape), 1.0)
        result[name] = (float(steps[name] or 0.0) * gain).reshape(ran[name].shape)
    return result


def _in_steps(diff: np.ndarray, step: float | np.ndarray) -> float:
    return float(np.max(diff / step)) if diff.size else 0.0


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
    make_runner = reference_runner(reference_model)
    runner = make_runner(reference_model)
    expected = runner(feed)
    compiled = CompiledModel(library)
    got = compiled(*[feed[vi.name] for vi in graph_inputs(reference_model)])
    names = [o.name for o in reference_model.graph.output]
    steps: dict[str, float | np.ndarray | None] = {}
    if in_steps:
        scalar = quantization_steps(reference_model)
        steps.update(scalar)
        try:
            steps.update(normalized_steps(reference_model, feed, scalar))
        except Exception as exc:  # the probe run failed: the step above stays (stricter)
            logger.warning("int8 check: no per-element steps for normalized outputs (%s)", exc)
    spread = (
        onnxruntime_spread(reference_model, feed, expected, steps, make_runner) if steps else {}
    )
    dynamic = dynamic_spread(reference_model, feed, expected, make_runner)
    conditioning = input_spread(runner, feed, expected)
    checks: dict[str, dict[str, Any]] = {}
    for name, ref, new in zip(names, expected, got, strict=True):
        step = steps.get(name)
        if step is None or ref.shape != new.shape:
            limit = lossless_tolerance(ref.dtype, tolerance)  # a float16 output: its rounding
            checks[name] = {"metric": "max-rel", "error": max_rel(ref, new), "limit": limit}
            if name in dynamic or name in conditioning:
                own = max(dynamic.get(name, 0.0), conditioning.get(name, 0.0))
                checks[name]["limit"] = limit + own
                checks[name]["onnxruntime_spread"] = own
        else:
            per_element = isinstance(step, np.ndarray)
            checks[name] = {
                "metric": "max-abs/step" + (" (normalized)" if per_element else ""),
                "error": _in_steps(np.abs(ref.astype(np.float64) - new), step),
                "limit": STEP_LIMIT + spread.get(name, 0.0),
                "step": float(np.median(step)) if per_element else step,
                "onnxruntime_spread": spread.get(name, 0.0),
            }
    return checks


def onnxruntime_spread(
    model: onnx.ModelProto,
    feed: dict[str, np.ndarray],
    expected: list[np.ndarray],
    steps: Mapping[str, float | np.ndarray | None],
    make_runner: MakeRunner = Runner,
) -> dict[str, float]:
    """Per output with a step: how far onnxruntime's float QDQ run (``expected``) lies from
    other valid results, in steps: the largest distance to the exact integer QDQ result
    (``core.emulated_runner``) and to onnxruntime's run with every quantizer's input moved
    by ``NUDGE`` either way (``nudged``: the float ops the emulation leaves to onnxruntime,
    a LayerNorm, a softmax, round in another implementation's order too, and a value next
    to a tie of the quantizer after them moves one level). Empty (the limit stays one
    step) where no reference can run this model."""
    references = []
    try:
        exact = EmulatedRunner(model, EXACT)
        if exact.layers:
            references.append(exact(feed))
    except Exception as exc:  # an emulation gap must not refuse a library: strict limit
        logger.warning("int8 check: no exact reference for the spread (%s)", exc)
    for factor in (1.0 + NUDGE, 1.0 - NUDGE):
        try:
            references.append(make_runner(nudged(model, factor))(feed))
        except Exception as exc:
            logger.warning("int8 check: no nudged reference for the spread (%s)", exc)
            break
    names = [o.name for o in model.graph.output]
    spread: dict[str, float] = {}
    for results in references:
        for name, ref, own in zip(names, expected, results, strict=False):
            step = steps.get(name)
            if step is not None and ref.shape == own.shape and ref.size:
                distance = _in_steps(np.abs(ref.astype(np.float64) - own), step)
                spread[name] = max(spread.get(name, 0.0), distance)
    return spread


def nudged(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """``model`` with every QuantizeLinear computing ``x * factor / scale`` (``factor`` = 1 +-
    a few float32 ulps): its constant scale divided by ``factor`` in the scale's own dtype,
    so that a float result feeding a quantizer moves as another implementation's summation
    order may move it, and values next to a rounding tie move one level. A quantizer whose
    scale is not a constant is left as it is."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    inits = {t.name: t for t in model.graph.initializer}
    made: dict[str, str] = {}
    for node in result.graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[1]
        if name not in made:
            scale = numpy_helper.to_array(inits[name])
            moved = (scale.astype(np.float64) / factor).astype(scale.dtype)
            made[name] = f"{name}_nudged_{factor!r}"
            result.graph.initializer.append(numpy_helper.from_array(moved, made[name]))
        node.input[1] = made[name]
    return result


def input_spread(
    runner: Runner | PartitionedRunner, feed: dict[str, np.ndarray], expected: list[np.ndarray]
) -> dict[str, float]:
    """Per float output: the largest max-rel distance between onnxruntime's run
    (``expected``) and its runs with every float input moved by ``NUDGE`` either way, the
    model's own conditioning. A trained or well-scaled model moves by about 1e-7 and its
    limit stays ``tolerance``; timm's efficientnetv2_rw_t at random weights moves by 0.28
    (onnxruntime's own optimization levels differ by 0.17 on it), where no float
    implementation can be held to 1e-4 (docs/BENCHMARKS.md, run 28)."""
    floats = [k for k, v in feed.items() if np.issubdtype(v.dtype, np.floating)]
    spread: dict[str, float] = {}
    for factor in (1.0 + NUDGE, 1.0 - NUDGE) if floats else ():
        moved = dict(feed)
        for key in floats:
            moved[key] = (feed[key].astype(np.float64) * factor).astype(feed[key].dtype)
        for name, ref, own in zip(runner.output_names, expected, runner(moved), strict=False):
            if ref.shape == own.shape and ref.size and np.issubdtype(ref.dtype, np.floating):
                spread[name] = max(spread.get(name, 0.0), max_rel(ref, own))
    return spread


def dynamic_spread(
    model: onnx.ModelProto,
    feed: dict[str, np.ndarray],
    expected: list[np.ndarray],
    make_runner: MakeRunner = Runner,
) -> dict[str, float]:
    """Per output, for a model with dynamic quantizers: the largest max-rel distance between
    onnxruntime's run (``expected``) and its runs with every ``DynamicQuantizeLinear`` input
    moved by ``NUDGE`` either way. Empty for other models, or where the nudged model cannot
    run (the limit stays ``tolerance``)."""
    if not any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node):
        return {}
    names = [o.name for o in model.graph.output]
    spread: dict[str, float] = {}
    for factor in (1.0 + NUDGE, 1.0 - NUDGE):
        try:
            results = make_runner(dynamic_nudged(model, factor))(feed)
        except Exception as exc:
            logger.warning("check: no nudged reference for the dynamic quantizers (%s)", exc)
            return {}
        for name, ref, own in zip(names, expected, results, strict=False):
            if ref.shape == own.shape and ref.size and np.issubdtype(ref.dtype, np.floating):
                spread[name] = max(spread.get(name, 0.0), max_rel(ref, own))
    return spread


def dynamic_nudged(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """``model`` with the input of every ``DynamicQuantizeLinear`` multiplied by ``factor``
    (a float32 constant; 1 +- a few ulps) before it quantizes: the run-time scale and the
    rounding ties move as another implementation's float sums may move them."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    factor_name = f"onnxpress_dynamic_nudge_{factor!r}"
    result.graph.initializer.append(
        numpy_helper.from_array(np.array(factor, dtype=np.float32), factor_name)
    )
    nodes = []
    for index, node in enumerate(result.graph.node):
        if node.op_type == "DynamicQuantizeLinear" and node.input and node.input[0]:
            moved = f"{node.input[0]}_dynamic_nudge_{index}"
            nodes.append(helper.make_node("Mul", [node.input[0], factor_name], [moved]))
            node.input[0] = moved
        nodes.append(node)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
