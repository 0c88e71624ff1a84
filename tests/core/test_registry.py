"""Pass registration: decorator, duplicates, plugin files and the entry-point group."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import REPO, run_cli

import onnxpress
from onnxpress.core.errors import PluginError
from onnxpress.core.pass_base import NoOptions, Pass
from onnxpress.core.registry import all_passes, register_pass, unregister

DATA = Path(__file__).parent.parent / "data"


def test_builtins_are_registered_with_descriptions() -> None:
    passes = all_passes()
    for name in ("cleanup", "toposort", "fold-constants", "fold-batchnorm"):
        assert name in passes
        assert passes[name].description()


def test_duplicate_name_is_an_error() -> None:
    with pytest.raises(PluginError, match="already registered"):

        @register_pass("cleanup")
        class Again(Pass[NoOptions]):
            pass


def test_name_must_be_kebab_case() -> None:
    with pytest.raises(PluginError, match="kebab-case"):

        @register_pass("My_Pass")
        class Bad(Pass[NoOptions]):
            pass


def test_options_must_be_frozen() -> None:
    @dataclass
    class Loose:
        x: int = 1

    with pytest.raises(PluginError, match="must be frozen"):

        @register_pass("loose-pass")
        class LoosePass(Pass[Loose]):
            options_type = Loose

    unregister("loose-pass")


def test_plugin_file_from_python(mlp_model: onnx.ModelProto) -> None:
    added = onnxpress.load_plugin_file(DATA / "scale_plugin.py")
    assert added == ["scale-outputs"] or "scale-outputs" in all_passes()
    model, report = onnxpress.optimize(mlp_model, passes="scale-outputs{alpha=2}")
    assert [n.op_type for n in model.graph.node].count("Mul") == 1
    assert report.passes[0].result.counts == {"scaled": 1}
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    before = ort.InferenceSession(mlp_model.SerializeToString()).run(None, {"x": x})[0]
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, 2 * before, rtol=1e-5)


def test_plugin_file_from_cli(mlp_path: Path) -> None:
    out = mlp_path.with_name("scaled.onnx")
    proc = run_cli(
        "optimize",
        str(mlp_path),
        "-o",
        str(out),
        "--plugin",
        str(DATA / "scale_plugin.py"),
        "--passes",
        "scale-outputs{alpha=2}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "scale-outputs{alpha=2.0}" in proc.stdout
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("Mul") == 1
    listing = run_cli("--plugin", str(DATA / "scale_plugin.py"), "passes")
    assert "scale-outputs" in listing.stdout and "alpha: float = 1.0" in listing.stdout


def test_plugin_option_validation_runs_before_loading(tmp_path: Path) -> None:
    proc = run_cli(
        "optimize",
        str(tmp_path / "missing.onnx"),
        "--plugin",
        str(DATA / "scale_plugin.py"),
        "--passes",
        "scale-outputs{alpha=0}",
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "onnxpress: error: pass 'scale-outputs': alpha must be non-zero"


def test_entry_point_plugin_installed_with_pip(tmp_path: Path, mlp_path: Path) -> None:
    """Install a real plugin distribution with pip and run its pass through the entry point."""
    pkg = tmp_path / "src"
    (pkg / "onnxpress_scale").mkdir(parents=True)
    (pkg / "onnxpress_scale" / "__init__.py").write_text((DATA / "scale_plugin.py").read_text())
    (pkg / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "onnxpress-scale"\nversion = "0.1"\n'
        '[project.entry-points."onnxpress.passes"]\nscale-outputs = "onnxpress_scale:ScaleOutputs"\n'
        "[tool.setuptools]\npackages = ['onnxpress_scale']\n"
    )
    site = tmp_path / "site"
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(pkg),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    assert list(site.glob("onnxpress_scale-0.1.dist-info/entry_points.txt"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    listing = run_cli("passes", env=env)
    assert "scale-outputs" in listing.stdout, listing.stderr
    out = tmp_path / "scaled.onnx"
    proc = run_cli(
        "optimize", str(mlp_path), "-o", str(out), "--passes", "scale-outputs{alpha=3}", env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("Mul") == 1
