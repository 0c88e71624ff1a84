"""What a distillation run is asked to do and what it reports, shared by the driver
(distill.py) and the training loop (distill_loop.py): the options, the progress callback's
type, the report, the check that torch is installed, and the loss both minimise.

    loss = Σ_heads KD(s, t)  [+ α·CE(s, labels)]  [+ w·Σ ‖A(s_f) − t_f‖²/E t_f²]

KD is temperature KL on logits found through a Softmax, or on probabilities, per time step
for sequence outputs (``distill_heads``); A is the hint adapter (``distill_features``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from onnxpress.core.errors import OnnxpressError
from onnxpress.train.distill_features import FeaturePair, feature_loss
from onnxpress.train.distill_heads import Head, as_logits, class_rows, head_loss

NO_IMPROVEMENT = "no improvement: kept the input weights"

# on_progress(epoch, epochs, train_loss, holdout_loss); epoch 0 is the untuned student.
DistillProgress = Callable[[int, int, float, float], None]


class TrainingUnavailableError(OnnxpressError):
    """torch is not installed."""


@dataclass(frozen=True)
class DistillOptions:
    epochs: int = 10
    lr: float = 1e-3
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the hard-label cross-entropy (only with labels)
    batch_size: int = 32
    feature_losses: tuple[tuple[str, str], ...] = ()  # (student tensor, teacher tensor)
    feature_weight: float = 1.0
    hints: int = 0  # hint pairs inferred between student and teacher (adapters where pruned)
    holdout: float = 0.1  # fraction of samples held out for early stopping (0: none)
    patience: int = 3  # epochs without held-out improvement before stopping
    # learning rate over the steps: constant, or a half cosine from lr down to 0 over the
    # planned epochs (the last epochs fine-tune at small steps)
    schedule: Literal["constant", "cosine"] = "cosine"
    learn_scales: bool = True  # QDQ scales are trained (learning rate lr / 10)
    weight_decay: float = 0.0
    task: Literal["auto", "classification", "regression"] = "auto"
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 0,
            "lr": self.lr > 0,
            "temperature": self.temperature > 0,
            "alpha": self.alpha >= 0,
            "batch-size": self.batch_size >= 1,
            "holdout": 0 <= self.holdout < 1,
            "patience": self.patience >= 1,
            "threads": self.threads >= 1,
            "feature-weight": self.feature_weight >= 0,
            "hints": self.hints >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise OnnxpressError(f"distill: invalid option(s) {', '.join(bad)}")
        if self.schedule not in ("constant", "cosine"):
            raise OnnxpressError("distill: schedule must be constant or cosine")
        if self.task not in ("auto", "classification", "regression"):
            raise OnnxpressError("distill: task must be auto, classification or regression")


@dataclass
class DistillReport:
    """What a distillation run did; losses are the distillation loss on the held-out split."""

    samples: int
    holdout_samples: int
    epochs_run: int
    best_epoch: int
    holdout_loss_before: float
    holdout_loss_after: float
    metric: str
    metric_before: float  # student vs teacher on all samples, onnxruntime
    metric_after: float
    torch_vs_onnxruntime: float  # max-rel of the tuned model's outputs, torch vs onnxruntime
    seconds: float
    trained_tensors: int
    history: list[tuple[float, float]] = field(default_factory=list)  # (train, holdout)
    improved: bool = True  # the held-out loss fell: False means the input weights were kept
    verdict: str = ""  # "improved", or NO_IMPROVEMENT and why
    heads: list[str] = field(default_factory=list)  # what each output was distilled as
    features: list[str] = field(default_factory=list)  # student:teacher pairs (adapted or not)
    holdout_metric_before: float = float("nan")  # the metric on the held-out split only
    holdout_metric_after: float = float("nan")

    def describe(self) -> str:
        text = (
            f"distilled on {self.samples - self.holdout_samples} samples for {self.epochs_run} "
            f"epoch(s) (best {self.best_epoch}) in {self.seconds:.1f}s: held-out loss "
            f"{self.holdout_loss_before:.4g} -> {self.holdout_loss_after:.4g}; {self.metric} "
            f"vs teacher {self.metric_before:.4f} -> {self.metric_after:.4f}"
        )
        if self.holdout_samples:
            text += (
                f" (held-out {self.holdout_metric_before:.4f} -> {self.holdout_metric_after:.4f})"
            )
        return text if self.improved else f"{self.verdict}\n{text}"


@dataclass
class LossPlan:
    """What the loss compares: per output (student head, teacher head), then feature pairs.

    Student and teacher values arrive as lists in the order of ``student_tensors`` and
    ``teacher_tensors``: the heads' tensors, then the features'.
    """

    heads: list[tuple[Head, Head]]
    features: list[FeaturePair]
    adapters: Any  # torch ModuleList, one per feature pair (Identity where shapes agree)

    @property
    def student_tensors(self) -> list[str]:
        return [s.tensor for s, _ in self.heads] + [f.student for f in self.features]

    @property
    def teacher_tensors(self) -> list[str]:
        return [t.tensor for _, t in self.heads] + [f.teacher for f in self.features]


def require_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise TrainingUnavailableError("distill needs torch: install onnxpress[train]") from None
    return torch


def distill_loss(
    torch: Any,
    student: list[Any],
    teacher: list[Any],
    plan: LossPlan,
    options: DistillOptions,
    labels: Any | None,
) -> Any:
    """KD per head, hard-label CE on single-row class heads, normalised hint losses."""
    functional = torch.nn.functional
    total = student[0].new_zeros(())
    for (s_head, t_head), s, t in zip(plan.heads, student, teacher, strict=False):
        total = total + head_loss(torch, s, t, t_head, options.temperature)
        if labels is not None and options.alpha > 0 and s_head.kind != "regression":
            rows = as_logits(torch, class_rows(torch, s, s_head), s_head.kind)
            total = total + options.alpha * functional.cross_entropy(rows, labels)
    offset = len(plan.heads)
    for index, pair in enumerate(plan.features):
        loss = feature_loss(
            torch, student[offset + index], teacher[offset + index], pair, plan.adapters[index]
        )
        total = total + options.feature_weight * loss
    return total
