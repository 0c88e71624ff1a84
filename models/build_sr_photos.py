"""Train and export ``sr_photos.onnx``: 2x super-resolution of grey-level photos, EDSR-style.

Data: the two photos bundled with scikit-learn (``sklearn.datasets.load_sample_images``:
china.jpg and flower.jpg, 427x640), as luma (0.299 R + 0.587 G + 0.114 B) rounded to 8-bit
grey levels. Training patches come from china.jpg and the top half of flower.jpg; the
held-out set is every 64x64 tile, at a stride of 32, of the bottom half of flower.jpg. A low-resolution input is the tile shrunk
2x with antialiased bicubic interpolation and rounded to 8 bits, as a camera or decoder
would deliver it.

Model (EDSR baseline without BatchNorm, smaller): input 0..255 grey levels, minus a mean of
110; Conv3x3 (32 ch), 4 residual blocks [Conv3x3-ReLU-Conv3x3]+x, Conv3x3 plus a long skip,
Conv3x3 to 128 ch, DepthToSpace (pixel shuffle, 2x), Conv3x3 to 1 ch, plus 110. Activations
are raw grey levels (hundreds) with no normalization layer: the wide-range case for int8.
Trained with L1 loss (Adam, cosine schedule, 3000 steps of 16 random flipped patches).
Metric: PSNR on the held-out tiles (output clipped to 0..255), against bicubic upscaling.
Input ``input`` float32 [batch, 1, 32, 32]; output ``output`` float32 [batch, 1, 64, 64].

Usage: python models/build_sr_photos.py
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from _common import (
    CALIBRATION_SIZE,
    DATA_DIR,
    MODELS_DIR,
    assert_close,
    check_dynamic_batch,
    check_model,
    export,
    make_deterministic,
    op_histogram,
    run_onnx,
    save_calibration,
    save_npz,
)
from evaluate import psnr
from torch import nn

NAME = "sr_photos"
LOW = 32  # low-resolution tile side
MEAN = 110.0
CHANNELS = 32
BLOCKS = 4
STEPS = 3000
BATCH = 16
LR = 4e-4


def luma_photos() -> tuple[np.ndarray, np.ndarray]:
    """(china, flower) as 8-bit grey levels 0..255 (float32)."""
    from sklearn.datasets import load_sample_images

    china, flower = (
        (0.299 * im[..., 0] + 0.587 * im[..., 1] + 0.114 * im[..., 2]).round().astype(np.float32)
        for im in load_sample_images().images
    )
    return china, flower


def shrink(high: torch.Tensor) -> torch.Tensor:
    """2x antialiased bicubic downscaling, rounded to 8-bit grey levels."""
    low = F.interpolate(high, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
    return low.round().clamp(0, 255)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.conv2 = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class SuperResolution(nn.Module):
    """EDSR-style 2x super-resolution of grey levels (no normalization layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, CHANNELS, 3, padding=1)
        self.body = nn.Sequential(*[Block() for _ in range(BLOCKS)])
        self.body_end = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.upsample = nn.Conv2d(CHANNELS, 4 * CHANNELS, 3, padding=1)
        self.tail = nn.Conv2d(CHANNELS, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.head(x - MEAN)
        features = self.body_end(self.body(features)) + features
        return self.tail(F.pixel_shuffle(self.upsample(features), 2)) + MEAN


def random_patches(
    photos: list[np.ndarray], count: int, generator: torch.Generator
) -> torch.Tensor:
    """``count`` random 64x64 patches (random photo, place and flips), [count, 1, 64, 64]."""
    side = 2 * LOW
    patches = []
    for _ in range(count):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        top = int(torch.randint(photo.shape[0] - side + 1, (1,), generator=generator))
        left = int(torch.randint(photo.shape[1] - side + 1, (1,), generator=generator))
        patch = photo[top : top + side, left : left + side]
        if float(torch.rand(1, generator=generator)) < 0.5:
            patch = patch[:, ::-1]
        if float(torch.rand(1, generator=generator)) < 0.5:
            patch = patch[::-1]
        patches.append(np.ascontiguousarray(patch))
    return torch.from_numpy(np.stack(patches))[:, None]


def held_out_tiles(photo: np.ndarray) -> np.ndarray:
    side, stride = 2 * LOW, LOW
    return np.stack(
        [
            photo[top : top + side, left : left + side]
            for top in range(0, photo.shape[0] - side + 1, stride)
            for left in range(0, photo.shape[1] - side + 1, stride)
        ]
    )[:, None]


def main() -> None:
    generator = make_deterministic()
    china, flower = luma_photos()
    half = flower.shape[0] // 2
    train_photos = [china, flower[:half]]
    model = SuperResolution()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, STEPS)
    for step in range(STEPS):
        high = random_patches(train_photos, BATCH, generator)
        loss = F.l1_loss(model(shrink(high)), high)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 500 == 0:
            print(f"step {step + 1}/{STEPS}: L1 {float(loss.detach()):.3f} grey levels")
    model.eval()
    high = torch.from_numpy(held_out_tiles(flower[half:]))
    low = shrink(high)
    with torch.no_grad():
        expected = model(low).numpy()
        bicubic = F.interpolate(low, scale_factor=2, mode="bicubic", align_corners=False).numpy()
    path = MODELS_DIR / f"{NAME}.onnx"
    export(model, low[:2], path, output_name="output")
    onnx_model = check_model(path)
    check_dynamic_batch(onnx_model)
    actual = run_onnx(path, {"input": low.numpy()})
    assert_close(f"{NAME} onnxruntime vs torch", expected, actual, atol=1e-3)
    target = high.numpy().astype(np.float64)
    score, baseline = psnr(actual, target), psnr(bicubic, target)
    save_npz(
        DATA_DIR / f"{NAME}_eval.npz",
        {
            "task": np.array("super_resolution"),
            "images": low.numpy().astype(np.uint8),
            "divisor": np.float64(1.0),
            "input_shape": np.array([1, LOW, LOW]),
            "target": high.numpy().astype(np.uint8),
            "psnr": np.float64(score),
            "bicubic_psnr": np.float64(baseline),
        },
    )
    calibration = shrink(
        random_patches(train_photos, CALIBRATION_SIZE, torch.Generator().manual_seed(1))
    )
    save_calibration(NAME, "input", calibration.numpy())
    print(
        f"{NAME}: PSNR {score:.3f} dB on {len(high)} held-out 64x64 tiles "
        f"(bicubic {baseline:.3f} dB)"
    )
    print(f"  ops: {op_histogram(onnx_model)}")


if __name__ == "__main__":
    main()
