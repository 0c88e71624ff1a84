"""Every hostile input is one line on stderr, a non-zero exit, no output and untouched inputs.

The cases of hostile_cases.py (data loss, bad models, size bombs, external data) and those
below (calibration files, recipes and options, output paths, plugins) run in-process through
``onnxpress.cli.main.main``; a plugin that exits at import also runs in a subprocess.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from hostile_cases import CASES, mlp, npy_bytes, npz, optimize

from onnxpress.cli.main import main

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file (and '<dir>' / '<link>' markers) under folder."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "<link>" + os.readlink(path)
        elif path.is_dir():
            found[key] = "<dir>"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


# -- calibration files ---------------------------------------------------------------------------

CASES["calib-header-1e12"] = lambda d: (
    optimize(mlp(d), "--calibration", str(npz(d, {"x": npy_bytes((10**6, 10**6))}))),
    "declares shape",
)
CASES["calib-zero-size-batch"] = lambda d: (
    optimize(mlp(d), "--calibration", str(npz(d, {"x": npy_bytes((0, 8), payload=b"")}))),
    "empty",
)
CASES["calib-object-array"] = lambda d: (
    optimize(mlp(d), "--calibration", str(npz(d, {"x": npy_bytes((2,), "|O")}))),
    "pickled",
)
CASES["calib-not-a-zip"] = lambda d: (
    (d / "c.npz").write_bytes(b"\x80\x04garbage")
    and optimize(mlp(d), "--calibration", str(d / "c.npz")),
    "not a zip",
)
CASES["calib-truncated-header"] = lambda d: (
    optimize(mlp(d), "--calibration", str(npz(d, {"x": b"\x93NUMPY\x01\x00"}))),
    "not a readable",
)
CASES["calib-missing"] = lambda d: (
    optimize(mlp(d), "--calibration", str(d / "none.npz")),
    "no such",
)
CASES["calib-empty-folder"] = lambda d: (
    (d / "cal").mkdir() or optimize(mlp(d), "--calibration", str(d / "cal")),
    "no .npz files",
)
CASES["calib-wrong-name"] = lambda d: (
    np.savez(d / "c.npz", input=np.ones((2, 8), np.float32))
    or optimize(mlp(d), "--calibration", str(d / "c.npz")),
    "missing model input",
)
CASES["calib-nan"] = lambda d: (
    np.savez(d / "c.npz", x=np.full((2, 8), np.nan, np.float32))
    or optimize(mlp(d), "--calibration", str(d / "c.npz")),
    "NaN or Inf",
)


# -- recipes and options -------------------------------------------------------------------------


def recipe(d: Path, text: str, *args: str) -> tuple[list[str], str]:
    (d / "r.toml").write_text(text)
    return optimize(mlp(d), "--recipe", str(d / "r.toml"), *args), "r.toml"


RECIPES = {
    "budget-string": '[verify]\nbudget = "small"\n[[pass]]\nname = "cleanup"\n',
    "budget-list": '[verify]\nbudget = [1, 2]\n[[pass]]\nname = "cleanup"\n',
    "holdout-float": '[verify]\nholdout = 1.5\n[[pass]]\nname = "cleanup"\n',
    "tolerance-string": '[verify]\ntolerance = "tight"\n[[pass]]\nname = "cleanup"\n',
    "level-bogus": '[verify]\nlevel = "paranoid"\n[[pass]]\nname = "cleanup"\n',
    "metric-bogus": '[verify]\nmetric = "vibes"\n[[pass]]\nname = "cleanup"\n',
    "pipeline-not-text": "pipeline = 5\n",
    "pipeline-empty": 'pipeline = ""\n',
    "unknown-key": 'pipeline = "cleanup"\nspeed = 3\n',
    "calibration-not-text": 'pipeline = "cleanup"\ncalibration = 3\n',
    "pass-option-wrong-type": '[[pass]]\nname = "cleanup"\nidentity = 3\n',
    "not-toml": "[[pass\n",
}
for _name, _text in RECIPES.items():
    CASES[f"recipe-{_name}"] = lambda d, text=_text: recipe(d, text)
CASES["recipe-is-folder"] = lambda d: (
    (d / "r.toml").mkdir() or optimize(mlp(d), "--recipe", str(d / "r.toml")),
    "is a folder",
)

OPTIONS = {
    "holdout-float": (("--holdout", "1.5"), "--holdout"),
    "option-inf": (("--passes", "fold-constants{max-bytes=inf}"), "max-bytes"),
    "option-huge-int": (("--passes", "fold-constants{max-bytes=" + "9" * 40 + "}"), "max-bytes"),
    "option-nan-float": (("--passes", "fold-constants{max-growth-bytes=nan}"), "max-growth-bytes"),
    "empty-pipeline": (("--passes", ""), "empty pipeline"),
    "comma-pipeline": (("--passes", ","), "empty pass name"),
    "budget-nan": (("--budget", "nan"), "budget"),
    "tolerance-negative": (("--tolerance", "-1"), "tolerance"),
    "tolerance-inf": (("--tolerance", "inf"), "tolerance"),
    "pass-timeout-zero": (("--pass-timeout", "0"), "timeout"),
    "unknown-target": (("--target", "quantum"), "quantum"),
}
for _name, (_args, _expect) in OPTIONS.items():
    CASES[f"option-{_name}"] = lambda d, a=_args, e=_expect: (optimize(mlp(d), *a), e)


# -- output paths --------------------------------------------------------------------------------

CASES["out-is-folder"] = lambda d: (
    (d / "o").mkdir() or optimize(mlp(d), "-o", str(d / "o")),
    "folder",
)
CASES["report-is-folder"] = lambda d: (
    (d / "r").mkdir() or optimize(mlp(d), "-o", str(d / "o.onnx"), "--report", str(d / "r")),
    "folder",
)
CASES["out-under-proc"] = lambda d: (
    optimize(mlp(d), "-o", "/proc/onnxpress-test.onnx"),
    "cannot write",
)
CASES["report-under-proc"] = lambda d: (
    optimize(mlp(d), "-o", str(d / "o.onnx"), "--report", "/proc/onnxpress-r.json"),
    "cannot write",
)
CASES["out-missing-folder"] = lambda d: (
    optimize(mlp(d), "-o", str(d / "no" / "o.onnx")),
    "does not exist",
)
CASES["out-is-device"] = lambda d: (optimize(mlp(d), "-o", "/dev/null"), "not a regular file")


def _read_only(d: Path, flag: str) -> tuple[list[str], str]:
    (d / "ro").mkdir()
    out = d / "ro" / ("o.onnx" if flag == "-o" else "r.json")
    args = (
        optimize(mlp(d), flag, str(out))
        if flag == "-o"
        else optimize(mlp(d), "-o", str(d / "o.onnx"), flag, str(out))
    )
    (d / "ro").chmod(0o555)
    return args, "cannot write"


CASES["out-read-only-folder"] = lambda d: _read_only(d, "-o")
CASES["report-read-only-folder"] = lambda d: _read_only(d, "--report")


# -- plugins -------------------------------------------------------------------------------------

PASS_PLUGIN = """
import sys, time
from onnxpress import NoOptions, Pass, PassResult, register_pass

@register_pass("{name}")
class P(Pass[NoOptions]):
    def run(self, graph, ctx):
        {body}
        return PassResult()
"""


def plugin(d: Path, text: str, *args: str) -> list[str]:
    (d / "p.py").write_text(text)
    return ["--plugin", str(d / "p.py"), *optimize(mlp(d), "-o", str(d / "o.onnx"), *args)]


CASES["plugin-exits-at-import"] = lambda d: (plugin(d, "import sys\nsys.exit(3)\n"), "sys.exit(3)")
CASES["plugin-raises-at-import"] = lambda d: (
    plugin(d, "raise KeyError('k')\n"),
    "plugin raised KeyError",
)
CASES["plugin-pass-exits"] = lambda d: (
    plugin(d, PASS_PLUGIN.format(name="quitter", body="sys.exit(3)"), "--passes", "quitter"),
    "pass 'quitter' failed: called sys.exit(3)",
)
CASES["plugin-pass-raises"] = lambda d: (
    plugin(
        d, PASS_PLUGIN.format(name="raiser", body="raise ValueError('bad')"), "--passes", "raiser"
    ),
    "pass 'raiser' failed: ValueError: bad",
)
CASES["plugin-pass-hangs"] = lambda d: (
    plugin(
        d,
        PASS_PLUGIN.format(name="hanger", body="time.sleep(60)"),
        "--passes",
        "hanger",
        "--pass-timeout",
        "0.5",
    ),
    "pass 'hanger' failed: did not finish within 0.5 s",
)
CASES["plugin-bad-name"] = lambda d: (
    plugin(d, PASS_PLUGIN.format(name="Bad_Name", body="pass")),
    "not kebab-case",
)
CASES["plugin-is-folder"] = lambda d: (
    ["--plugin", str(d), *optimize(mlp(d))],
    "plugin is not a file",
)
CASES["plugin-missing"] = lambda d: (
    ["--plugin", str(d / "none.py"), *optimize(mlp(d))],
    "not found",
)

NEEDS_WRITABLE_CHECK = {"out-read-only-folder", "report-read-only-folder"}
NEEDS_TVM = {"compile-folder-file-is-input"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if name in NEEDS_WRITABLE_CHECK and ROOT:
        pytest.skip("root writes into read-only folders")
    if name in NEEDS_TVM:
        pytest.importorskip("tvm")
    folder = tmp_path / "work"
    folder.mkdir()
    args, expect = CASES[name](folder)
    before = snapshot(folder)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        for path in (folder / "ro",):
            if path.exists():
                path.chmod(0o755)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxpress: error: "), lines[0]
    assert "Traceback" not in err and "internal error" not in err
    assert expect in lines[0], lines[0]
    assert snapshot(folder) == before, "an input changed or an output was written"
    assert not Path("/proc/onnxpress-test.onnx").exists()


def test_case_count() -> None:
    assert len(CASES) >= 60


def test_plugin_exit_in_a_real_process(tmp_path: Path) -> None:
    """sys.exit(3) in a plugin used to end onnxpress with code 3 and no message."""
    (tmp_path / "p.py").write_text("import sys\nsys.exit(3)\n")
    m = mlp(tmp_path)
    before = snapshot(tmp_path)
    proc = run_cli("--plugin", str(tmp_path / "p.py"), "optimize", str(m))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"onnxpress: error: {tmp_path / 'p.py'}: plugin called sys.exit(3) while loading"
    ]
    assert snapshot(tmp_path) == before
