"""Compile targets for ``onnxpress compile``: a short name -> a TVM target dict and an exporter.

  x86 | host              -> {"kind": "llvm", "mcpu": <this CPU>, "num-cores": n}   (.so, g++)
  x86-64                  -> {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}         (portable)
  arm | arm64-linux | aarch64  [+dotprod]
                          -> {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
                             (+dotprod adds the Armv8.2 dot-product instructions to mattr)
                             .so linked by aarch64-linux-gnu-g++, or a .tar of objects when
                             that cross compiler is missing
  cuda[:sm_XX]            -> {"kind": "cuda", "arch": "sm_XX", "host": <x86 host>} (default sm_90)

A target is plain data (``TargetSpec``) so it can be written into the manifest and parsed
without importing TVM; ``tvm_target()`` builds the TVM object when TVM is loaded.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from onnxpress.core.errors import OnnxpressError

ARM_CROSS_CXX = "aarch64-linux-gnu-g++"
DEFAULT_CUDA_ARCH = "sm_90"
_CUDA_RE = re.compile(r"^cuda(?::(sm_\d{2,3}[a-z]?))?$")
TARGET_NAMES = (
    "x86",
    "host",
    "x86-64",
    "arm",
    "arm64-linux",
    "aarch64",
    "arm64-linux+dotprod",
    "cuda[:sm_XX]",
)


class TargetError(OnnxpressError):
    """An unknown target name, or a target whose toolchain is missing."""


@dataclass(frozen=True)
class TargetSpec:
    """A resolved compile target: what TVM gets and how the library is exported."""

    name: str  # the canonical short name: x86, x86-64, arm64-linux, cuda
    config: dict[str, Any]  # the TVM target as a dict (TVM 0.27 takes dicts, not flag strings)
    library_suffix: str  # ".so" or ".tar"
    cross_compiler: str | None = None  # passed to export_library as cc=...
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def runs_here(self) -> bool:
        """Whether a library for this target can be loaded and run on this machine."""
        if self.is_gpu:
            return False
        triple = str(self.config.get("mtriple", ""))
        return not triple.startswith("aarch64") or platform.machine() in ("aarch64", "arm64")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "tvm": self.config, "library": self.library_suffix}


def host_cpu() -> str | None:
    """LLVM's name for this machine's CPU (e.g. znver3), or None when TVM cannot tell."""
    try:
        from tvm.target import codegen

        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:
        return None
    return cpu if cpu and cpu != "generic" else None


def _host_config() -> dict[str, Any]:
    config: dict[str, Any] = {"kind": "llvm"}
    cpu = host_cpu()
    if cpu:
        config["mcpu"] = cpu
    config["num-cores"] = os.cpu_count() or 1
    return config


def parse_target(text: str) -> TargetSpec:
    """Resolve a target name (see the module docstring) or raise TargetError."""
    name = text.strip().lower()
    if name in ("x86", "host", "llvm"):
        notes = []
        config = _host_config()
        if "mcpu" in config:
            notes.append(
                f"built for this CPU ({config['mcpu']}); use x86-64 for a portable library"
            )
        return TargetSpec("x86", config, ".so", notes=notes)
    if name in ("x86-64", "x86_64"):
        return TargetSpec("x86-64", {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}, ".so")
    base, _, extra = name.partition("+")
    if base in ("arm", "arm64", "arm64-linux", "aarch64", "aarch64-linux") and extra in (
        "",
        "dotprod",
    ):
        config = {
            "kind": "llvm",
            "mtriple": "aarch64-linux-gnu",
            "mattr": ["+neon", "+dotprod"] if extra else ["+neon"],
        }
        if shutil.which(ARM_CROSS_CXX):
            return TargetSpec("arm64-linux", config, ".so", cross_compiler=ARM_CROSS_CXX)
        return TargetSpec(
            "arm64-linux",
            config,
            ".tar",
            notes=[
                f"{ARM_CROSS_CXX} not found: wrote a .tar of object files; link it on the "
                "device or install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
            ],
        )
    match = _CUDA_RE.match(name)
    if match:
        arch = match.group(1) or DEFAULT_CUDA_ARCH
        host = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
        return TargetSpec("cuda", {"kind": "cuda", "arch": arch, "host": host}, ".so")
    raise TargetError(f"unknown target '{text}' (targets: {', '.join(TARGET_NAMES)})")


def tvm_target(spec: TargetSpec) -> Any:
    """The ``tvm.target.Target`` for a spec (imports TVM)."""
    import tvm

    return tvm.target.Target(spec.config)
