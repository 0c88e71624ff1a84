"""The ``task`` metric: judge each output by the yardstick its task is measured with.

A relative L2 over a raw output passes a super-resolution net that lost 4 dB of PSNR (the
image's mean dominates its norm) and refuses a sentence encoder whose retrieval scores are
intact (a normalized embedding can turn a little without changing any ranking). So each
output is sorted by its shape and values, over all verification batches together:

| kind | output | value (lower is better) | budget |
|---|---|---|---|
| top1 | [batch >= 50, classes >= 2] scores, not unit rows | share of changed argmax | 0.015 |
| rank | [batch, dim] unit-norm rows, or [batch, tokens, dim>=16] | 1 - Spearman rho of the pairwise cosine similarities (1 - mean cosine under 4 rows) | 0.05 |
| nsr | anything else (images, maps, boxes, regression) | rms(new - ref) / std(ref) | 0.05 |
| exact | integer outputs | share of changed values | 0.015 |

rank compares at most MAX_RANK_ROWS rows, evenly spaced through the output: the pairs of N
rows are N^2 / 2 values to sort twice per judgement, and a detector's [batch, anchors, 85]
(8 x 2000 rows, 128 M pairs) took over 20 s a call, minutes in the qdq pass's fallback; the
reference's ranks are kept for the next judgement of the same reference (the fallback
judges hundreds of candidates against one), so each judgement sorts once.
top1's budget grows by one prediction (1/rows): on a small verification set one changed
prediction is noise. A 2-point accuracy loss moves top-1 agreement by 2 points or more; 4 dB of PSNR lost on a
32 dB image net is an nsr near 0.1, while the 0.05 dB of a good int8 model is about 0.01.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

TASK_BUDGETS = {"top1": 0.015, "rank": 0.05, "nsr": 0.05, "exact": 0.015}
UNIT_NORM_TOLERANCE = 1e-2
MIN_RANK_ROWS = 4
MAX_RANK_ROWS = 1024  # 0.5 M pairs: about 0.05 s a judgement
_REFERENCE_RANKS: dict[bytes, np.ndarray] = {}  # the reference rows' digest -> their ranks
_KEPT_REFERENCES = 4
MIN_TOP1_ROWS = 50  # fewer predictions say nothing about accuracy: judged by nsr instead


def as_array(value: object) -> np.ndarray:
    """An onnxruntime output as an array. A sequence of maps with the same keys (what
    scikit-learn's ZipMap writes: one {class: probability} per row) becomes the [rows,
    classes] float array of its values, keys in sorted order, so that it is judged as the
    scores it holds; anything else goes through ``np.asarray``."""
    if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
        keys = sorted(value[0])
        if keys and all(sorted(row) == keys for row in value):
            return np.array([[row[key] for key in keys] for row in value], dtype=np.float64)
    return np.asarray(value)


@dataclass(frozen=True)
class TaskScore:
    kind: str
    value: float
    budget: float

    @property
    def ratio(self) -> float:
        return self.value / self.budget if self.budget > 0 else (0.0 if self.value == 0 else np.inf)


def output_kind(ref: np.ndarray) -> str:
    """Which yardstick an output is judged with (see the module docstring)."""
    if not np.issubdtype(ref.dtype, np.floating):
        return "exact"
    if ref.ndim == 2 and ref.shape[1] >= 2:
        norms = np.linalg.norm(ref.astype(np.float64), axis=1)
        if norms.size and np.all(np.abs(norms - 1.0) < UNIT_NORM_TOLERANCE):
            return "rank"
        return "top1" if ref.shape[0] >= MIN_TOP1_ROWS else "nsr"
    if ref.ndim == 3 and ref.shape[2] >= 16:
        return "rank"
    return "nsr"


def _rank_data(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, np.float64)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    return ranks


def _rank_disagreement(ref: np.ndarray, new: np.ndarray) -> float:
    rows_ref = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    rows_new = new.reshape(-1, new.shape[-1]).astype(np.float64)
    if len(rows_ref) > MAX_RANK_ROWS:
        kept = np.linspace(0, len(rows_ref) - 1, MAX_RANK_ROWS).round().astype(np.int64)
        rows_ref, rows_new = rows_ref[kept], rows_new[kept]
    unit_ref = rows_ref / np.maximum(np.linalg.norm(rows_ref, axis=1, keepdims=True), 1e-12)
    unit_new = rows_new / np.maximum(np.linalg.norm(rows_new, axis=1, keepdims=True), 1e-12)
    if len(unit_ref) < MIN_RANK_ROWS:
        return float(1.0 - np.mean(np.sum(unit_ref * unit_new, axis=1)))
    upper = np.triu_indices(len(unit_ref), 1)
    key = hashlib.blake2b(unit_ref.tobytes(), digest_size=16).digest()
    a = _REFERENCE_RANKS.get(key)
    if a is None:
        ranks = _rank_data((unit_ref @ unit_ref.T)[upper])
        a = ranks - ranks.mean()
        if len(_REFERENCE_RANKS) >= _KEPT_REFERENCES:
            _REFERENCE_RANKS.pop(next(iter(_REFERENCE_RANKS)))
        _REFERENCE_RANKS[key] = a
    b = _rank_data((unit_new @ unit_new.T)[upper])
    b = b - b.mean()
    denom = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    return float(1.0 - np.sum(a * b) / denom) if denom > 0 else 0.0


def task_score(ref: np.ndarray, new: np.ndarray, budget: float | None = None) -> TaskScore:
    """The task metric of one output (all batches concatenated) against its budget."""
    kind = output_kind(ref)
    limit = TASK_BUDGETS[kind] if budget is None else budget
    if ref.size == 0:
        return TaskScore(kind, 0.0, limit)
    if kind == "exact":
        value = float(np.mean(ref != new))
    elif kind == "top1":
        value = float(np.mean(np.argmax(ref, axis=1) != np.argmax(new, axis=1)))
        limit += 1.0 / ref.shape[0]  # one changed prediction is noise on any sample
    elif kind == "rank":
        value = _rank_disagreement(ref, new)
    else:
        ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
        spread = float(np.std(ref64))
        noise = float(np.sqrt(np.mean((new64 - ref64) ** 2)))
        value = noise / spread if spread > 0 else (0.0 if noise == 0 else float("inf"))
    if not np.isfinite(value) or np.isnan(new.astype(np.float64)).any():
        value = float("inf")
    return TaskScore(kind, value, limit)


def concatenated(batches: list[list[np.ndarray]], index: int) -> np.ndarray | None:
    """Output ``index`` of every batch joined along the batch axis (None if shapes differ)."""
    parts = [outputs[index] for outputs in batches]
    if len({p.shape[1:] for p in parts}) != 1 or parts[0].ndim == 0:
        return None
    return np.concatenate(parts, axis=0)
