"""Streaming range observers and the four ways to turn what they saw into a clipping range.

Observers see one batch at a time and keep a state whose size never depends on how many
batches they have seen: ``MinMaxObserver`` keeps running extremes (per tensor or per channel),
``HistogramObserver`` keeps a fixed number of bins on a uniform grid that always has an edge
at zero and widens by merging whole bins (exactly, never by interpolation), and
``MeanObserver`` keeps running per-channel sums. The range methods read a histogram:

* ``minmax``: the observed extremes;
* ``percentile``: the p-th percentile of |x| (symmetric) or of each tail (asymmetric);
* ``entropy``: TensorRT's KL-divergence threshold search over the histogram;
* ``mse``: the clipping range that minimises the expected quantization error.

Every method returns a range that contains zero, as quantization requires.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

RangeMethod = Literal["minmax", "percentile", "entropy", "mse"]
RANGE_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")


class MinMaxObserver:
    """Running min and max, over the whole tensor or per channel of ``axis``."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.min: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64)
        if self.axis is None:
            lo, hi = np.array(x.min()), np.array(x.max())
        else:
            moved = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)
            lo, hi = moved.min(axis=1), moved.max(axis=1)
        self.min = lo if self.min is None else np.minimum(self.min, lo)
        self.max = hi if self.max is None else np.maximum(self.max, hi)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.min, self.max) if a is not None)


class MeanObserver:
    """Running mean per channel of ``axis`` (over every other axis)."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64)
        moved = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1)
        total = moved.sum(axis=1)
        self.sum = total if self.sum is None else self.sum + total
        self.count += moved.shape[1]

    @property
    def mean(self) -> np.ndarray:
        if self.sum is None:
            raise ValueError("MeanObserver saw no data")
        return self.sum / max(self.count, 1)

    @property
    def nbytes(self) -> int:
        return 0 if self.sum is None else self.sum.nbytes


class HistogramObserver:
    """A fixed-size histogram on a zero-aligned uniform grid that widens as data arrives.

    Bin ``i`` covers ``[(start + i) * width, (start + i + 1) * width)``. When a batch falls
    outside the grid, the width grows by an integer factor k and the start moves to a
    multiple of k, so every old bin lands inside exactly one new bin. Exact zeros are also
    counted apart (``zeros``), because they are exactly representable after quantization.
    """

    def __init__(self, bins: int = 2048) -> None:
        if bins < 16:
            raise ValueError(f"a histogram needs at least 16 bins, not {bins}")
        self.bins = bins
        self.counts: np.ndarray = np.zeros(bins, dtype=np.float64)
        self.start = 0
        self.width = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.total = 0.0
        self.zeros = 0.0
        self._pending = 0.0  # how many values were seen while they were all the same number
        self._pending_value = 0.0

    @property
    def nbytes(self) -> int:
        return int(self.counts.nbytes)

    def edges(self) -> np.ndarray:
        return (self.start + np.arange(self.bins + 1, dtype=np.float64)) * self.width

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64).ravel()
        if not np.all(np.isfinite(x)):
            x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.total += x.size
        self.zeros += float(np.count_nonzero(x == 0))
        if self.width == 0.0:
            if self.min == self.max:
                self._pending += x.size
                self._pending_value = self.min
                return
            self._init_grid()
            if self._pending:
                self._add(np.array([self._pending_value]), self._pending)
                self._pending = 0.0
        else:
            self._widen(lo, hi)
        self._add(x)

    def _init_grid(self) -> None:
        lo, hi = min(self.min, 0.0), max(self.max, 0.0)
        width = (hi - lo) / self.bins
        while True:
            start = math.floor(lo / width)
            if (start + self.bins) * width >= hi:
                break
            width *= 1.0 + 1.0 / self.bins
        self.width, self.start = width, start

    def _widen(self, lo: float, hi: float) -> None:
        w = self.width
        low = min(self.start, math.floor(lo / w))
        high = max(self.start + self.bins, math.ceil(hi / w))
        if low == self.start and high == self.start + self.bins:
            return
        factor = max(2, math.ceil((high - low) / self.bins))
        while True:
            new_start = math.floor(low / factor)
            if (new_start + self.bins) * factor >= high:
                break
            factor += 1
        old_index = self.start + np.arange(self.bins)
        target = (old_index - new_start * factor) // factor
        merged = np.bincount(target, weights=self.counts, minlength=self.bins)
        self.counts = merged.astype(np.float64)
        self.start, self.width = new_start, w * factor

    def _add(self, x: np.ndarray, weight: float = 1.0) -> None:
        index = np.floor(x / self.width).astype(np.int64) - self.start
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins) * weight

    def signed(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges); a histogram that saw one repeated value has one bin."""
        if self.width == 0.0:
            v = 0.0 if self.total == 0 else self.min
            return np.array([self.total]), np.array([v, v])
        return self.counts.copy(), self.edges()

    def magnitude(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| as (counts, width): bin j covers [j * width, (j + 1) * width)."""
        if self.width == 0.0:
            return np.array([self.total]), max(abs(self.min), abs(self.max), 1e-12)
        first, last = self.start, self.start + self.bins  # bin indices relative to zero
        size = max(-first, last, 1)
        folded = np.zeros(size)
        index = np.arange(first, last)
        np.add.at(folded, np.where(index >= 0, index, -index - 1), self.counts)
        return folded, self.width


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float


def _with_zero(lo: float, hi: float) -> Range:
    return Range(min(lo, 0.0), max(hi, 0.0))


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction q of the mass lies, interpolating linearly in a bin."""
    cdf = np.concatenate([[0.0], np.cumsum(counts)]) / max(float(counts.sum()), 1e-300)
    j = int(np.searchsorted(cdf, q, side="left"))
    if j <= 0:
        return float(edges[0])
    if j >= len(cdf):
        return float(edges[-1])
    below, above = cdf[j - 1], cdf[j]
    frac = 0.0 if above == below else (q - below) / (above - below)
    return float(edges[j - 1] + frac * (edges[j] - edges[j - 1]))


def percentile_range(hist: HistogramObserver, percentile: float, symmetric: bool) -> Range:
    """Clip the top (100 - percentile)% of |x|, or of each tail when asymmetric."""
    q = percentile / 100.0
    if symmetric:
        counts, width = hist.magnitude()
        edges = np.arange(len(counts) + 1) * width
        t = min(_quantile(counts, edges, q), max(abs(hist.min), abs(hist.max)))
        return Range(-t, t)
    counts, edges = hist.signed()
    lo = max(_quantile(counts, edges, 1.0 - q), hist.min)
    hi = min(_quantile(counts, edges, q), hist.max)
    return _with_zero(lo, hi)


def kl_threshold_bins(counts: np.ndarray, levels: int, max_clipped: float = 1.0) -> int:
    """TensorRT's search: the number of leading bins whose clipped distribution, quantized to
    ``levels`` bins, is closest in KL divergence to the reference.

    Candidates that clip more than a fraction ``max_clipped`` of the mass are skipped: on
    discrete data (e.g. 17 grey levels) a threshold below the second level folds all the mass
    into one bin, where reference and candidate agree and KL is 0.
    """
    n = len(counts)
    if n <= levels:
        return n
    best, best_kl = n, math.inf
    tail = np.concatenate([np.cumsum(counts[::-1])[::-1], [0.0]])  # tail[i] = sum(counts[i:])
    for i in range(levels, n + 1):
        if tail[i] > max_clipped * tail[0]:
            continue
        sliced = counts[:i]
        reference = sliced.copy()
        reference[-1] += tail[i]
        chunk_starts = (np.arange(levels) * i) // levels
        chunk_id = np.repeat(np.arange(levels), np.diff(np.append(chunk_starts, i)))
        nonzero = sliced != 0
        mass = np.add.reduceat(sliced, chunk_starts)
        used = np.add.reduceat(nonzero.astype(np.float64), chunk_starts)
        per_bin = np.divide(mass, used, out=np.zeros_like(mass), where=used > 0)
        candidate = np.where(nonzero, per_bin[chunk_id], 0.0)
        kl = _kl(reference, candidate)
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return math.inf
    p, q = p / p_sum, q / q_sum
    missing = (p > 0) & (q == 0)
    if missing.any():  # smooth q so that KL stays finite (as MXNet and TensorRT do)
        q = np.where(q > 0, q * (1 - eps * missing.sum() / max((q > 0).sum(), 1)), 0.0)
        q = np.where(missing, eps, q)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def entropy_range(
    hist: HistogramObserver, symmetric: bool, levels: int = 128, max_clipped: float = 0.01
) -> Range:
    """KL threshold on |x| (symmetric, or mixed-sign data) or on the one-sided histogram,
    clipping at most ``max_clipped`` of the non-zero values."""
    one_sided = not symmetric and (hist.min >= 0 or hist.max <= 0)
    counts, width = hist.magnitude()
    counts = counts.copy()
    counts[0] = max(counts[0] - hist.zeros, 0.0)  # exact zeros stay exact: not a clipping cue
    bins = kl_threshold_bins(counts, 2 * levels - 1 if one_sided else levels, max_clipped)
    t = bins * width
    if symmetric:
        t = min(t, max(abs(hist.min), abs(hist.max)))
        return Range(-t, t)
    return _with_zero(max(hist.min, -t), min(hist.max, t))


def quantization_mse(
    counts: np.ndarray,
    centers: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    levels: int,
    exact_zeros: float = 0.0,
) -> np.ndarray:
    """Expected squared error per candidate range (lo[k], hi[k]) quantized to ``levels`` steps.

    Mass inside a range costs step²/12 (uniform rounding error); mass outside costs its squared
    distance to the range. ``exact_zeros`` of the mass sit exactly at zero and cost nothing.
    """
    step = (hi - lo) / (levels - 1)
    inside = (centers[None, :] >= lo[:, None]) & (centers[None, :] <= hi[:, None])
    clipped = np.clip(centers[None, :], lo[:, None], hi[:, None])
    error = np.where(inside, (step**2 / 12.0)[:, None], (centers[None, :] - clipped) ** 2)
    zero_bin = int(np.argmin(np.abs(centers)))
    weights = counts.copy()
    weights[zero_bin] = max(weights[zero_bin] - exact_zeros, 0.0)
    return error @ weights


def mse_range(
    hist: HistogramObserver, symmetric: bool, levels: int = 256, grid: int = 100
) -> Range:
    """Search the clipping range that minimises the expected quantization MSE."""
    counts, edges = hist.signed()
    if len(counts) < 2:
        return minmax_range(hist, symmetric)
    centers = 0.5 * (edges[:-1] + edges[1:])
    alphas = np.linspace(1.0 / grid, 1.0, grid)
    if symmetric:
        t = alphas * max(abs(hist.min), abs(hist.max))
        errors = quantization_mse(counts, centers, -t, t, levels, hist.zeros)
        best = float(t[int(np.argmin(errors))])
        return Range(-best, best)
    lo0, hi0 = min(hist.min, 0.0), max(hist.max, 0.0)
    errors = quantization_mse(counts, centers, alphas * lo0, alphas * hi0, levels, hist.zeros)
    alpha = float(alphas[int(np.argmin(errors))])
    lo, hi = alpha * lo0, alpha * hi0
    fine = np.linspace(max(alpha - 2.0 / grid, 1.0 / grid), min(alpha + 2.0 / grid, 1.0), 41)
    for _ in range(2):  # refine each end with the other fixed
        his = fine * hi0
        hi = float(
            his[
                int(
                    np.argmin(
                        quantization_mse(
                            counts, centers, np.full_like(his, lo), his, levels, hist.zeros
                        )
                    )
                )
            ]
        )
        los = fine * lo0
        lo = float(
            los[
                int(
                    np.argmin(
                        quantization_mse(
                            counts, centers, los, np.full_like(los, hi), levels, hist.zeros
                        )
                    )
                )
            ]
        )
    return _with_zero(lo, hi)


def minmax_range(observer: HistogramObserver | MinMaxObserver, symmetric: bool) -> Range:
    if observer.min is None or observer.max is None:
        raise ValueError("the observer saw no data")
    lo, hi = float(np.min(observer.min)), float(np.max(observer.max))
    if symmetric:
        t = max(abs(lo), abs(hi))
        return Range(-t, t)
    return _with_zero(lo, hi)


def compute_range(
    method: str, hist: HistogramObserver, symmetric: bool, percentile: float = 99.99
) -> Range:
    """The clipping range of one tensor by a named method (see RANGE_METHODS)."""
    if hist.total == 0:
        raise ValueError("the histogram saw no data")
    if method == "minmax":
        return minmax_range(hist, symmetric)
    if method == "percentile":
        return percentile_range(hist, percentile, symmetric)
    if method == "entropy":
        return entropy_range(hist, symmetric)
    if method == "mse":
        return mse_range(hist, symmetric, levels=256 if not symmetric else 255)
    raise ValueError(f"unknown range method '{method}' (methods: {', '.join(RANGE_METHODS)})")
