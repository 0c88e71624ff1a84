"""Pipeline text and option parsing: types, defaults, errors before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from onnxpress.core.errors import PipelineError
from onnxpress.core.options import build_options, format_options, parse_option_text, split_top_level


@dataclass(frozen=True)
class Opts:
    energy: float = 0.95
    rank: int | None = None
    refit: bool = True
    scheme: Literal["channel", "spatial"] = "channel"
    include: tuple[str, ...] = ()
    name: str = "x"

    def __post_init__(self) -> None:
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")


def test_split_respects_brackets_and_quotes() -> None:
    assert split_top_level('a,b{x=1,y=[2,3]},c{z="p,q"}') == ["a", "b{x=1,y=[2,3]}", 'c{z="p,q"}']


@pytest.mark.parametrize("text", ["a{x=1", "a}", "a{x='1}"])
def test_split_rejects_unbalanced(text: str) -> None:
    with pytest.raises(PipelineError):
        split_top_level(text)


def test_build_options_converts_every_type() -> None:
    values = parse_option_text(
        "p", 'energy=0.5,rank=8,refit=false,scheme=spatial,include=[fc1,"re:fc[0-9]+"],name="a b"'
    )
    opts = build_options("p", Opts, values)
    assert opts == Opts(0.5, 8, False, "spatial", ("fc1", "re:fc[0-9]+"), "a b")


def test_kebab_and_snake_keys_and_none() -> None:
    assert build_options("p", Opts, {"rank": "none"}).rank is None
    assert build_options("p", Opts, {"rank": 4}).rank == 4  # TOML values arrive typed


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"energy": "high"}, "option 'energy': expected float"),
        ({"rank": "1.5"}, "option 'rank': expected int or none"),
        ({"refit": "maybe"}, "expected true or false"),
        ({"scheme": "diagonal"}, "expected one of channel, spatial"),
        ({"bogus": "1"}, "unknown option 'bogus'"),
        ({"energy": "1.5"}, "energy must be in (0, 1]"),
        ({"rank": True}, "expected int"),
    ],
)
def test_bad_options_name_the_pass(values: dict[str, object], message: str) -> None:
    with pytest.raises(PipelineError, match="pass 'p'") as info:
        build_options("p", Opts, values)
    assert message in str(info.value)


def test_option_text_errors() -> None:
    with pytest.raises(PipelineError, match="not key=value"):
        parse_option_text("p", "energy")
    with pytest.raises(PipelineError, match="given twice"):
        parse_option_text("p", "rank=1,rank=2")


def test_format_options_round_trips() -> None:
    opts = Opts(energy=0.5, include=("a", "b"), refit=False)
    text = format_options(opts)
    assert text == "energy=0.5,refit=false,include=[a,b]"
    assert build_options("p", Opts, parse_option_text("p", text)) == opts
