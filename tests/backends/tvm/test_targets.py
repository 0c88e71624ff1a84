"""Compile target names (onnxpress.backends.tvm.targets): the vocabulary of ``optimize
--target`` maps to TVM targets and to the integer arithmetic of their kernels, and the older
names keep working."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from onnxpress.backends.tvm.targets import (
    TargetError,
    allowed_cpus,
    configure_threads,
    parse_target,
    physical_cores,
)
from onnxpress.core.targets import host_target


@pytest.mark.parametrize(
    ("name", "spec_name", "mcpu", "int8", "saturates"),
    [
        ("avx2", "avx2", "haswell", "avx2", True),
        ("avx512", "avx512", "skylake-avx512", "avx512", True),
        ("avx512-vnni", "avx512-vnni", "cascadelake", "avx512-vnni", False),
        ("AVX-VNNI", "avx-vnni", "alderlake", "avx-vnni", False),
    ],
)
def test_x86_names_map_to_llvm_cpus(
    name: str, spec_name: str, mcpu: str, int8: str, saturates: bool
) -> None:
    spec = parse_target(name)
    assert spec.name == spec_name
    assert spec.config["kind"] == "llvm" and spec.config["mcpu"] == mcpu
    assert "mtriple" not in spec.config and spec.library_suffix == ".so"
    assert spec.int8 is not None and spec.int8.name == int8 and spec.int8.saturates is saturates
    assert spec.to_json()["int8_target"] == int8
    assert "avx2" in spec.cpu_flags


@pytest.mark.parametrize(
    ("name", "mattr", "int8"),
    [
        ("arm64", ["+neon"], "arm64"),
        ("arm64+dotprod", ["+neon", "+dotprod"], "arm64+dotprod"),
        ("arm64-linux", ["+neon"], "arm64"),
        ("arm64-linux+dotprod", ["+neon", "+dotprod"], "arm64+dotprod"),
    ],
)
def test_arm_names(name: str, mattr: list[str], int8: str) -> None:
    spec = parse_target(name)
    assert spec.name == "arm64-linux"
    assert spec.config["mtriple"] == "aarch64-linux-gnu" and spec.config["mattr"] == mattr
    assert spec.int8 is not None and spec.int8.name == int8 and not spec.int8.saturates


def test_cuda_host_and_old_names() -> None:
    cuda = parse_target("cuda")
    assert cuda.config["kind"] == "cuda" and cuda.config["arch"] == "sm_90"
    assert cuda.int8 is not None and cuda.int8.name == "cuda"
    assert parse_target("cuda:sm_80").config["arch"] == "sm_80"
    host = parse_target("host")
    assert host.int8 == host_target()
    if platform.machine() == "x86_64":
        assert host.name == parse_target("x86").name == "x86"
        assert host.config["kind"] == "llvm" and host.runs_here()
    portable = parse_target("x86-64")
    assert portable.config == {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    assert portable.int8 is None and portable.to_json()["int8_arithmetic"] == "exact"
    with pytest.raises(TargetError, match="avx2, avx512"):
        parse_target("sse4")


def test_x86_targets_run_here_only_with_their_cpu_flags() -> None:
    avx2 = parse_target("avx2")
    flags = set(open("/proc/cpuinfo").read().split()) if platform.system() == "Linux" else set()
    assert avx2.runs_here() == (platform.machine() == "x86_64" and {"avx2", "fma"} <= flags)
    vnni = parse_target("avx512-vnni")
    assert vnni.runs_here() == (platform.machine() == "x86_64" and "avx512_vnni" in flags)


def _topology(root: Path, cores: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in cores.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_count_smt_siblings_once(tmp_path: Path) -> None:
    smt = _topology(tmp_path / "smt", {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    assert physical_cores([0, 1, 2, 3], smt) == 2
    assert physical_cores([0, 2], smt) == 1  # two hyper-threads of one core
    flat = _topology(tmp_path / "flat", {0: (0, 0), 1: (0, 1)})  # a VM: one thread per core
    assert physical_cores([0, 1], flat) == 2
    two_sockets = _topology(tmp_path / "sockets", {0: (0, 0), 1: (1, 0)})
    assert physical_cores([0, 1], two_sockets) == 2
    assert physical_cores([0, 1, 2], tmp_path / "missing") == 3  # unreadable: every CPU


def test_tvm_threads_follow_cores_unless_the_user_chose() -> None:
    env: dict[str, str] = {}
    count = configure_threads(env)
    assert count is not None and count >= 1 and env["TVM_NUM_THREADS"] == str(count)
    assert env["TVM_BIND_THREADS"] == "0"  # workers not pinned: a busy core stalls no join
    assert count == physical_cores(allowed_cpus())
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        chosen = {name: "1", "TVM_BIND_THREADS": "1"}
        assert configure_threads(chosen) is None
        assert chosen == {name: "1", "TVM_BIND_THREADS": "1"}
