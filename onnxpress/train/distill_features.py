"""Feature (hint) distillation: intermediate student tensors matched to the teacher's.

    loss_f = ‖A(s_f) − t_f‖² / E t_f²    (FitNets-style hints)

Where the student's tensor has fewer channels than the teacher's (a pruned layer), A is a
learned 1×1 adapter along the channel axis, Linear(C_s → C_t) with a bias, started at its
least-squares fit on the untuned student's features and trained with the student. Adapters
live beside the student and are dropped afterwards: the written graph is unchanged. Where
the shapes agree, A is the identity.

``hint_pairs`` infers the pairs for a compressed model: tensors of the same name in both
graphs that feed a Conv, Gemm or MatMul with a constant weight, preferring those whose
channel count differs (the pruned ones), evenly spread and always ending at the last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxpress.core.errors import OnnxpressError
from onnxpress.core.stats import infer_shapes

LINEAR_OPS = ("Conv", "Gemm", "MatMul")
FIT_ROWS = 8192  # rows (positions x samples) the adapter's least-squares start reads


@dataclass(frozen=True)
class FeaturePair:
    """A student tensor matched to a teacher tensor, along ``axis`` when channels differ."""

    student: str
    teacher: str
    axis: int | None  # the channel axis an adapter maps along; None: same shape, no adapter
    student_channels: int
    teacher_channels: int

    def describe(self) -> str:
        adapter = f" (adapter {self.student_channels}->{self.teacher_channels})"
        return f"{self.student}:{self.teacher}" + (adapter if self.axis is not None else "")


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return infer_shapes(model)


def hint_pairs(
    student: onnx.ModelProto, teacher: onnx.ModelProto, limit: int
) -> list[tuple[str, str]]:
    """Up to ``limit`` (student, teacher) tensor names for hint losses (see module doc)."""
    if limit <= 0:
        return []
    s_shapes, t_shapes = _shapes(student), _shapes(teacher)
    inits = {t.name for t in teacher.graph.initializer}
    produced = {o for n in student.graph.node for o in n.output}
    same, differing = [], []
    for node in teacher.graph.node:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name = node.input[0]
        if name not in produced or name not in s_shapes or name not in t_shapes:
            continue
        s_shape, t_shape = s_shapes[name], t_shapes[name]
        if len(s_shape) != len(t_shape):
            continue
        changed = sum(a != b for a, b in zip(s_shape, t_shape, strict=True))
        if changed == 0 and name not in same:
            same.append(name)
        elif changed == 1 and name not in differing:
            differing.append(name)
    chosen = differing or same
    if len(chosen) > limit:
        picks = np.linspace(0, len(chosen) - 1, limit).round().astype(int)
        chosen = [chosen[i] for i in sorted(set(picks.tolist()))]
    return [(name, name) for name in chosen]


def feature_pairs(
    pairs: Sequence[tuple[str, str]],
    student_values: Mapping[str, np.ndarray],
    teacher_values: Mapping[str, np.ndarray],
) -> list[FeaturePair]:
    """Each pair with its channel axis, from sample values of both sides."""
    out = []
    for s_name, t_name in pairs:
        s, t = student_values[s_name], teacher_values[t_name]
        if s.shape == t.shape:
            out.append(FeaturePair(s_name, t_name, None, 0, 0))
            continue
        differ = [i for i in range(s.ndim) if s.ndim == t.ndim and s.shape[i] != t.shape[i]]
        if len(differ) != 1 or differ[0] == 0:
            raise OnnxpressError(
                f"distill: feature pair {s_name}:{t_name} has shapes {list(s.shape)} and "
                f"{list(t.shape)}; an adapter needs them to differ in one channel axis"
            )
        axis = differ[0]
        out.append(FeaturePair(s_name, t_name, axis, int(s.shape[axis]), int(t.shape[axis])))
    return out


def _rows(values: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(values.astype(np.float64), axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    step = max(1, len(flat) // FIT_ROWS)
    return flat[::step]


def build_adapters(
    torch: Any,
    pairs: Sequence[FeaturePair],
    student_values: Mapping[str, np.ndarray],
    teacher_values: Mapping[str, np.ndarray],
) -> Any:
    """One Linear per pair with an axis (least-squares start), identity placeholders else."""
    adapters = torch.nn.ModuleList()
    for pair in pairs:
        if pair.axis is None:
            adapters.append(torch.nn.Identity())
            continue
        s = _rows(student_values[pair.student], pair.axis)
        t = _rows(teacher_values[pair.teacher], pair.axis)
        design = np.hstack([s, np.ones((len(s), 1))])
        ridge = 1e-6 * max(float(np.trace(design.T @ design)) / design.shape[1], 1e-12)
        solution = np.linalg.solve(
            design.T @ design + ridge * np.eye(design.shape[1]), design.T @ t
        )
        linear = torch.nn.Linear(pair.student_channels, pair.teacher_channels)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(solution[:-1].T.astype(np.float32)))
            linear.bias.copy_(torch.from_numpy(solution[-1].astype(np.float32)))
        adapters.append(linear)
    return adapters


def feature_loss(torch: Any, student: Any, teacher: Any, pair: FeaturePair, adapter: Any) -> Any:
    """‖A(s) − t‖² / E t², A applied along the pair's channel axis."""
    if pair.axis is not None:
        moved = torch.movedim(student, pair.axis, -1)
        student = torch.movedim(adapter(moved), -1, pair.axis)
    scale = teacher.pow(2).mean().clamp_min(1e-12)
    return torch.nn.functional.mse_loss(student, teacher) / scale
