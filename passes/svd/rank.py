"""Rank selection for the ``svd`` pass: one rank per weight from a rule and its spectrum.

A weight with ``groups`` matrices [k, n] costs groups·k·n params dense and groups·r·(k+n)
factored; it is factored only when r·(k+n) < (1 − min_gain)·k·n. Rules:

* ``rank_for_energy``: the smallest r keeping ``energy`` of Σ s² in every group;
* ``rank_for_params``: the largest r keeping at most ``fraction`` of the params;
* ``allocate_budget``: across all candidates, start dense and greedily take the step (one
  rank down the ladder of allowed ranks) with the smallest increase of relative squared
  error per parameter saved, until the kept params fit ``fraction`` of the dense params.
  Each item's error is scaled by its ``weight`` (the measured effect of its relative error
  on the model's outputs, ``sensitivity``) and its ladder stops at its ``floor`` rank.

``multiple`` rounds ranks up (rank, energy) or down (params, budget) to a multiple.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def max_useful_rank(k: int, n: int, min_gain: float) -> int:
    """The largest r with r·(k+n) < (1 − min_gain)·k·n, capped at min(k, n) (0 if none)."""
    limit = (1.0 - min_gain) * k * n / (k + n)
    largest = math.ceil(limit) - 1
    return max(0, min(largest, k, n))


def round_rank(rank: int, multiple: int, full: int, up: bool) -> int:
    """``rank`` rounded to a multiple of ``multiple``, within [1, full]."""
    if multiple > 1:
        rounded = (-(-rank // multiple) if up else rank // multiple) * multiple
        rank = rounded if rounded >= multiple else multiple
    return max(1, min(rank, full))


def rank_for_energy(spectra: Sequence[np.ndarray], energy: float) -> int:
    """The smallest rank that keeps ``energy`` of the squared singular values of each group."""
    rank = 1
    for singular in spectra:
        squares = singular.astype(np.float64) ** 2
        total = float(squares.sum())
        if total <= 0:
            continue
        kept = np.cumsum(squares) / total
        rank = max(rank, int(np.searchsorted(kept, energy - 1e-12)) + 1)
    return rank


def floor_rank(k: int, n: int, fraction: float) -> int:
    """The lowest rank a budget may give a [k, n] weight: ``fraction`` of its full rank."""
    return max(1, math.ceil(fraction * min(k, n)))


def rank_for_params(k: int, n: int, fraction: float) -> int:
    """The largest rank whose factors hold at most ``fraction`` of the k·n params."""
    return max(1, math.floor(fraction * k * n / (k + n)))


def relative_tail(spectra: Sequence[np.ndarray], rank: int) -> float:
    """Σ_{i≥rank} s² / Σ s² over all groups: the relative squared error at ``rank``."""
    total = sum(float(np.sum(s.astype(np.float64) ** 2)) for s in spectra)
    tail = sum(float(np.sum(s[rank:].astype(np.float64) ** 2)) for s in spectra)
    return tail / total if total > 0 else 0.0


@dataclass
class BudgetItem:
    """One candidate weight for ``allocate_budget``."""

    key: str
    k: int
    n: int
    groups: int
    spectra: list[np.ndarray]
    weight: float = 1.0  # model output error per unit of this layer's relative error
    floor: int = 1  # never below this rank

    @property
    def dense(self) -> int:
        return self.groups * self.k * self.n

    def factored(self, rank: int) -> int:
        return self.groups * rank * (self.k + self.n)


@dataclass
class Allocation:
    ranks: dict[str, int]  # key -> rank; keys left dense are absent
    kept: int  # params of all candidates after factorization
    target: int  # params the budget allows
    dense: int  # params of all candidates before


def _ladder(item: BudgetItem, multiple: int, min_gain: float) -> list[int]:
    """Allowed ranks, largest first."""
    top = max_useful_rank(item.k, item.n, min_gain)
    step = max(multiple, 1)
    ranks = [r for r in range(top, 0, -1) if r % step == 0] or ([top] if top > 0 else [])
    return [r for r in ranks if r >= item.floor]


def allocate_budget(
    items: Sequence[BudgetItem], fraction: float, multiple: int, min_gain: float
) -> Allocation:
    """Greedy: the cheapest error per saved parameter first, until the params fit."""
    dense = sum(item.dense for item in items)
    target = math.floor(fraction * dense)
    ladders = {item.key: _ladder(item, multiple, min_gain) for item in items}
    position = {item.key: -1 for item in items}  # -1: dense
    kept = dense
    heap: list[tuple[float, int, str]] = []
    by_key = {item.key: item for item in items}

    def cost(item: BudgetItem, rank: int) -> int:
        return item.dense if rank == 0 else item.factored(rank)

    def push(item: BudgetItem) -> None:
        ladder, at = ladders[item.key], position[item.key]
        if at + 1 >= len(ladder):
            return
        now = ladder[at] if at >= 0 else 0
        nxt = ladder[at + 1]
        saved = cost(item, now) - cost(item, nxt)
        error_now = relative_tail(item.spectra, now) if now else 0.0
        increase = item.weight * (relative_tail(item.spectra, nxt) - error_now)
        heapq.heappush(heap, (max(increase, 0.0) / max(saved, 1), len(heap), item.key))

    for item in items:
        push(item)
    while kept > target and heap:
        _, _, key = heapq.heappop(heap)
        item, at = by_key[key], position[key]
        now = ladders[key][at] if at >= 0 else 0
        kept -= cost(item, now) - cost(item, ladders[key][at + 1])
        position[key] = at + 1
        push(item)
    ranks = {key: ladders[key][at] for key, at in position.items() if at >= 0}
    return Allocation(ranks, kept, target, dense)
