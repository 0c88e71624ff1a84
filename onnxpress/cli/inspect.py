"""``onnxpress inspect`` (a model's opset, inputs/outputs, op histogram, params, MACs) and
``onnxpress passes`` (every registered pass with its options), as tables or ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from onnxpress.analysis.saturation import assess
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.int8_layers import integer_layers
from onnxpress.core.io import prepare_model
from onnxpress.core.options import describe_type, option_fields
from onnxpress.core.registry import all_passes
from onnxpress.core.stats import describe_io, model_stats
from onnxpress.core.targets import parse_targets
from onnxpress.core.verify import random_inputs
from onnxpress.report.render import human, table


def passes_command(args: argparse.Namespace) -> int:
    registry = all_passes()
    entries: list[dict[str, Any]] = []
    for name, cls in registry.items():
        options = [
            {
                "name": opt_name,
                "type": describe_type(tp),
                "default": None if default is _MISSING else default,
            }
            for opt_name, tp, default in option_fields(cls.options_type)
        ]
        entries.append(
            {
                "name": name,
                "description": cls.description(),
                "lossless": cls.lossless,
                "metric": None if cls.lossless else cls.metric,
                "options": options,
            }
        )
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    for entry in entries:
        kind = "lossless" if entry["lossless"] else f"lossy, judged by {entry['metric']}"
        print(f"{entry['name']}  ({kind})")
        print(f"    {entry['description']}")
        for opt in entry["options"]:
            print(f"    {opt['name']}: {opt['type']} = {_fmt_default(opt['default'])}")
        print()
    return 0


_MISSING: Any = __import__("dataclasses").MISSING


def _fmt_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ",".join(map(str, value)) + "]"
    return "none" if value is None else str(value)


def _saturation(args: argparse.Namespace, model: Any) -> dict[str, Any] | None:
    """The int8 layers that saturate on the named (or default) targets, for a QDQ model."""
    targets = parse_targets(args.target)
    calibration = CalibrationData.coerce(args.calibration) if args.calibration else None
    if not integer_layers(model):
        return None
    saturating = [t.name for t in targets if t.saturates]
    if not saturating:
        return {"targets": [t.name for t in targets], "saturating": [], "layers": []}
    if calibration is not None:
        calibration.validate(model)
        batches = list(calibration.batches(limit=8))
    else:
        batches = random_inputs(model, args.seed if hasattr(args, "seed") else 0)
    risks = [r for r in assess(model, batches) if r.at_risk]
    return {
        "targets": [t.name for t in targets],
        "saturating": saturating,
        "data": "calibration" if calibration is not None else "random",
        "layers": [r.to_json() for r in risks],
    }


def inspect_command(args: argparse.Namespace) -> int:
    model, source = prepare_model(args.model)
    stats = model_stats(model)
    io = describe_io(model)
    info = {
        "file": source,
        "file_bytes": os.path.getsize(source),
        "ir_version": model.ir_version,
        "opsets": {op.domain or "ai.onnx": op.version for op in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        **io,
        **stats.to_json(),
    }
    saturation = _saturation(args, model)
    if saturation is not None:
        info["int8_saturation"] = saturation
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    print(f"{source}: {human(info['file_bytes'], 'B')}, IR {model.ir_version}, opset {opsets}")
    if info["producer"]:
        print(f"producer: {info['producer']}")
    print()
    rows = [["input", e["name"], e["dtype"], _shape(e["shape"])] for e in io["inputs"]]
    rows += [["output", e["name"], e["dtype"], _shape(e["shape"])] for e in io["outputs"]]
    print(table(["", "name", "dtype", "shape"], rows))
    print()
    print(
        f"nodes {stats.nodes}, params {human(stats.params)} ({stats.params}), "
        f"MACs {human(stats.macs)} at batch 1"
    )
    print()
    op_rows = [
        [op, count, human(stats.macs_by_op.get(op, 0)) if op in stats.macs_by_op else ""]
        for op, count in stats.op_histogram.items()
    ]
    print(table(["op", "count", "MACs"], op_rows, right=(1, 2)))
    if saturation is not None:
        print()
        _print_saturation(saturation)
    return 0


def _print_saturation(saturation: dict[str, Any]) -> None:
    if not saturation["saturating"]:
        print(f"int8: no int16 pair saturation on {', '.join(saturation['targets'])}")
        return
    layers = saturation["layers"]
    where = ", ".join(saturation["saturating"])
    print(
        f"int8 on {where} (u8 x s8 pairs summed in int16): {len(layers)} layer(s) saturate; "
        f"error = rel-L2 of the layer output against exact int32 sums, on "
        f"{saturation['data']} inputs; `onnxpress optimize --target ...` repairs them"
    )
    if layers:
        rows = [
            [r["layer"], r["op"], f"{r['pairs_at_risk']}/{r['pairs']}", f"{r['error']:.4f}"]
            for r in layers
        ]
        print(table(["layer", "op", "pairs at risk", "error"], rows, right=(2, 3)))


def _shape(shape: list[Any] | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"
