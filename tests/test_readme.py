"""The README's commands work: the demo recipe in the Makefile, and the documented examples."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from onnxpress.core.pipeline import load_recipe, parse_pipeline


def _make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target, with continuation lines joined."""
    text = (REPO / "Makefile").read_text()
    body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", text, re.M)
    assert body, f"no '{target}' target in the Makefile"
    joined = body.group(1).replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def test_demo_commands_run(tmp_path: Path) -> None:
    """Run every command of `make demo` with the current interpreter, writing into tmp."""
    bin_dir = Path(sys.executable).parent
    for line in _make_recipe("demo"):
        if line.startswith("mkdir"):
            continue
        # out/ first: the interpreter's own path may contain "out/" (e.g. /work/layout/.venv).
        line = line.replace("out/", f"{tmp_path}/").replace("$(BIN)/", f"{bin_dir}/")
        proc = subprocess.run(
            shlex.split(line), capture_output=True, text=True, cwd=REPO, timeout=300
        )
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
    report = json.loads((tmp_path / "cnn_mnist.report.json").read_text())
    assert report["before"]["op_histogram"]["BatchNormalization"] == 6
    assert "BatchNormalization" not in report["after"]["op_histogram"]
    # With calibration data the default pipeline quantizes: int8 weights, a smaller file.
    assert [p["name"] for p in report["passes"]][-2:] == ["qdq", "toposort"]
    assert report["after"]["op_histogram"]["DequantizeLinear"] > 0
    assert report["after"]["bytes"] < 0.6 * report["before"]["bytes"]
    evaluation = subprocess.run(
        [sys.executable, "models/evaluate.py", str(tmp_path / "cnn_mnist.opt.onnx"), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=True,
    )
    result = json.loads(evaluation.stdout)
    assert result["metric"] == "accuracy" and result["value"] >= result["reference"] - 0.01


def test_demo_and_test_targets_exist() -> None:
    assert any("onnxpress optimize" in line for line in _make_recipe("demo"))
    assert any("pytest" in line for line in _make_recipe("test"))
    assert "make test" in (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_readme_examples_parse(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    for pipeline in re.findall(r'--passes "([^"]+)"', readme):
        if "scale-outputs" not in pipeline:  # the plugin example registers that one
            assert parse_pipeline(pipeline)
    recipe = re.search(r"```toml\n(calibration.*?)```", readme, re.S)
    assert recipe
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.group(1))
    loaded = load_recipe(path)
    assert [p.name for p in loaded.passes] == ["fold-batchnorm", "cleanup"]
    assert loaded.verify.budget == pytest.approx(0.02)
