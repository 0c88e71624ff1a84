"""Text lines for the CTC recognizers ``ctc_lines`` and ``crnn_lines``: drawing, greedy
decoding, CER.

``ctc_lines``: a line is 3 to 6 MNIST digits, each cropped to its ink columns, laid side by side with gaps
of 1-4 pixels on a 28 x 140 canvas at a random left offset. The label is the digit string.
The recognizer's output is [batch, time, 11] probabilities: class 0 is the CTC blank and
class d + 1 is digit d. ``greedy_decode`` takes the best class per step, merges repeats and
drops blanks; ``cer`` is the edit distance over the reference length, summed over lines.

Decoding and scoring are alphabet-blind (class - 1 per character) and need only numpy: the
build scripts, ``evaluate.py`` and the benchmark tools all use them. Character accuracy is
``1 - CER``, ``(n - edits) / n`` as the ISRI OCR evaluation defines it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEIGHT, WIDTH = 28, 140
BLANK = 0
CLASSES = 11
MIN_DIGITS, MAX_DIGITS = 3, 6
PAD = -1  # label padding in the [lines, MAX_DIGITS] label array


def crop_columns(image: np.ndarray) -> np.ndarray:
    """A 28x28 digit cut to the columns that hold ink (at least 4 pixels wide)."""
    columns = np.nonzero(image.max(axis=0) > 32)[0]
    if len(columns) == 0:
        return image[:, 12:16]
    left, right = int(columns[0]), int(columns[-1]) + 1
    if right - left < 4:
        left, right = max(0, left - 2), min(image.shape[1], right + 2)
    return image[:, left:right]


def draw_lines(
    images: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` lines from uint8 digits [N,28,28]: float32 [count,1,28,140] in [0,1] and
    int64 labels [count, MAX_DIGITS] holding digits then PAD."""
    lines = np.zeros((count, 1, HEIGHT, WIDTH), np.float32)
    targets = np.full((count, MAX_DIGITS), PAD, np.int64)
    for row in range(count):
        wanted = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
        pieces, digits, width = [], [], 0
        for index in rng.integers(0, len(images), wanted):
            piece = crop_columns(images[index])
            gap = int(rng.integers(1, 5)) if pieces else 0
            if width + gap + piece.shape[1] > WIDTH:
                break
            pieces.append((width + gap, piece))
            digits.append(int(labels[index]))
            width += gap + piece.shape[1]
        offset = int(rng.integers(0, WIDTH - width + 1))
        for left, piece in pieces:
            start = offset + left
            region = lines[row, 0, :, start : start + piece.shape[1]]
            np.maximum(region, piece.astype(np.float32) / 255.0, out=region)
        targets[row, : len(digits)] = digits
    return lines, targets


def greedy_decode(probabilities: np.ndarray) -> list[list[int]]:
    """Best class per time step, repeats merged, blanks dropped; digits (class - 1)."""
    best = np.asarray(probabilities).argmax(axis=-1)
    decoded = []
    for steps in best:
        keep = np.ones(len(steps), bool)
        keep[1:] = steps[1:] != steps[:-1]
        decoded.append([int(c) - 1 for c in steps[keep] if c != BLANK])
    return decoded


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two digit strings."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def references(labels: np.ndarray) -> list[list[int]]:
    return [[int(d) for d in row if d != PAD] for row in labels]


def cer_and_line_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(character error rate, fraction of lines read exactly) of [lines, time, 11] outputs."""
    decoded, truth = greedy_decode(probabilities), references(labels)
    errors = sum(edit_distance(d, t) for d, t in zip(decoded, truth, strict=True))
    exact = sum(d == t for d, t in zip(decoded, truth, strict=True))
    return errors / max(sum(len(t) for t in truth), 1), exact / max(len(truth), 1)
