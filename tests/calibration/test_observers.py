"""Observers and range methods against hand-computed references; state size never grows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnxpress.calibration.observers import (
    HistogramObserver,
    MeanObserver,
    MinMaxObserver,
    Range,
    compute_range,
    entropy_range,
    kl_threshold_bins,
    mse_range,
    percentile_range,
    quantization_mse,
)


def test_minmax_per_tensor_and_per_channel() -> None:
    obs, per_channel = MinMaxObserver(), MinMaxObserver(axis=1)
    for batch in ([[1.0, -2.0], [3.0, 0.5]], [[-4.0, 6.0], [0.0, 0.0]]):
        obs.update(np.array(batch))
        per_channel.update(np.array(batch))
    assert (float(obs.min), float(obs.max)) == (-4.0, 6.0)  # type: ignore[arg-type]
    np.testing.assert_array_equal(per_channel.min, [-4.0, -2.0])
    np.testing.assert_array_equal(per_channel.max, [3.0, 6.0])
    assert compute_range("minmax", _hist([-4.0, 6.0]), symmetric=True) == Range(-6.0, 6.0)
    assert compute_range("minmax", _hist([1.0, 6.0]), symmetric=False) == Range(0.0, 6.0)


def test_mean_observer_is_a_running_channel_mean() -> None:
    obs = MeanObserver(axis=1)
    obs.update(np.array([[[1.0, 3.0], [10.0, 10.0]]]))  # [1, 2 channels, 2]
    obs.update(np.array([[[5.0, 7.0], [0.0, 0.0]]]))
    np.testing.assert_allclose(obs.mean, [4.0, 5.0])


def _hist(values: list[float], bins: int = 16) -> HistogramObserver:
    hist = HistogramObserver(bins)
    hist.update(np.array(values))
    return hist


def test_histogram_grid_starts_at_zero_and_widens_by_whole_bins() -> None:
    hist = _hist([0.0, 4.0])  # width 4/16 = 0.25, bins [0, 4]; 4.0 lands in the last bin
    assert (hist.start, hist.width) == (0, 0.25)
    assert hist.counts[0] == 1 and hist.counts[15] == 1
    hist.update(np.array([-2.0]))
    # needs [-2, 4]: factor 2 (width 0.5), start -4 (edge -2); old bin i -> (i + 8) // 2
    assert (hist.start, hist.width) == (-4, 0.5)
    expected = np.zeros(16)
    expected[[0, 4, 11]] = 1
    np.testing.assert_array_equal(hist.counts, expected)
    assert 0.0 in hist.edges() and hist.zeros == 1


def test_histogram_merges_exactly_like_one_histogram_of_everything() -> None:
    rng = np.random.default_rng(0)
    batches = [
        rng.standard_normal(5000) * scale + shift
        for scale, shift in ((0.1, 0.0), (1.0, 2.0), (8.0, -3.0), (0.5, 30.0))
    ]
    hist = HistogramObserver(2048)
    for batch in batches:
        hist.update(batch)
    counts, edges = hist.signed()
    reference, _ = np.histogram(np.concatenate(batches), edges)
    np.testing.assert_array_equal(counts, reference)
    assert hist.total == 20000 and counts.sum() == 20000


def test_constant_batches_then_a_spread() -> None:
    hist = HistogramObserver(16)
    hist.update(np.full(5, 2.0))
    hist.update(np.full(3, 2.0))
    assert hist.width == 0.0 and compute_range("minmax", hist, False) == Range(0.0, 2.0)
    hist.update(np.array([-1.0, 3.0]))
    counts, edges = hist.signed()
    assert counts.sum() == 10 and counts[np.searchsorted(edges, 2.0, side="right") - 1] == 8


def test_percentile_interpolates_inside_a_bin() -> None:
    values = np.arange(1000) / 1000.0  # uniform on [0, 0.999]
    hist = _hist(list(values), bins=1000)
    r = percentile_range(hist, 99.0, symmetric=False)
    assert r.lo == 0.0 and r.hi == pytest.approx(0.99, abs=2e-3)
    mirrored = _hist(list(np.concatenate([values, -values])), bins=2000)
    t = percentile_range(mirrored, 99.0, symmetric=True).hi
    assert t == pytest.approx(0.99, abs=2e-3)  # 99% of |x| lies below 0.99


def _naive_kl_bins(counts: list[float], levels: int) -> int:
    """TensorRT's loop written out plainly, as a reference."""
    best, best_kl = len(counts), math.inf
    for i in range(levels, len(counts) + 1):
        p = counts[:i]
        p[-1] += sum(counts[i:])
        sliced = counts[:i]
        q = [0.0] * i
        starts = [(j * i) // levels for j in range(levels)] + [i]
        for j in range(levels):
            chunk = range(starts[j], starts[j + 1])
            used = [k for k in chunk if sliced[k] != 0]
            for k in used:
                q[k] = sum(sliced[k2] for k2 in chunk) / len(used)
        ps, qs = sum(p), sum(q)
        kl = 0.0
        for pk, qk in zip(p, q, strict=True):
            if pk > 0:
                kl += (pk / ps) * math.log((pk / ps) / (qk / qs if qk > 0 else 1e-4))
        if kl < best_kl:
            best, best_kl = i, kl
    return best


def test_kl_threshold_matches_the_plain_algorithm() -> None:
    rng = np.random.default_rng(1)
    counts = np.round(1000 * np.exp(-np.arange(48) / 6.0) + rng.integers(0, 3, 48)).astype(float)
    counts[40:] = [0, 1, 0, 0, 2, 0, 0, 1]  # a thin tail worth clipping
    assert kl_threshold_bins(counts, 8) == _naive_kl_bins(list(counts), 8)
    assert kl_threshold_bins(counts, 8) < 48


def test_entropy_never_clips_more_than_one_percent() -> None:
    levels = np.repeat(np.arange(17) / 16.0, 50)  # discrete data: 17 grey levels
    r = entropy_range(_hist(list(levels), bins=2048), symmetric=True)
    assert r.hi >= 15 / 16  # without the guard: 1/16, everything folded into one bin


def test_entropy_clips_a_long_thin_tail() -> None:
    rng = np.random.default_rng(2)
    values = np.concatenate([np.abs(rng.standard_normal(200000)), [60.0]])
    r = entropy_range(_hist(list(values), bins=2048), symmetric=False)
    assert r.lo == 0.0 and 3.0 < r.hi < 20.0


def test_quantization_mse_by_hand() -> None:
    # step 1 over [-1, 1] with 3 levels: -1 and 0.5 cost 1/12 each (0.5 twice), 3 costs (3-1)^2.
    error = quantization_mse(
        np.array([1.0, 2.0, 1.0]),
        np.array([-1.0, 0.5, 3.0]),
        np.array([-1.0]),
        np.array([1.0]),
        levels=3,
    )
    assert error[0] == pytest.approx(3 / 12 + 4.0)
    # exact zeros are free
    error = quantization_mse(
        np.array([4.0]),
        np.array([0.0]),
        np.array([-1.0]),
        np.array([1.0]),
        levels=3,
        exact_zeros=4.0,
    )
    assert error[0] == 0.0


def test_mse_range_is_near_the_best_real_quantization_error() -> None:
    rng = np.random.default_rng(3)
    values = np.abs(rng.laplace(size=50000))  # a long tail that is worth clipping
    hist = _hist(list(values), bins=2048)
    top = float(values.max())

    def real_mse(r: Range) -> float:
        scale = (r.hi - r.lo) / 255
        q = np.clip(np.round((values - r.lo) / scale), 0, 255)
        return float(np.mean((q * scale + r.lo - values) ** 2))

    chosen = mse_range(hist, symmetric=False)
    best = min(real_mse(Range(0.0, a * top)) for a in np.linspace(0.01, 1, 400))
    assert chosen.lo == 0.0 and chosen.hi < top  # the sparse tail is clipped a little
    assert real_mse(chosen) < 1.05 * best and real_mse(chosen) < real_mse(Range(0.0, top))


def test_every_range_contains_zero() -> None:
    hist = _hist([2.0, 3.0, 5.0])
    for method in ("minmax", "percentile", "entropy", "mse"):
        r = compute_range(method, hist, symmetric=False)
        assert r.lo == 0.0 and r.hi > 0.0, method


def test_observer_state_does_not_grow_with_batches() -> None:
    rng = np.random.default_rng(4)
    hist, minmax = HistogramObserver(2048), MinMaxObserver()
    sizes = []
    for i in range(1000):
        batch = rng.standard_normal(64) * (1 + i / 100)
        hist.update(batch)
        minmax.update(batch)
        if i in (9, 999):
            sizes.append((hist.nbytes, minmax.nbytes))
    assert sizes[0] == sizes[1] and hist.total == 64000
