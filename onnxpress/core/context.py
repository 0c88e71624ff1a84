"""What a pass may use besides the graph: calibration data, a seed, the original model
(the teacher for distillation), a cache of analyses and, optionally, a store of calibration
statistics shared across runs (``onnxpress.calibration.cache``: a search's trials reuse what
an earlier trial observed on the same graph prefix).

An analysis is a class with ``compute(graph, ctx)``; ``ctx.analysis(Cls)`` computes it once
and caches it. After each pass the manager drops every cached analysis the pass does not
list in ``preserves``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.ir import to_model
from onnxpress.core.stats import shape_skeleton
from onnxpress.core.targets import Target, parse_targets


class Analysis(Protocol):
    @classmethod
    def compute(cls, graph: gs.Graph, ctx: PassContext) -> Any: ...


AnalysisT = TypeVar("AnalysisT")


class StatisticsStore(Protocol):
    """Named arrays by key, kept across pass-manager runs (``calibration.cache``)."""

    def load(self, key: str) -> dict[str, np.ndarray] | None: ...

    def store(self, key: str, state: dict[str, np.ndarray]) -> None: ...


@dataclass
class PassContext:
    template: onnx.ModelProto
    original: onnx.ModelProto
    calibration: CalibrationData | None = None
    seed: int = 0
    # the hardware the model must hold on (optimize --target); int8 passes read it
    targets: tuple[Target, ...] = field(default_factory=lambda: parse_targets(None))
    targets_named: bool = False  # the user named them (optimize for speed there), or defaults
    statistics: StatisticsStore | None = None  # calibration statistics reused across runs
    _analyses: dict[type, Any] = field(default_factory=dict)

    @property
    def opset(self) -> int:
        """The model's version of the default ONNX domain (0 when it imports none)."""
        versions = [o.version for o in self.template.opset_import if o.domain in ("", "ai.onnx")]
        return max(versions, default=0)

    def opset_of(self, graph: gs.Graph) -> int:
        """The default domain's version that ``graph`` is at now: its own ``opset`` (which a
        pass such as upgrade-opset raises) where set, else the input model's."""
        return int(graph.opset or 0) or self.opset

    def analysis(self, cls: type[AnalysisT], graph: gs.Graph) -> AnalysisT:
        if cls not in self._analyses:
            self._analyses[cls] = cls.compute(graph, self)  # type: ignore[attr-defined]
        result: AnalysisT = self._analyses[cls]
        return result

    def invalidate(self, keep: tuple[type, ...] = ()) -> None:
        self._analyses = {k: v for k, v in self._analyses.items() if k in keep}

    def export(self, graph: gs.Graph) -> onnx.ModelProto:
        """The graph as a ModelProto with the input model's metadata, e.g. to run it."""
        return to_model(graph, self.template)

    def rng(self, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng(self.seed + salt)


class TensorShapes:
    """Tensor name -> inferred shape (None for unknown dims) and element type (an ONNX
    TensorProto code) from ONNX shape inference."""

    def __init__(
        self, shapes: dict[str, list[int | None]], types: dict[str, int] | None = None
    ) -> None:
        self.shapes = shapes
        self.types = types or {}

    @classmethod
    def compute(cls, graph: gs.Graph, ctx: PassContext) -> TensorShapes:
        # the large weights as typed inputs: inference reads only their shapes
        model = shape_skeleton(ctx.export(graph))
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        shapes: dict[str, list[int | None]] = {}
        types: dict[str, int] = {}
        g = inferred.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            t = vi.type.tensor_type
            if t.elem_type:
                types[vi.name] = t.elem_type
            if t.HasField("shape"):
                shapes[vi.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
                ]
        for tensor in g.initializer:
            shapes[tensor.name] = list(tensor.dims)
            types[tensor.name] = tensor.data_type
        return cls(shapes, types)

    def get(self, name: str) -> list[int | None] | None:
        return self.shapes.get(name)

    def elem_type(self, name: str) -> int | None:
        return self.types.get(name)
