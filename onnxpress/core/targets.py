"""The hardware targets a model is built for, and the integer arithmetic each one runs.

One vocabulary for ``optimize --target`` and ``compile --target``:

    x86:   avx2, avx512, avx512-vnni, avx-vnni
    arm:   arm64, arm64+dotprod
    gpu:   cuda
    host:  the CPU this process runs on, read from its feature flags

What matters for int8 is how a target's onnxruntime (or TVM) kernels sum u8 x s8 products.
x86 without VNNI multiplies with ``vpmaddubsw``, which adds each adjacent pair of products
into int16 with saturation (``PAIR_SATURATING``); VNNI's ``vpdpbusd``, ARM's ``sdot``/``udot``
and NEON widening multiplies, and CUDA's ``dp4a`` accumulate in int32 (``EXACT``).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Literal

from onnxpress.core.errors import PipelineError

Arithmetic = Literal["exact", "pair-saturating"]
EXACT: Arithmetic = "exact"
PAIR_SATURATING: Arithmetic = "pair-saturating"


@dataclass(frozen=True)
class Target:
    name: str
    arch: Literal["x86", "arm64", "cuda"]
    arithmetic: Arithmetic  # how u8 x s8 products are summed by the int8 kernels
    description: str

    @property
    def saturates(self) -> bool:
        return self.arithmetic == PAIR_SATURATING


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("avx2", "x86", PAIR_SATURATING, "x86-64 with AVX2 (vpmaddubsw: int16 pair sums)"),
        Target("avx512", "x86", PAIR_SATURATING, "x86-64 with AVX-512BW, no VNNI (int16 pairs)"),
        Target("avx512-vnni", "x86", EXACT, "x86-64 with AVX-512 VNNI (vpdpbusd: int32)"),
        Target("avx-vnni", "x86", EXACT, "x86-64 with AVX-VNNI (vpdpbusd: int32)"),
        Target("arm64", "arm64", EXACT, "aarch64 NEON (widening multiplies: int32)"),
        Target("arm64+dotprod", "arm64", EXACT, "aarch64 with the dot-product extension"),
        Target("cuda", "cuda", EXACT, "NVIDIA GPU (dp4a: int32)"),
    )
}

# With no --target, a model must hold on every CPU kind onnxruntime has int8 kernels for.
DEFAULT_TARGETS: tuple[str, ...] = ("avx2", "avx512-vnni", "arm64")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def target_from_flags(machine: str, flags: set[str]) -> Target:
    """The target a CPU with these ``/proc/cpuinfo`` flags is."""
    if machine.lower() in ("aarch64", "arm64"):
        return TARGETS["arm64+dotprod" if "asimddp" in flags else "arm64"]
    if "avx512_vnni" in flags and "avx512bw" in flags:
        return TARGETS["avx512-vnni"]
    if "avx_vnni" in flags:
        return TARGETS["avx-vnni"]
    if "avx512bw" in flags:
        return TARGETS["avx512"]
    return TARGETS["avx2"]


@functools.cache
def host_target() -> Target:
    """The target this process runs on (its CPU flags)."""
    return target_from_flags(platform.machine(), _cpu_flags())


def host_judges(targets: tuple[Target, ...]) -> bool:
    """Whether this CPU's onnxruntime int8 kernels sum as one of ``targets`` does. Only then
    does its run judge a quantized model: an AVX2 build machine's int16 pair sums say nothing
    of a VNNI or ARM target (their arithmetic is emulated instead), and the reverse."""
    return host_target().arithmetic in {t.arithmetic for t in targets}


def parse_target(name: str) -> Target:
    """A target by name (``host`` is this CPU); a one-line error for an unknown name."""
    key = name.strip().lower()
    if key == "host":
        return host_target()
    if key not in TARGETS:
        raise PipelineError(f"unknown target '{name}' (targets: {', '.join([*TARGETS, 'host'])})")
    return TARGETS[key]


def parse_targets(names: list[str] | tuple[str, ...] | None) -> tuple[Target, ...]:
    """Targets by name, in order, without repeats; the defaults when none are named."""
    chosen: dict[str, Target] = {}
    for name in names or DEFAULT_TARGETS:
        target = parse_target(name)
        chosen.setdefault(target.name, target)
    return tuple(chosen.values())


def arithmetics(targets: tuple[Target, ...]) -> dict[Arithmetic, list[str]]:
    """Each kind of integer arithmetic the targets run, with the targets that run it."""
    kinds: dict[Arithmetic, list[str]] = {}
    for target in targets:
        kinds.setdefault(target.arithmetic, []).append(target.name)
    return kinds
