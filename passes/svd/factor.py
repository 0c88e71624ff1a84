"""Factor one weight of the ``svd`` pass: W ≈ U·V per channel group, data-aware if asked.

Spectra: the SVD of each group's matrix W [k, n], whitened when calibration moments are
given, i.e. of Lᵀ·W with L·Lᵀ = XᵀX + λI, so that truncating it at rank r minimises
‖X·W − X·Ŵ‖ on the calibration rows rather than ‖W − Ŵ‖. Factors: the balanced rank-r
U [k, r] and V [r, n], rescaled with calibration data so that every middle channel x·U
has the same RMS (``equalize``: exact, and what int8 activations want). Refit: with U fixed, V = argmin ‖X·U·V − Y‖² + λ‖V − V_svd‖² against
the teacher's layer outputs Y. Errors: ‖W − Ŵ‖/‖W‖ and, with targets, ‖X·Ŵ − Y‖/‖Y‖ on the
calibration rows; for Ŵ = W the latter is the error the layer's inputs already carry from
the layers compressed before it ("upstream"). ``WeightGroup`` is one weight with all the
nodes that read it; ``taps`` says which activations feed its moments; ``allocation_moments`` streams the
calibration batches for the budget rule, only until every layer has seen
``ALLOCATION_ROWS`` rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnxpress.passes.svd.layers import LinearForm

from onnxpress.analysis.refit import (
    Spectrum,
    Tap,
    accumulate_moments,
    refit_right,
    squared_output_error,
    whitened_svd,
)
from onnxpress.analysis.segments import SegmentCapture
from onnxpress.calibration.activations import Moments
from onnxpress.core.calibration_data import Batch

# Refit only when the unfactored layer on the student's inputs is this close to the teacher's
# output; a larger gap means the teacher tensor is no longer this layer's output.
MAX_UPSTREAM_ERROR = 0.5
# The budget rule compares the layers' whitened spectra; it reads calibration batches until
# every candidate has this many rows (the waves that factor read them all). On the 6-layer
# encoder of tools/bench_svd_encoder.py (2048 rows a batch), 4 batches instead of 16 move
# the ranks by at most a few percent and cut the allocation's calibration run by 4.
ALLOCATION_ROWS = 8192


@dataclass
class WeightGroup:
    """A weight and every node that reads it, all in one form (one set of shared factors)."""

    key: str
    weight: gs.Constant
    forms: list[LinearForm]

    @property
    def form(self) -> LinearForm:
        return self.forms[0]

    @property
    def dense(self) -> int:
        return self.form.groups * self.form.k * self.form.n


def taps(group: WeightGroup, teacher_names: set[str], targets: bool) -> list[Tap]:
    """One tap per (user node, channel group); no targets if a teacher tensor is missing."""
    form = group.form
    with_targets = targets and all(f.teacher_tensor() in teacher_names for f in group.forms)
    return [
        Tap(
            key=f"{group.key}#{index}",
            student=str(f.source.name),
            rows=functools.partial(f.rows, group=index),
            dim=form.row_dim,
            teacher=f.teacher_tensor() if with_targets else None,
            targets=functools.partial(f.targets, group=index) if with_targets else None,
            target_dim=form.target_dim if with_targets else None,
        )
        for f in group.forms
        for index in range(form.groups)
    ]


def allocation_moments(
    model: onnx.ModelProto, taps: Sequence[Tap], batches: Callable[[], Iterable[Batch]]
) -> dict[str, Moments]:
    """Moments of every tap, from the first batches that give each tap ``ALLOCATION_ROWS``
    rows (rows counted as the tensor's size over the row width: at most the true count)."""

    stream = SegmentCapture(batches).run(model, [t.student for t in taps])
    del model  # the stream holds what it needs; a caller's temporary export can go

    def first_rows() -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        seen = 0
        for values in stream:
            yield values, {}
            seen += min(values[t.student].size // t.dim for t in taps)
            if seen >= ALLOCATION_ROWS:
                return

    # float32 sums of a few float32 batch products: half the memory of float64 (113 MB of
    # the encoder's 150 MB are its six 1536-wide feed-forward inputs), same spectra to 1e-6
    return accumulate_moments(taps, first_rows(), np.float32)


def per_group(group: WeightGroup, moments: dict[str, Moments]) -> list[Moments | None]:
    """The moments of each channel group of ``group`` (None where none were collected)."""
    return [moments.get(f"{group.key}#{i}") for i in range(group.form.groups)]


@dataclass
class Factorization:
    u: np.ndarray  # [groups, k, r]
    v: np.ndarray  # [groups, r, n]
    weight_error: float
    output_error: float | None
    upstream_error: float | None
    refit: bool | str  # True, False, or why the refit was skipped


def spectra(form: LinearForm, grams: Sequence[Moments | None], damping: float) -> list[Spectrum]:
    """One (whitened, where moments are given) SVD per channel group."""
    matrices = form.matrices()
    return [
        whitened_svd(matrices[i], form.whitening_gram(m.xtx) if m is not None else None, damping)
        for i, m in enumerate(grams)
    ]


def relative_error(approx: np.ndarray, moments: Sequence[Moments | None]) -> float:
    """‖X·Ŵ − Y‖ / ‖Y‖ over all channel groups."""
    error = total = 0.0
    for matrix, m in zip(approx, moments, strict=True):
        if m is None:
            raise ValueError("no moments for a channel group")
        e, t = squared_output_error(matrix, m)
        error, total = error + e, total + t
    return math.sqrt(error / total) if total > 0 else 0.0


def equalize(u: np.ndarray, v: np.ndarray, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """U·D⁻¹, D·V with D the RMS of each middle channel x·U on the calibration rows (up to
    a common factor): the same product, with middle channels of one scale, so that a
    per-tensor int8 scale of x·U (``qdq``) serves each of them equally."""
    rms = np.sqrt(np.maximum(np.einsum("kr,kl,lr->r", u, gram, u), 0.0))
    if not np.all(rms > 0):
        return u, v
    scale = rms / np.exp(np.mean(np.log(rms)))
    return u / scale, v * scale[:, None]


def factorize(
    form: LinearForm,
    spectra: Sequence[Spectrum],
    rank: int,
    moments: Sequence[Moments | None],
    refit: bool,
    damping: float,
) -> Factorization:
    linear = form.linear_matrices()
    with_targets = all(m is not None and m.xty is not None for m in moments)
    upstream = relative_error(linear, moments) if with_targets else None
    note: bool | str = refit
    if refit and upstream is None:
        note = "skipped: the layer's output tensor is not in the original model"
    elif refit and upstream is not None and upstream > MAX_UPSTREAM_ERROR:
        note = (
            f"skipped: the teacher's tensor differs from this layer's output by "
            f"{upstream:.2g} (rewritten by an earlier pass?)"
        )
    us, vs, approx = [], [], []
    for index, spectrum in enumerate(spectra):
        u, v = spectrum.factors(rank)
        chunk = moments[index]
        if note is True and chunk is not None:
            u_linear, v_linear = form.linear_factors(u, v)
            v = form.right_from_linear(refit_right(u_linear, chunk, v_linear, damping), rank)
        if chunk is not None:
            u, v = equalize(u, v, form.whitening_gram(chunk.xtx))
        u_linear, v_linear = form.linear_factors(u, v)
        us.append(u)
        vs.append(v)
        approx.append(u_linear @ v_linear)
    stacked = np.stack(approx)
    weight_error = float(np.linalg.norm(linear - stacked) / max(np.linalg.norm(linear), 1e-30))
    return Factorization(
        u=np.stack(us),
        v=np.stack(vs),
        weight_error=weight_error,
        output_error=relative_error(stacked, moments) if with_targets else None,
        upstream_error=upstream,
        refit=note,
    )
