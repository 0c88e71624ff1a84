"""Pipeline text and TOML recipes resolve to validated pass instances."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnxpress.core.errors import PipelineError
from onnxpress.core.pipeline import format_pipeline, load_recipe, parse_pipeline


def test_parse_pipeline_builds_passes_with_options() -> None:
    passes = parse_pipeline("cleanup{identity=false},toposort")
    assert [p.name for p in passes] == ["cleanup", "toposort"]
    assert passes[0].options.identity is False
    assert format_pipeline(passes) == "cleanup{identity=false},toposort"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty pipeline"),
        ("cleanup,,toposort", "empty pass name"),
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("cleanp", "did you mean 'cleanup'"),
        ("cleanup{identity=maybe}", "pass 'cleanup': option 'identity'"),
        ("cleanup{colour=red}", "unknown option 'colour'"),
        ("cleanup{identity=true", "unbalanced"),
    ],
)
def test_bad_pipelines(text: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_recipe_with_pass_tables(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[verify]\nlevel = "structure"\ntolerance = 1e-4\n\n'
        '[[pass]]\nname = "cleanup"\nidentity = false\n\n[[pass]]\nname = "toposort"\n'
    )
    loaded = load_recipe(recipe)
    assert [p.name for p in loaded.passes] == ["cleanup", "toposort"]
    assert loaded.passes[0].options.identity is False
    assert loaded.verify.level == "structure"
    assert loaded.verify.tolerance == 1e-4


def test_recipe_with_pipeline_text_and_calibration(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('pipeline = "cleanup,toposort"\ncalibration = "calib"\n')
    loaded = load_recipe(recipe)
    assert len(loaded.passes) == 2
    assert loaded.calibration == str((tmp_path / "calib").resolve())


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[[pass]]\nidentity = true\n", "has no name"),
        ("colour = 1\n", "unknown recipe keys"),
        ('[[pass]]\nname = "cleanup"\nidentity = 3\n', "expected true or false"),
        ("this is not toml", "not valid TOML"),
        ('[verify]\nspeed = 1\n[[pass]]\nname = "cleanup"\n', r"\[verify\] accepts"),
    ],
)
def test_bad_recipes(tmp_path: Path, body: str, message: str) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(body)
    with pytest.raises(PipelineError, match=message):
        load_recipe(recipe)
