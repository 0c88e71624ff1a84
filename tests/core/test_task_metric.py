"""task metric: which yardstick each output gets, and that it catches what users would lose
(4 dB of PSNR, 2 points of accuracy) while passing what keeps the task (a slightly turned
normalized embedding)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxpress.core.task_metric import MAX_RANK_ROWS, output_kind, task_score
from onnxpress.core.verify import compare_metric


def test_kinds() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 10)).astype(np.float32)
    unit = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    assert output_kind(logits) == "top1"
    assert output_kind(logits[:3]) == "nsr"  # too few predictions to speak of accuracy
    assert output_kind(unit) == "rank"
    assert output_kind(rng.standard_normal((2, 12, 64)).astype(np.float32)) == "rank"
    assert output_kind(rng.standard_normal((2, 1, 32, 32)).astype(np.float32)) == "nsr"
    assert output_kind(np.arange(6)) == "exact"


def psnr(out: np.ndarray, target: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((out - target) ** 2)))


def test_a_4db_psnr_loss_fails_and_a_small_one_passes() -> None:
    rng = np.random.default_rng(1)
    target = np.clip(rng.normal(120, 55, (4, 1, 64, 64)), 0, 255)
    floating = target + rng.normal(0, 5.8, target.shape)  # about 32.9 dB, like sr_photos
    assert psnr(floating, target) == pytest.approx(32.9, abs=0.2)
    lossy = floating + rng.normal(0, 7.3, target.shape)  # about 4 dB lost
    good = floating + rng.normal(0, 0.6, target.shape)  # about 0.05 dB lost
    assert psnr(floating, target) - psnr(lossy, target) > 3.8
    assert psnr(floating, target) - psnr(good, target) < 0.1
    assert not _ok(floating, lossy) and _ok(floating, good)


def test_two_points_of_accuracy_fail() -> None:
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((1000, 10)).astype(np.float32)
    new = ref.copy()
    flipped = rng.choice(1000, 20, replace=False)  # 2 points of top-1 changed
    new[flipped] = np.roll(new[flipped], 1, axis=1)
    new[flipped, ref[flipped].argmax(1)] -= 10  # make sure the winner changes
    assert task_score(ref, new).value >= 0.02 and not _ok(ref, new)
    new_close = ref + rng.normal(0, 1e-3, ref.shape).astype(np.float32)
    assert _ok(ref, new_close)


def test_turned_embeddings_keep_their_ranks() -> None:
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((64, 384))
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    noise = rng.standard_normal(ref.shape) * 0.16 / np.sqrt(384)  # rel-L2 about 0.16
    new = ref + noise
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    rel_l2 = np.linalg.norm(new - ref) / np.linalg.norm(ref)
    assert rel_l2 > 0.1  # the old rel-l2 budget would have refused this
    assert _ok(ref.astype(np.float32), new.astype(np.float32))
    scrambled = rng.permutation(new)  # a broken encoder: same norms, wrong neighbours
    assert not _ok(ref.astype(np.float32), scrambled.astype(np.float32))


def test_a_detector_sized_rank_output_is_judged_on_evenly_spaced_rows() -> None:
    """[batch, anchors, 85]: 12,000 rows would be 72 M pairs to rank; MAX_RANK_ROWS of them,
    evenly spaced, give the same score as those rows alone."""
    rng = np.random.default_rng(5)
    ref = rng.random((6, 2000, 85)).astype(np.float32)
    new = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    score = task_score(ref, new)
    assert score.kind == "rank"
    rows = np.linspace(0, 12000 - 1, MAX_RANK_ROWS).round().astype(np.int64)
    alone = task_score(ref.reshape(-1, 85)[rows][None], new.reshape(-1, 85)[rows][None])
    assert score.value == alone.value and 0 < score.value < score.budget


def test_the_reference_ranks_kept_between_judgements_change_no_score() -> None:
    from onnxpress.core import task_metric

    rng = np.random.default_rng(6)
    refs = [rng.random((2, 300, 32)).astype(np.float32) for _ in range(2)]
    news = [r + 0.05 * rng.standard_normal(r.shape).astype(np.float32) for r in refs]
    task_metric._REFERENCE_RANKS.clear()
    fresh = [task_score(r, n).value for r, n in zip(refs, news, strict=True)]
    assert len(task_metric._REFERENCE_RANKS) == 2
    again = [task_score(r, n).value for r, n in zip(refs, news, strict=True)]
    crossed = task_score(refs[0], news[1]).value  # another candidate, same kept reference
    task_metric._REFERENCE_RANKS.clear()
    assert again == fresh and crossed == task_score(refs[0], news[1]).value
    assert fresh[0] != fresh[1]


def _ok(ref: np.ndarray, new: np.ndarray) -> bool:
    return compare_metric(["y"], [[ref]], [[new]], "task", None).ok


def test_a_sequence_of_maps_is_judged_as_its_scores() -> None:
    from onnxpress.core.task_metric import as_array

    rows = [{7: 0.1, 1: 0.9}, {1: 0.25, 7: 0.75}]
    got = as_array(rows)
    assert got.dtype == np.float64 and got.tolist() == [[0.9, 0.1], [0.25, 0.75]]
    ragged = as_array([{1: 0.5}, {2: 0.5}])
    assert ragged.dtype == object and ragged.shape == (2,)
    plain = np.arange(3)
    assert as_array(plain) is plain
