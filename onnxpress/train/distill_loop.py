"""The distillation training loop: split, minibatch Adam, early stopping, write-back.

Called by ``onnxpress.train.distill.distill`` inside its deterministic torch settings. Shuffling
uses a private seeded ``torch.Generator``; nothing else is random. The held-out loss is
measured before training (epoch 0) and after each epoch; the best state is restored, so a
run that does not help returns the student's own weights and its report says so
(``improved`` False, ``verdict`` "no improvement: kept the input weights" and why). A loss
that is NaN, infinite or negative (every term is a divergence or a squared error) is a
``DistillError``: it means the loss does not measure what it should.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from onnxpress.core.errors import OnnxpressError
from onnxpress.core.verify import Runner
from onnxpress.train.distill_options import (
    NO_IMPROVEMENT,
    DistillOptions,
    DistillProgress,
    DistillReport,
    LossPlan,
    distill_loss,
)

logger = logging.getLogger(__name__)
# A loss this far below zero is not float rounding of a divergence that is ~0.
NEGATIVE_TOLERANCE = 1e-6
# Held-out loss at or below this before training: the student already matches its teacher.
FLAT_LOSS = 1e-7


class DistillError(OnnxpressError):
    """The distillation loss is degenerate (NaN, infinite or negative)."""


def check_loss(value: float, where: str) -> None:
    if not np.isfinite(value):
        raise DistillError(f"distill: the loss is {value} {where}; nothing was written")
    if value < -NEGATIVE_TOLERANCE:
        raise DistillError(
            f"distill: the loss is negative ({value:.3g}) {where}: it is not a divergence "
            "between student and teacher; nothing was written"
        )


def verdict(report: DistillReport) -> tuple[bool, str]:
    """(improved, why): improved when a trained epoch lowered the held-out loss."""
    if report.best_epoch > 0:
        return True, "improved"
    if report.holdout_loss_before <= FLAT_LOSS:
        why = (
            f"the held-out loss is {report.holdout_loss_before:.3g} from the start: the "
            "student already matches the teacher on this data"
        )
    elif report.epochs_run == 0:
        why = "no epochs were run"
    else:
        losses = [held for _, held in report.history]
        spread = max(losses) - min(losses)
        if spread <= 1e-6 * max(abs(report.holdout_loss_before), 1e-12):
            why = f"the held-out loss stayed flat at {report.holdout_loss_before:.4g}"
        else:
            why = (
                f"no epoch lowered the held-out loss below {report.holdout_loss_before:.4g} "
                "(try a lower --lr or more data)"
            )
    return False, f"{NO_IMPROVEMENT} ({why})"


def split_rows(count: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(count)
    held = round(holdout * count) if count >= 2 and holdout > 0 else 0
    held = min(max(held, 1 if holdout > 0 and count >= 2 else 0), count - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def train(
    torch: Any,
    student: onnx.ModelProto,
    samples: Mapping[str, np.ndarray],
    targets: list[np.ndarray],
    plan: LossPlan,
    labels: np.ndarray | None,
    options: DistillOptions,
    on_progress: DistillProgress | None,
) -> tuple[onnx.ModelProto, DistillReport]:
    from onnxpress.train.torch_convert import convert, write_back

    module = convert(student, options.learn_scales)
    extra = plan.student_tensors
    outputs = len(module.output_names)
    count = len(targets[0])
    train_rows, held_rows = split_rows(count, options.holdout, options.seed)
    inputs = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in samples.items()}
    teacher = [torch.from_numpy(np.ascontiguousarray(t)) for t in targets]
    label_tensor = torch.from_numpy(labels) if labels is not None else None

    def loss_on(rows: Any) -> Any:
        feed = {name: value[rows] for name, value in inputs.items()}
        out = module(feed, extra)[outputs:]
        return distill_loss(
            torch,
            out,
            [t[rows] for t in teacher],
            plan,
            options,
            None if label_tensor is None else label_tensor[rows],
        )

    def evaluate(rows: np.ndarray) -> float:
        if len(rows) == 0:
            return float("nan")
        with torch.no_grad():
            index = torch.from_numpy(rows)
            losses = [
                float(loss_on(index[i : i + 256])) * len(index[i : i + 256])
                for i in range(0, len(index), 256)
            ]
        return sum(losses) / len(rows)

    groups = [{"params": list(module.weights.parameters()), "lr": options.lr}]
    if len(list(plan.adapters.parameters())):
        groups.append({"params": list(plan.adapters.parameters()), "lr": options.lr})
    if len(module.scales):
        groups.append({"params": list(module.scales.parameters()), "lr": options.lr / 10})
    optimizer = torch.optim.Adam(groups, weight_decay=options.weight_decay)
    steps = options.epochs * -(-len(train_rows) // options.batch_size)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
        if options.schedule == "cosine"
        else None
    )
    generator = torch.Generator().manual_seed(options.seed)
    select_rows = held_rows if len(held_rows) else train_rows
    best_loss = evaluate(select_rows)
    check_loss(best_loss, "before training")
    before = best_loss
    best_state, best_epoch, stale, epochs_run = copy.deepcopy(module.state_dict()), 0, 0, 0
    history = [(evaluate(train_rows), best_loss)]
    if on_progress is not None:
        on_progress(0, options.epochs, history[0][0], best_loss)
    train_index = torch.from_numpy(train_rows)
    for epoch in range(1, options.epochs + 1):
        module.train()
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        total = 0.0
        for start in range(0, len(order), options.batch_size):
            rows = order[start : start + options.batch_size]
            optimizer.zero_grad()
            loss = loss_on(rows)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                for scale in module.scales:
                    scale.clamp_(min=1e-8)
            total += float(loss.detach()) * len(rows)
        check_loss(total / max(len(order), 1), f"in epoch {epoch}")
        held = evaluate(select_rows)
        history.append((total / max(len(order), 1), held))
        epochs_run = epoch
        if on_progress is not None:
            on_progress(epoch, options.epochs, history[-1][0], held)
        if held < best_loss - 1e-7:
            best_loss, best_epoch, stale = held, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        else:
            stale += 1
            if stale >= options.patience:
                logger.info("distill: early stop after epoch %d (best %d)", epoch, best_epoch)
                break
    module.load_state_dict(best_state)
    if best_epoch == 0:  # bit for bit the input's weights, not a float round trip of them
        tuned = onnx.ModelProto()
        tuned.CopyFrom(student)
    else:
        tuned = write_back(student, module)
    agreement = _torch_vs_runtime(torch, module, tuned, inputs)
    report = DistillReport(
        samples=count,
        holdout_samples=len(held_rows),
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        holdout_loss_before=before,
        holdout_loss_after=best_loss,
        metric="",
        metric_before=float("nan"),
        metric_after=float("nan"),
        torch_vs_onnxruntime=agreement,
        seconds=0.0,
        trained_tensors=len(module.param_index) + len(module.scale_index),
        history=history,
    )
    report.improved, report.verdict = verdict(report)
    return tuned, report


def _torch_vs_runtime(
    torch: Any, module: Any, tuned: onnx.ModelProto, inputs: Mapping[str, Any]
) -> float:
    """Max-rel difference of the tuned graph in torch and on onnxruntime (first 64 samples)."""
    feed = {name: value[:64] for name, value in inputs.items()}
    with torch.no_grad():
        ours = [t.numpy() for t in module(feed)]
    theirs = Runner(tuned)({name: value.numpy() for name, value in feed.items()})
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        scale = max(float(np.max(np.abs(b))), 1e-12) if b.size else 1.0
        worst = max(worst, float(np.max(np.abs(a - b))) / scale if b.size else 0.0)
    return worst
