"""What distillation compares at each graph output: logits, probabilities or values.

A graph output produced by Softmax or LogSoftmax (through Identity nodes) is looked through:
the tensor distilled is the Softmax input, the logits, and the loss is temperature KD

    KL(softmax(t/T) ‖ softmax(s/T))·T²   along the Softmax axis,

averaged over every other position, so a sequence output [batch, time, classes] (a CTC head)
is distilled per time step, its blank class like any other. An output with no Softmax in
front that holds probabilities (non-negative, summing to 1 along the last axis) gets the same
loss with log p as logits: at T = 1 that is KL(t ‖ s) on the probabilities themselves, and
log p differs from the logits only by a per-row constant, which softmax ignores. Outputs of
log-probabilities are logits already. Other float outputs with a last axis of 2 or more are
taken as logits, the rest as regression (MSE). ``head_plan`` pairs the teacher's heads with
the student's by output position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

HeadKind = Literal["logits", "probabilities", "log-probabilities", "regression"]
SOFTMAX_OPS = ("Softmax", "LogSoftmax")
PROBABILITY_TOLERANCE = 1e-3  # |Σ p − 1| allowed per row for an output to count as probabilities
LOG_FLOOR = 1e-30  # probabilities are clamped here before the log (float32 keeps them normal)


@dataclass(frozen=True)
class Head:
    """One graph output as distillation sees it."""

    output: str  # the graph output
    kind: HeadKind
    tensor: str  # the tensor compared: the Softmax input when looked through, else the output
    axis: int  # the class axis of ``tensor`` (-1 unless a Softmax says otherwise)
    flatten_from_axis: bool  # opset < 13 Softmax: classes are all dims from ``axis`` on
    softmax: str | None  # the node looked through

    def describe(self) -> str:
        where = f" (through {self.softmax})" if self.softmax else ""
        return f"{self.output}: {self.kind} at {self.tensor}{where}"


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)


def softmax_producer(model: onnx.ModelProto, output: str) -> onnx.NodeProto | None:
    """The Softmax/LogSoftmax whose result is ``output`` (through Identity nodes), or None."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(output)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    return node if node is not None and node.op_type in SOFTMAX_OPS else None


def _looks_like(values: np.ndarray) -> HeadKind | None:
    """probabilities / log-probabilities along the last axis, judged on the teacher's values."""
    if values.ndim < 2 or values.shape[-1] < 2 or not np.issubdtype(values.dtype, np.floating):
        return None
    if not np.all(np.isfinite(values)):
        return None
    wide = values.astype(np.float64)
    if wide.min() >= 0 and np.abs(wide.sum(-1) - 1).max() <= PROBABILITY_TOLERANCE:
        return "probabilities"
    if wide.max() <= 0 and np.abs(np.exp(wide).sum(-1) - 1).max() <= PROBABILITY_TOLERANCE:
        return "log-probabilities"
    return None


def find_head(model: onnx.ModelProto, output: str, values: np.ndarray | None, task: str) -> Head:
    """How ``output`` of ``model`` is distilled; ``values`` are the teacher's, when known."""
    if task == "regression":
        return Head(output, "regression", output, -1, False, None)
    node = softmax_producer(model, output)
    if node is not None:
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        legacy = _opset(model) < 13
        default = 1 if legacy else -1
        return Head(
            output,
            "logits",
            node.input[0],
            default if axis is None else axis,
            legacy,
            node.name or node.output[0],
        )
    seen = _looks_like(values) if values is not None else None
    if seen is not None:
        return Head(output, seen, output, -1, False, None)
    classify = task == "classification" or (
        values is not None
        and values.ndim >= 2
        and values.shape[-1] >= 2
        and np.issubdtype(values.dtype, np.floating)
    )
    return Head(output, "logits" if classify else "regression", output, -1, False, None)


def head_plan(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    teacher_outputs: list[np.ndarray],
    task: str,
) -> list[tuple[Head, Head]]:
    """(student head, teacher head) per graph output, in output order.

    When only one side has a Softmax to look through, both compare probabilities (the
    output itself), so the two sides always hold the same kind of value.
    """
    pairs = []
    for s_out, t_out, values in zip(
        student.graph.output, teacher.graph.output, teacher_outputs, strict=True
    ):
        t_head = find_head(teacher, t_out.name, values, task)
        s_head = find_head(student, s_out.name, values, task)
        if (t_head.softmax is None) != (s_head.softmax is None) or (
            t_head.softmax is not None and t_head.axis != s_head.axis
        ):
            kind: HeadKind = "log-probabilities" if _is_log(teacher, t_head) else "probabilities"
            t_head = Head(t_out.name, kind, t_out.name, t_head.axis, t_head.flatten_from_axis, None)
            s_head = Head(s_out.name, kind, s_out.name, t_head.axis, t_head.flatten_from_axis, None)
        pairs.append((s_head, t_head))
    return pairs


def _is_log(model: onnx.ModelProto, head: Head) -> bool:
    node = softmax_producer(model, head.output)
    return head.kind == "log-probabilities" or (node is not None and node.op_type == "LogSoftmax")


def class_rows(torch: Any, value: Any, head: Head) -> Any:
    """``value`` as [rows, classes]: the class axis moved last (or the legacy 2-D coercion)."""
    axis = head.axis % value.dim()
    if head.flatten_from_axis:
        return value.reshape(math.prod(value.shape[:axis]), -1)
    return torch.movedim(value, axis, -1).reshape(-1, value.shape[axis])


def as_logits(torch: Any, value: Any, kind: HeadKind) -> Any:
    """What softmax is taken of: logits as they are, log of probabilities (clamped)."""
    if kind == "probabilities":
        return torch.log(value.clamp_min(LOG_FLOOR))
    return value


def head_loss(torch: Any, student: Any, teacher: Any, head: Head, temperature: float) -> Any:
    """Temperature KD per row (every position of the other axes), or MSE for regression."""
    functional = torch.nn.functional
    if head.kind == "regression":
        return functional.mse_loss(student, teacher)
    s_rows = as_logits(torch, class_rows(torch, student, head), head.kind)
    t_rows = as_logits(torch, class_rows(torch, teacher, head), head.kind)
    loss = functional.kl_div(
        functional.log_softmax(s_rows / temperature, -1),
        functional.log_softmax(t_rows / temperature, -1),
        log_target=True,
        reduction="batchmean",
    )
    return loss * temperature**2


def is_sequence(head: Head, value: np.ndarray) -> bool:
    """More than one row per sample: a [batch, time, classes] output and the like."""
    if head.kind == "regression" or value.ndim < 2:
        return False
    axis = head.axis % value.ndim
    if head.flatten_from_axis:
        return math.prod(value.shape[1:axis]) > 1
    return value.ndim > 2 or axis != value.ndim - 1
