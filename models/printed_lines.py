"""Printed text lines for the CNN + BiLSTM CTC recognizer ``crnn_lines``.

A line is 3 to 8 characters drawn uniformly from ``ALPHABET`` (digits and lower-case
letters), rendered with one of the DejaVu fonts that matplotlib bundles (sans, bold,
oblique, mono, serif, serif bold) at 13-18 px by matplotlib's FreeType, so the pixels do
not depend on the host's fonts. The text is light on a dark ground, at a random height and a random left offset, with a random ground (0-0.25) and ink
(0.6-1.0) level and Gaussian noise (sigma 0-0.06). Canvas 32 x 128; labels are the
character indices (``ALPHABET.index``) padded with ``PAD`` to ``MAX_CHARS``, so
``text_lines.greedy_decode`` and ``text_lines.cer_and_line_accuracy`` score the
recognizer's [batch, time, 37] probabilities (class 0 the CTC blank).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
CLASSES = len(ALPHABET) + 1  # + the CTC blank (class 0)
HEIGHT, WIDTH = 32, 128
MIN_CHARS, MAX_CHARS = 3, 8
MIN_SIZE, MAX_SIZE = 13, 18
PAD = -1
FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
)


@cache
def _font(name: str):  # type: ignore[no-untyped-def]
    import matplotlib
    from matplotlib.ft2font import FT2Font

    return FT2Font(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name))


def render(text: str, font: str, size: int) -> np.ndarray:
    """The uint8 glyph image of ``text``, cut to the box of its ink."""
    face = _font(font)
    face.set_size(size, 72)
    face.set_text(text, 0.0)
    face.draw_glyphs_to_bitmap(antialiased=True)
    return np.asarray(face.get_image(), dtype=np.uint8)


def draw_lines(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` lines: float32 [count, 1, 32, 128] in [0, 1] and int64 labels
    [count, MAX_CHARS] holding character indices then PAD."""
    lines = np.zeros((count, 1, HEIGHT, WIDTH), np.float32)
    targets = np.full((count, MAX_CHARS), PAD, np.int64)
    for row in range(count):
        length = int(rng.integers(MIN_CHARS, MAX_CHARS + 1))
        chars = rng.integers(0, len(ALPHABET), length)
        font = FONTS[int(rng.integers(0, len(FONTS)))]
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
        text = "".join(ALPHABET[c] for c in chars)
        image = render(text, font, size)
        while image.shape[1] > WIDTH - 2 or image.shape[0] > HEIGHT:
            size -= 1
            image = render(text, font, size)
        glyphs = image.astype(np.float32) / 255.0
        high, wide = glyphs.shape
        top = int(rng.integers(0, HEIGHT - high + 1))
        left = int(rng.integers(0, WIDTH - wide + 1))
        ground, ink = rng.uniform(0.0, 0.25), rng.uniform(0.6, 1.0)
        canvas = np.zeros((HEIGHT, WIDTH), np.float32)
        canvas[top : top + high, left : left + wide] = glyphs
        canvas = ground + (ink - ground) * canvas
        canvas += rng.normal(0.0, rng.uniform(0.0, 0.06), canvas.shape).astype(np.float32)
        lines[row, 0] = np.clip(canvas, 0.0, 1.0)
        targets[row, :length] = chars
    return lines, targets
