"""targets: the shared vocabulary, host detection from CPU flags, defaults and arithmetic."""

from __future__ import annotations

import pytest

from onnxpress.core.errors import PipelineError
from onnxpress.core.targets import (
    DEFAULT_TARGETS,
    EXACT,
    PAIR_SATURATING,
    arithmetics,
    host_target,
    parse_target,
    parse_targets,
    target_from_flags,
)


@pytest.mark.parametrize(
    ("machine", "flags", "expected"),
    [
        ("x86_64", {"avx2", "fma"}, "avx2"),  # AMD Zen 3, older Intel
        ("x86_64", {"avx2", "avx512f", "avx512bw"}, "avx512"),  # Skylake-SP
        ("x86_64", {"avx2", "avx512bw", "avx512_vnni"}, "avx512-vnni"),  # Cascade Lake, Zen 4
        ("x86_64", {"avx2", "avx_vnni"}, "avx-vnni"),  # Alder Lake
        ("aarch64", {"asimd"}, "arm64"),
        ("aarch64", {"asimd", "asimddp"}, "arm64+dotprod"),
    ],
)
def test_target_from_cpu_flags(machine: str, flags: set[str], expected: str) -> None:
    assert target_from_flags(machine, flags).name == expected


def test_saturating_targets_are_x86_without_vnni() -> None:
    assert {name for name in ("avx2", "avx512") if parse_target(name).saturates} == {
        "avx2",
        "avx512",
    }
    for name in ("avx512-vnni", "avx-vnni", "arm64", "arm64+dotprod", "cuda"):
        assert parse_target(name).arithmetic == EXACT


def test_defaults_cover_both_x86_kinds_and_arm() -> None:
    targets = parse_targets(None)
    assert [t.name for t in targets] == list(DEFAULT_TARGETS)
    kinds = arithmetics(targets)
    assert kinds[PAIR_SATURATING] == ["avx2"] and kinds[EXACT] == ["avx512-vnni", "arm64"]


def test_host_and_repeats() -> None:
    host = host_target()
    assert parse_target("host") == host and parse_target("HOST") == host
    assert [t.name for t in parse_targets(["avx2", "host", "avx2"])] == list(
        dict.fromkeys(["avx2", host.name])
    )


def test_unknown_target_is_one_line() -> None:
    with pytest.raises(PipelineError, match=r"unknown target 'avx3' \(targets: avx2, ") as info:
        parse_target("avx3")
    assert "\n" not in str(info.value)
