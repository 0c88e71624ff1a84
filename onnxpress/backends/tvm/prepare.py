"""Make a model TVM-ready: static input shapes, verified lowering passes, an op coverage check.

specialise:  every graph input gets a static shape (``--input-shape name=1,3,224,224``,
             else the model's own static dims; a symbolic leading axis becomes 1), stale
             value_info is dropped and shapes are inferred again;
lower:       the pipeline ``PREPARE_PIPELINE`` (a model older than opset 11 converted to
             opset 13 (passes/upgrade_opset.py: Upsample and Resize-10 -> Resize-13),
             float16 / bfloat16 computed in float32 (passes/upcast_float16.py: TVM's
             code sums them in float16),
             QOperator int8 ops as QDQ (passes/qop_to_qdq.py: QLinearConv and the like),
             ConvInteger as a float Conv of its exact sums (passes/lower_conv_integer.py), GRU ->
             primitive ops, Einsum -> MatMuls (passes/lower_einsum.py), constant folding of
             the now-static shape arithmetic, dead-node clean-up) runs under the pass
             manager, so each pass is verified on onnxruntime and reported;
coverage:    every op the Relax ONNX importer cannot take is listed, with node names, in
             one UnsupportedOpsError before TVM sees the model;
QDQ scales:  a QuantizeLinear or DequantizeLinear whose constant scale holds a zero or a
             non-finite value is named in an InvalidModelError (TVM failed on it with an
             internal "Divide by zero"; onnxruntime divides by it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import onnx

from onnxpress.core.errors import InvalidModelError, OnnxpressError
from onnxpress.core.ir import copy_model
from onnxpress.core.manager import PassManager, VerifyConfig
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.report import Report

logger = logging.getLogger(__name__)

UPGRADE = "upgrade-opset{below=11}"  # TVM's importer misreads Upsample and Resize-10
PREPARE_PIPELINE = (
    f"{UPGRADE},upcast-float16,qop-to-qdq,lower-conv-integer,lower-gru,fold-constants,"
    "lower-einsum,cleanup,toposort"
)
# GRUs kept for the loop-form converter (onnxpress.backends.tvm.rnn) instead of unrolled.
LOOP_GRU_PIPELINE = (
    f"{UPGRADE},upcast-float16,qop-to-qdq,lower-conv-integer,fold-constants,lower-einsum,"
    "cleanup,toposort"
)


def with_dynamic_lstm(model: onnx.ModelProto, pipeline: str) -> str:
    """``pipeline`` with lower-dynamic-lstm after its fold-constants where the model has a
    com.microsoft DynamicQuantizeLSTM (quantize_dynamic's LSTM), which TVM cannot import.
    After fold-constants: a stacked LSTM's initial states (an Expand of a Shape) must be
    static for the second layer's input shape to be known. Only then: the pass is lossy, and
    a lossy pass in the pipeline changes how the passes after it are judged."""
    if not any(n.op_type == "DynamicQuantizeLSTM" for n in model.graph.node):
        return pipeline
    head, found, tail = pipeline.partition("fold-constants,")
    return f"{head}fold-constants,lower-dynamic-lstm,{tail}" if found else pipeline


def with_masked_lowering(model: onnx.ModelProto, pipeline: str) -> str:
    """``pipeline``, led by lower-gru/lower-lstm{masked-only=true} where a GRU or LSTM has
    sequence_lens (a fused masked loop): the loop kernels run full-length sequences only."""
    masked = {
        n.op_type
        for n in model.graph.node
        if n.op_type in ("GRU", "LSTM") and len(n.input) > 4 and n.input[4]
    }
    lowering = [f"lower-{op.lower()}{{masked-only=true}}" for op in sorted(masked)]
    return ",".join([*lowering, pipeline])


# Handled by the importer outside its converter table.
_IMPORTER_BUILTINS = {"Constant", "If"}
_DEFAULT_DOMAINS = ("", "ai.onnx")


class UnsupportedOpsError(OnnxpressError):
    """The model holds ops that TVM's Relax ONNX importer cannot convert."""

    def __init__(self, missing: Mapping[str, list[str]]) -> None:
        parts = []
        for op, nodes in sorted(missing.items()):
            shown = ", ".join(f"'{n}'" for n in nodes[:5])
            more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
            parts.append(f"{op} ({len(nodes)}: {shown}{more})")
        super().__init__("TVM's ONNX importer cannot convert these ops: " + "; ".join(parts))
        self.missing = dict(missing)


@dataclass
class Prepared:
    """A model ready for the importer, with what was done to it."""

    model: onnx.ModelProto
    input_shapes: dict[str, list[int]]
    input_dtypes: dict[str, str]
    report: Report | None
    notes: list[str] = field(default_factory=list)


def parse_input_shapes(items: Iterable[str]) -> dict[str, list[int]]:
    """``["x=1,3,224,224", "mask=1,128"]`` -> {name: dims}; a bare ``1,3,224,224`` is keyed ''."""
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, _, dims_text = item.rpartition("=")
        try:
            dims = [int(d) for d in dims_text.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise InvalidModelError(
                f"--input-shape '{item}': expected NAME=D1,D2,... with integer dims"
            ) from None
        if not dims or any(d <= 0 for d in dims):
            raise InvalidModelError(f"--input-shape '{item}': dims must be positive integers")
        if name.strip() in shapes:
            raise InvalidModelError(f"--input-shape: '{name}' given twice")
        shapes[name.strip()] = dims
    return shapes


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def specialise_shapes(
    model: onnx.ModelProto, requested: Mapping[str, list[int]]
) -> tuple[onnx.ModelProto, dict[str, list[int]], list[str]]:
    """A copy of ``model`` whose inputs have static shapes; returns it, the shapes and notes."""
    inputs = graph_inputs(model)
    wanted = dict(requested)
    if "" in wanted:
        if len(inputs) != 1:
            names = ", ".join(vi.name for vi in inputs)
            raise InvalidModelError(
                f"--input-shape without a name needs a one-input model (inputs: {names})"
            )
        wanted[inputs[0].name] = wanted.pop("")
    unknown = sorted(set(wanted) - {vi.name for vi in inputs})
    if unknown:
        names = ", ".join(vi.name for vi in inputs)
        raise InvalidModelError(f"--input-shape names unknown input(s) {unknown} (inputs: {names})")
    out = copy_model(model)
    notes: list[str] = []
    shapes: dict[str, list[int]] = {}
    for vi in graph_inputs(out):
        dims = vi.type.tensor_type.shape.dim
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        if vi.name in wanted:
            shape = wanted[vi.name]
            if len(shape) != len(dims):
                raise InvalidModelError(
                    f"--input-shape {vi.name}: {len(shape)} dims given, the model declares "
                    f"{len(dims)} ({declared})"
                )
            for given, dim in zip(shape, declared, strict=True):
                if isinstance(dim, int) and dim > 0 and dim != given:
                    raise InvalidModelError(
                        f"--input-shape {vi.name}={shape} conflicts with the model's {declared}"
                    )
        else:
            shape = []
            for axis, dim in enumerate(declared):
                if isinstance(dim, int) and dim > 0:
                    shape.append(dim)
                elif axis == 0:
                    shape.append(1)
                    notes.append(f"input '{vi.name}': symbolic axis 0 ({dim}) set to 1")
                else:
                    raise InvalidModelError(
                        f"input '{vi.name}' has symbolic axis {axis} ({dim}) in {declared}; "
                        f"give its shape with --input-shape {vi.name}=..."
                    )
        for dim, value in zip(dims, shape, strict=True):
            dim.Clear()
            dim.dim_value = value
        shapes[vi.name] = shape
    # Intermediate shapes were inferred for symbolic dims; infer them again.
    del out.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(out, strict_mode=True, data_prop=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(
            f"shape inference fails at the given input shapes: {first}"
        ) from None
    inferred_outputs = {vi.name: vi for vi in inferred.graph.output}
    for vi in out.graph.output:
        new = inferred_outputs.get(vi.name)
        if new is not None and _static(new):
            vi.type.CopyFrom(new.type)
    return out, shapes, notes


def _static(vi: onnx.ValueInfoProto) -> bool:
    t = vi.type.tensor_type
    return t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)


def prepare(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, list[int]] | None = None,
    *,
    pipeline: str = PREPARE_PIPELINE,
    verify: VerifyConfig | None = None,
    seed: int = 0,
) -> Prepared:
    """Specialise shapes and run the lowering pipeline (verified); does not need TVM."""
    check_qdq_scales(model)
    static, shapes, notes = specialise_shapes(model, input_shapes or {})
    report: Report | None = None
    if pipeline:
        manager = PassManager(parse_pipeline(pipeline), verify or VerifyConfig(), seed=seed)
        static, report = manager.run(static)
    dtypes = {
        vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        for vi in graph_inputs(static)
    }
    return Prepared(static, shapes, dtypes, report, notes)


def check_qdq_scales(model: onnx.ModelProto) -> None:
    """Raise InvalidModelError naming the first QuantizeLinear / DequantizeLinear of the main
    graph whose scale, an initializer or a Constant, has a zero or non-finite value."""
    import numpy as np
    from onnx import numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = node.attribute[0].t
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        tensor = constants.get(node.input[1])
        if tensor is None:
            continue
        scale = numpy_helper.to_array(tensor).astype(np.float64)
        bad = int(np.count_nonzero((scale == 0) | ~np.isfinite(scale)))
        if bad:
            raise InvalidModelError(
                f"{node.op_type} '{node.name or node.output[0]}': scale '{node.input[1]}' has "
                f"{bad} zero or non-finite value(s); a quantization scale must be nonzero "
                "and finite"
            )


def importer_ops() -> set[str]:
    """Op types the Relax ONNX importer converts (from its own converter table)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return set(onnx_frontend._get_convert_map()) | _IMPORTER_BUILTINS


def unsupported_ops(model: onnx.ModelProto, supported: set[str]) -> dict[str, list[str]]:
    """op type -> names of the nodes (subgraphs included) the importer cannot convert."""
    missing: dict[str, list[str]] = {}

    def visit(graph: onnx.GraphProto, prefix: str) -> None:
        for index, node in enumerate(graph.node):
            label = prefix + (node.name or f"#{index}")
            domain = node.domain or ""
            op = node.op_type if domain in _DEFAULT_DOMAINS else f"{domain}.{node.op_type}"
            if domain not in _DEFAULT_DOMAINS or node.op_type not in supported:
                missing.setdefault(op, []).append(label)
            for attr in node.attribute:
                for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                    visit(sub, f"{label}/{attr.name}/")

    visit(model.graph, "")
    return missing


def check_coverage(model: onnx.ModelProto, *, loop_rnn: bool = False) -> None:
    """Raise UnsupportedOpsError listing every op the importer cannot take (with
    ``loop_rnn``, GRUs and LSTMs that onnxpress.backends.tvm.rnn converts count as supported)."""
    from onnxpress.backends.tvm.rnn import LOOP_OPS, loop_supported

    supported = importer_ops()
    if loop_rnn:
        supported.update(LOOP_OPS)
    missing = unsupported_ops(model, supported)
    if loop_rnn:
        for node in model.graph.node:
            reason = loop_supported(node) if node.op_type in LOOP_OPS else None
            if reason:
                missing.setdefault(f"{node.op_type} ({reason})", []).append(
                    node.name or node.op_type
                )
    if missing:
        raise UnsupportedOpsError(missing)
