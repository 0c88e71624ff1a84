"""upgrade-opset: an old model converted to a newer version of the default ONNX domain with
onnx's version converter (``to``, default 13), checked with ``onnx.checker``.

Models exported years ago (the ONNX model zoo's classics, opsets 7-9) use ops that later
opsets replaced: Upsample (Resize from opset 10), BatchNormalization with ``spatial``,
Dropout with ``is_test``, Resize-10 (opset 11's Resize took coordinate modes). Tools that
read ONNX follow the newer forms first: TVM's Relax importer failed on Upsample-9 (its
scales input read as None) and on Resize-10, and resized Upsample-7 (scales as an
attribute) at the wrong coordinates, max-rel 0.56 against onnxruntime (docs/BENCHMARKS.md,
run 26). ``onnxpress compile`` runs this pass first with ``below=11``
(backends/tvm/prepare.py); the qdq pass upgrades to 13 itself, for DequantizeLinear's
``axis``.

The converter turns Upsample (and Resize-10) into a Resize without its coordinate mode,
which opset 11 then reads as half_pixel; this pass sets the modes those ops had (asymmetric,
nearest rounding down). ``below``: only models whose opset is lower are converted (0: those
below ``to``). A model the converter cannot convert is left as it is, refused with the
converter's complaint.
Verified like any lossless pass: the converted model must compute what the input did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs
from onnx import helper, version_converter

from onnxpress.core.context import PassContext
from onnxpress.core.ir import adopt
from onnxpress.core.pass_base import Pass, PassResult
from onnxpress.core.registry import register_pass

OLDEST = 7  # the version converter's adapters start at opset 7 (ai.onnx 1.2)
RESIZE_10 = 10  # Upsample (to 9) and Resize-10 map output to input coordinates by x / scale


@dataclass(frozen=True)
class UpgradeOpsetOptions:
    to: int = 13
    below: int = 0  # convert only models whose opset is lower (0: lower than ``to``)

    def __post_init__(self) -> None:
        newest = onnx.defs.onnx_opset_version()
        for name in ("to", "below"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, not {value!r}")
        if not OLDEST < self.to <= newest:
            raise ValueError(f"to must be an opset in {OLDEST + 1}..{newest}, not {self.to}")
        if self.below < 0 or self.below > self.to:
            raise ValueError(f"below must be in 0..to ({self.to}), not {self.below}")


def upgrade_opset(
    graph: gs.Graph, export: Callable[[gs.Graph], onnx.ModelProto], version: int
) -> str | None:
    """Convert ``graph`` in place to opset ``version`` with onnx's version converter (checked
    with ``onnx.checker``). None on success, else the converter's complaint in one line."""
    try:
        model = export(graph)
        converted = version_converter.convert_version(model, version)
        if _opset(model) <= RESIZE_10 < version:
            _asymmetric_resizes(converted)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    adopt(graph, converted)
    graph.opset = version
    return None


def _opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return max(versions, default=0)


def _asymmetric_resizes(model: onnx.ModelProto) -> None:
    """Give every Resize of the main graph Upsample's and Resize-10's coordinates: input
    coordinate = output coordinate / scale ("asymmetric"), nearest rounding down ("floor").
    The converter's Resize carries no coordinate_transformation_mode, so it took opset 11's
    default (half_pixel): a linear Upsample x2 moved by a quarter pixel, max-rel 0.38."""
    for node in model.graph.node:
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx"):
            continue
        mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
        kept = [
            a
            for a in node.attribute
            if a.name not in ("coordinate_transformation_mode", "nearest_mode")
        ]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        if mode == b"nearest":
            node.attribute.append(helper.make_attribute("nearest_mode", "floor"))


@register_pass("upgrade-opset")
class UpgradeOpset(Pass[UpgradeOpsetOptions]):
    """Convert an old model to a newer opset of the default domain (onnx's converter)."""

    options_type = UpgradeOpsetOptions
    lossless = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        result = PassResult()
        opset = int(graph.opset or ctx.opset)
        limit = self.options.below or self.options.to
        if not opset or opset >= limit:
            return result
        if opset < OLDEST:
            result.refuse("<model>", f"opset {opset}: the version converter starts at {OLDEST}")
            return result
        failure = upgrade_opset(graph, ctx.export, self.options.to)
        if failure is not None:
            result.refuse(
                "<model>",
                f"opset {opset} -> {self.options.to}: onnx's version converter failed ({failure})",
            )
            return result
        result.count("upgraded")
        result.details.append({"opset_upgraded": {"from": opset, "to": self.options.to}})
        return result
