"""What a distillation run is asked to do and what it reports, shared by the driver
(distill.py) and the training loop (distill_loop.py): the options, the progress callback's
type, the report, the check that torch is installed, and the loss both minimise.

    loss = KL(softmax(t/T) ‖ softmax(s/T))·T²  [+ α·CE(s, labels)]  [+ w·Σ MSE(s_f, t_f)/E t_f²]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from onnxpress.core.errors import OnnxpressError

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
    holdout: float = 0.1  # fraction of samples held out for early stopping (0: none)
    patience: int = 3  # epochs without held-out improvement before stopping
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
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise OnnxpressError(f"distill: invalid option(s) {', '.join(bad)}")
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

    def describe(self) -> str:
        return (
            f"distilled on {self.samples - self.holdout_samples} samples for {self.epochs_run} "
            f"epoch(s) (best {self.best_epoch}) in {self.seconds:.1f}s: held-out loss "
            f"{self.holdout_loss_before:.4f} -> {self.holdout_loss_after:.4f}; {self.metric} "
            f"vs teacher {self.metric_before:.4f} -> {self.metric_after:.4f}"
        )


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
    classification: list[bool],
    options: DistillOptions,
    labels: Any | None,
) -> Any:
    """Soft-target KD (or MSE) per output, hard-label CE, normalised feature MSE."""
    functional = torch.nn.functional
    outputs = len(classification)
    total = student[0].new_zeros(())
    temperature = options.temperature
    for s, t, soft in zip(student[:outputs], teacher[:outputs], classification, strict=True):
        if soft:
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            total = (
                total
                + functional.kl_div(
                    functional.log_softmax(s2 / temperature, -1),
                    functional.log_softmax(t2 / temperature, -1),
                    log_target=True,
                    reduction="batchmean",
                )
                * temperature**2
            )
            if labels is not None and options.alpha > 0:
                total = total + options.alpha * functional.cross_entropy(s2, labels)
        else:
            total = total + functional.mse_loss(s, t)
    for s, t in zip(student[outputs:], teacher[outputs:], strict=True):
        scale = t.pow(2).mean().clamp_min(1e-12)
        total = total + options.feature_weight * functional.mse_loss(s, t) / scale
    return total
