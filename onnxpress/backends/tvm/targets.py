"""Compile targets for ``onnxpress compile``: a name -> a TVM target dict and an exporter.

The names of ``optimize --target`` (onnxpress.core.targets) mean the same CPUs here:

  avx2          -> {"kind": "llvm", "mcpu": "haswell"}         AVX2 + FMA, no AVX-512
  avx512        -> {"kind": "llvm", "mcpu": "skylake-avx512"}  AVX-512BW, no VNNI
  avx512-vnni   -> {"kind": "llvm", "mcpu": "cascadelake"}     AVX-512 VNNI
  avx-vnni      -> {"kind": "llvm", "mcpu": "alderlake"}       AVX2 + AVX-VNNI
  arm64         -> arm64-linux;   arm64+dotprod -> arm64-linux+dotprod;   cuda -> cuda
  host          -> this CPU (x86 below, or arm64[+dotprod] on an aarch64 machine)

and the older names keep working:

  x86                     -> {"kind": "llvm", "mcpu": <this CPU>, "num-cores": n}   (.so, g++)
  x86-64                  -> {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}         (portable)
  arm | arm64-linux | aarch64  [+dotprod]
                          -> {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
                             (+dotprod adds the Armv8.2 dot-product instructions to mattr)
                             .so linked by aarch64-linux-gnu-g++, or a .tar of objects when
                             that cross compiler is missing
  cuda[:sm_XX]            -> {"kind": "cuda", "arch": "sm_XX", "host": <x86 host>} (default sm_90)

Each spec also names its ``int8`` target (a core Target): how its integer kernels sum u8 x s8
products, which is what ``compile --int8 auto`` decides by (int8.py). A target is plain data
(``TargetSpec``) so it can be written into the manifest and parsed without importing TVM;
``tvm_target()`` builds the TVM object when TVM is loaded.

Threads: TVM sizes its runtime thread pool once, when the first parallel kernel runs, from
``TVM_NUM_THREADS`` (else ``OMP_NUM_THREADS``), else from the hardware thread count *halved
on x86* (it assumes two hyper-threads per core). On VMs and containers without SMT that
leaves half of the cores idle (every library ran on one of this machine's two cores).
``configure_threads`` sets ``TVM_NUM_THREADS`` to the physical cores of this process's
affinity mask unless the user set either variable; the package calls it on import.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxpress.core.errors import OnnxpressError
from onnxpress.core.targets import TARGETS as CORE_TARGETS
from onnxpress.core.targets import Target, host_target

logger = logging.getLogger(__name__)

ARM_CROSS_CXX = "aarch64-linux-gnu-g++"
DEFAULT_CUDA_ARCH = "sm_90"
_CUDA_RE = re.compile(r"^cuda(?::(sm_\d{2,3}[a-z]?))?$")
# The x86 names of the shared vocabulary: LLVM's CPU, and the /proc/cpuinfo flags it needs.
X86_CPUS: dict[str, tuple[str, frozenset[str]]] = {
    "avx2": ("haswell", frozenset({"avx2", "fma"})),
    "avx512": ("skylake-avx512", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"})),
    "avx512-vnni": (
        "cascadelake",
        frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
    ),
    "avx-vnni": ("alderlake", frozenset({"avx2", "fma", "avx_vnni"})),
}
TARGET_NAMES = (
    *X86_CPUS,
    "arm64",
    "arm64+dotprod",
    "cuda[:sm_XX]",
    "host",
    "x86",
    "x86-64",
    "arm64-linux[+dotprod]",
)


class TargetError(OnnxpressError):
    """An unknown target name, or a target whose toolchain is missing."""


@dataclass(frozen=True)
class TargetSpec:
    """A resolved compile target: what TVM gets and how the library is exported."""

    name: str  # the canonical short name: avx2, ..., x86, x86-64, arm64-linux, cuda
    config: dict[str, Any]  # the TVM target as a dict (TVM 0.27 takes dicts, not flag strings)
    library_suffix: str  # ".so" or ".tar"
    cross_compiler: str | None = None  # passed to export_library as cc=...
    notes: list[str] = field(default_factory=list)
    int8: Target | None = None  # the integer arithmetic of its kernels (None: generic x86-64)
    cpu_flags: frozenset[str] = frozenset()  # x86: the CPU flags a library needs to run

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
        if triple.startswith("aarch64"):
            return platform.machine() in ("aarch64", "arm64")
        if platform.machine().lower() not in ("x86_64", "amd64"):
            return False
        return self.cpu_flags <= host_flags()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tvm": self.config,
            "library": self.library_suffix,
            "int8_target": self.int8.name if self.int8 is not None else None,
            "int8_arithmetic": self.int8.arithmetic if self.int8 is not None else "exact",
        }


def host_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def host_cpu() -> str | None:
    """LLVM's name for this machine's CPU (e.g. znver3), or None when TVM cannot tell."""
    try:
        from tvm.target import codegen

        cpu = str(codegen.llvm_get_system_cpu())
    except Exception:
        return None
    return cpu if cpu and cpu != "generic" else None


def _cores() -> int:
    return os.cpu_count() or 1


def _host_spec() -> TargetSpec:
    config: dict[str, Any] = {"kind": "llvm"}
    cpu = host_cpu()
    notes = []
    if cpu:
        config["mcpu"] = cpu
        notes.append(f"built for this CPU ({cpu}); use x86-64 or avx2 for a portable library")
    config["num-cores"] = _cores()
    return TargetSpec("x86", config, ".so", notes=notes, int8=host_target())


def _arm_spec(dotprod: bool) -> TargetSpec:
    config = {
        "kind": "llvm",
        "mtriple": "aarch64-linux-gnu",
        "mattr": ["+neon", "+dotprod"] if dotprod else ["+neon"],
    }
    core = CORE_TARGETS["arm64+dotprod" if dotprod else "arm64"]
    if shutil.which(ARM_CROSS_CXX):
        return TargetSpec("arm64-linux", config, ".so", cross_compiler=ARM_CROSS_CXX, int8=core)
    return TargetSpec(
        "arm64-linux",
        config,
        ".tar",
        notes=[
            f"{ARM_CROSS_CXX} not found: wrote a .tar of object files; link it on the "
            "device or install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"
        ],
        int8=core,
    )


def parse_target(text: str) -> TargetSpec:
    """Resolve a target name (see the module docstring) or raise TargetError."""
    name = text.strip().lower()
    if name in X86_CPUS:
        cpu, flags = X86_CPUS[name]
        config = {"kind": "llvm", "mcpu": cpu, "num-cores": _cores()}
        return TargetSpec(name, config, ".so", int8=CORE_TARGETS[name], cpu_flags=flags)
    if name == "host" and platform.machine().lower() in ("aarch64", "arm64"):
        return _arm_spec(host_target().name == "arm64+dotprod")
    if name in ("x86", "host", "llvm"):
        return _host_spec()
    if name in ("x86-64", "x86_64"):
        return TargetSpec("x86-64", {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}, ".so")
    base, _, extra = name.partition("+")
    if base in ("arm", "arm64", "arm64-linux", "aarch64", "aarch64-linux") and extra in (
        "",
        "dotprod",
    ):
        return _arm_spec(bool(extra))
    match = _CUDA_RE.match(name)
    if match:
        arch = match.group(1) or DEFAULT_CUDA_ARCH
        host = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
        config = {"kind": "cuda", "arch": arch, "host": host}
        return TargetSpec("cuda", config, ".so", int8=CORE_TARGETS["cuda"])
    raise TargetError(f"unknown target '{text}' (targets: {', '.join(TARGET_NAMES)})")


def tvm_target(spec: TargetSpec) -> Any:
    """The ``tvm.target.Target`` for a spec (imports TVM)."""
    import tvm

    return tvm.target.Target(spec.config)


TOPOLOGY = Path("/sys/devices/system/cpu")
USER_VARIABLES = ("TVM_NUM_THREADS", "OMP_NUM_THREADS")


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on (all of them where affinity is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int], topology: Path = TOPOLOGY) -> int:
    """Distinct physical cores among ``cpus`` (SMT siblings count once); the CPU count where
    the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        folder = topology / f"cpu{cpu}" / "topology"
        try:
            package = (folder / "physical_package_id").read_text(encoding="utf-8").strip()
            core = (folder / "core_id").read_text(encoding="utf-8").strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def runtime_threads() -> int:
    """The TVM runtime's worker threads in this process: the first of ``TVM_NUM_THREADS``,
    ``OMP_NUM_THREADS`` set to a count (TVM's own order), else the physical cores that
    ``configure_threads`` gives it."""
    for name in USER_VARIABLES:
        text = os.environ.get(name, "").strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    return physical_cores(allowed_cpus())


def split_threads(spec: TargetSpec, parallel: str) -> int:
    """The runtime threads a library's dynamic loop split is built for (build.py); 0 for
    TVM's static split: asked for, or a library for another machine (any named target but
    this host's own ``x86``), whose thread count is not known here."""
    if parallel != "dynamic" or spec.name != "x86":
        return 0
    threads = runtime_threads()
    return threads if threads > 1 else 0


def configure_threads(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Set TVM_NUM_THREADS to the physical cores available here, unless the user chose a
    thread count; returns the count set, or None when left to the user.

    Also leaves TVM's workers free to move between cores (TVM_BIND_THREADS=0) unless the
    user chose: TVM pins worker i to core i and splits every parallel loop statically, so
    one busy core (another process, onnxruntime's spinning threads) stalls each kernel at
    its join until the pinned worker's next time slice. mobilenet_v2 ran at 160 ms per call
    instead of 5 with one spinning process on the second core; unpinned, 7.9 ms, as
    onnxruntime's 8.0 (docs/BENCHMARKS.md, run 11)."""
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    env.setdefault("TVM_BIND_THREADS", "0")
    if any(env.get(name) for name in USER_VARIABLES):
        return None
    count = physical_cores(allowed_cpus())
    env["TVM_NUM_THREADS"] = str(count)
    logger.debug("TVM runtime threads: %d (physical cores in the affinity mask)", count)
    return count
