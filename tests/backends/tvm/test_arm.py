"""arm64-linux libraries run under qemu-user (tools/arm_emulate.py) and match onnxruntime.

Needs the aarch64 cross compiler, qemu-aarch64 and the emulator sysroot that
tools/setup_arm_emulator.sh builds (default build/arm-emulator, or $ONNXPRESS_ARM_EMULATOR;
.ci/run builds it where apt-get works). Skipped otherwise: the ELF check in
test_tvm_backend.py still runs wherever the cross compiler exists.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import REPO, make_mlp
from qdq_helpers import conv_model, quantize

pytest.importorskip("tvm")

from onnxpress.backends.tvm.backend import compile_model
from onnxpress.backends.tvm.targets import ARM_CROSS_CXX

EMULATOR = Path(os.environ.get("ONNXPRESS_ARM_EMULATOR", REPO / "build" / "arm-emulator"))

pytestmark = pytest.mark.skipif(
    not (
        shutil.which("qemu-aarch64")
        and shutil.which(ARM_CROSS_CXX)
        and (EMULATOR / "sysroot" / "usr" / "bin" / "python3.11").exists()
        and (EMULATOR / "site" / "tvm").is_dir()
    ),
    reason="no aarch64 emulator (run tools/setup_arm_emulator.sh)",
)


def _emulate(folder: Path, model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict:
    reference = folder.parent / f"{folder.name}.onnx"
    onnx.save(model, reference)
    npz = folder.parent / f"{folder.name}.npz"
    np.savez(npz, **inputs)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "arm_emulate.py"),
            str(folder),
            "--verify",
            str(reference),
            "--inputs",
            str(npz),
            "--emulator",
            str(EMULATOR),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_float_mlp_runs_on_aarch64(tmp_path: Path) -> None:
    model = make_mlp()
    compile_model(model, "arm64-linux", tmp_path / "mlp", input_shapes={"x": [2, 8]})
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    result = _emulate(tmp_path / "mlp", model, {"x": x})
    assert result["ok"] and result["errors"]["y"] <= 1e-4


@pytest.mark.parametrize(
    ("target", "kernel"), [("arm64-linux", "relax"), ("arm64-linux+dotprod", "sdot")]
)
def test_int8_lowered_conv_runs_on_aarch64(tmp_path: Path, target: str, kernel: str) -> None:
    qdq, _ = quantize(conv_model())
    compiled = compile_model(qdq, target, tmp_path / "int8")
    assert compiled.manifest["int8"]["lowered"]["conv2d"] == 2
    assert compiled.manifest["int8"]["kernel"] == kernel
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump and kernel == "sdot":
        listing = subprocess.run(
            [objdump, "-d", str(compiled.library)], capture_output=True, text=True, check=True
        ).stdout
        assert "\tsdot\t" in listing
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 9, 9)).astype(np.float32)
    result = _emulate(tmp_path / "int8", qdq, {"x": x})
    assert result["ok"] and result["errors"]["y"] <= 1e-4


def test_blocked_convnet_runs_on_aarch64(tmp_path: Path) -> None:
    """The blocked layout with NEON's 4-lane channel blocks (padded 24-channel tensors,
    depthwise, squeeze-and-excitation, ceil-mode max-pool, upsampling) under qemu."""
    from backends.tvm.test_blocked_layout import convnet

    model = convnet()
    compile_model(model, "arm64-linux", tmp_path / "blocked")
    x = np.random.default_rng(3).standard_normal((1, 3, 24, 24)).astype(np.float32)
    result = _emulate(tmp_path / "blocked", model, {"x": x})
    assert result["ok"] and result["errors"]["y"] <= 1e-4
