"""svd rank rules (rank, energy, params, budget, multiple, min-params, include/exclude) and
option parsing, on small MatMul chains with weights of known singular values."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxpress.passes.svd import Svd, SvdOptions
from onnxpress.passes.svd.rank import (
    BudgetItem,
    allocate_budget,
    max_useful_rank,
    rank_for_energy,
    round_rank,
)

from onnxpress.core.errors import PipelineError
from onnxpress.core.pipeline import parse_pipeline

node = helper.make_node


def spectral(size: int, singular: list[float], seed: int) -> np.ndarray:
    """A size×size matrix with the given leading singular values (the rest 0)."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((size, size)))
    v, _ = np.linalg.qr(rng.standard_normal((size, size)))
    s = np.zeros(size)
    s[: len(singular)] = singular
    return ((u * s) @ v.T).astype(np.float32)


def chain(kit: SimpleNamespace, *matrices: np.ndarray) -> onnx.ModelProto:
    """x -> MatMul(fc0) -> Relu -> MatMul(fc1) -> ... -> y."""
    nodes, current = [], "x"
    for i in range(len(matrices)):
        nodes.append(node("MatMul", [current, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
        current = f"h{i}"
        if i + 1 < len(matrices):
            nodes.append(node("Relu", [current], [f"r{i}"], name=f"relu{i}"))
            current = f"r{i}"
    nodes[-1].output[0] = "y"
    size = matrices[0].shape[0]
    return kit.model(
        nodes, {"x": [4, size]}, {"y": None}, {f"W{i}": m for i, m in enumerate(matrices)}
    )


def ranks(kit: SimpleNamespace, model: onnx.ModelProto, text: str) -> dict[str, int]:
    (pass_,) = parse_pipeline(f"svd{{{text}}}")
    _, result = kit.run_pass(pass_, model)
    return {d["nodes"][0]: d["rank"] for d in result.details}


DECAYING = [4.0, 2.0, 1.0, 0.5, 0.1]  # squares 16, 4, 1, 0.25, 0.01 of 21.26


@pytest.mark.parametrize(
    ("text", "rank"),
    [
        ("energy=0.9", 2),
        ("energy=0.98", 3),
        ("energy=0.9,multiple=4", 4),
        ("rank=3", 3),
        ("rank=3,multiple=2", 4),
        ("params=0.5", 8),
        ("params=0.5,multiple=3", 6),
    ],
)
def test_rank_rules(kit: SimpleNamespace, text: str, rank: int) -> None:
    model = chain(kit, spectral(32, DECAYING, 0))
    assert ranks(kit, model, text) == {"fc0": rank}


def test_default_rule_keeps_99_percent_of_the_energy(kit: SimpleNamespace) -> None:
    assert SvdOptions().rule == ("energy", 0.99)
    assert ranks(kit, chain(kit, spectral(32, DECAYING, 0)), "") == {"fc0": 4}  # 21/21.26 < 0.99


def test_a_rank_that_saves_too_little_is_refused(kit: SimpleNamespace) -> None:
    model = chain(kit, spectral(32, DECAYING, 0))
    _, result = kit.run_pass(Svd(SvdOptions(rank=15)), model)
    assert not result.changed
    assert result.refusals[0].reason == (
        "rank 15 (rank=15) keeps 960 of 1024 params per group: saves less than min-gain 0.1"
    )


def test_min_params_include_and_exclude(kit: SimpleNamespace) -> None:
    model = chain(kit, *(spectral(32, DECAYING, seed) for seed in range(3)))
    assert ranks(kit, model, "rank=2,min-params=2000") == {}
    assert ranks(kit, model, "rank=2,include=[fc0,re:c2$]") == {"fc0": 2, "fc2": 2}
    assert ranks(kit, model, "rank=2,exclude=[re:^fc[01]]") == {"fc2": 2}
    _, result = kit.run_pass(Svd(SvdOptions(rank=2, include=("fc1",))), model)
    assert {r.node: r.reason for r in result.refusals} == {
        "fc0": "not selected by include",
        "fc2": "not selected by include",
    }


def test_budget_goes_where_the_error_per_param_is_smallest(kit: SimpleNamespace) -> None:
    flat = spectral(32, [1.0] * 32, 1)
    model = chain(kit, spectral(32, DECAYING, 0), flat)
    # The decaying layer is nearly free to cut, so a mild budget is met on it alone ...
    (mild,) = parse_pipeline("svd{budget=0.6}")
    _, result = kit.run_pass(mild, model)
    assert {d["nodes"][0]: d["rank"] for d in result.details} == {"fc0": 3}
    assert result.refusals[0].node == "fc1"
    assert result.refusals[0].reason.startswith("budget: kept dense")
    # ... and a tight one cuts it to rank 1 before the flat one, which pays for every rank ...
    (pass_,) = parse_pipeline("svd{budget=0.3,rank-floor=0}")
    _, result = kit.run_pass(pass_, model)
    assert {d["nodes"][0]: d["rank"] for d in result.details} == {"fc0": 1, "fc1": 8}
    assert sum(d["params_after"] for d in result.details) <= 0.3 * 2 * 32 * 32
    # ... unless the rank floor (1/8 of 32 here) stops it, and the flat one pays more.
    (floored,) = parse_pipeline("svd{budget=0.3,rank-floor=0.125}")
    _, result = kit.run_pass(floored, model)
    assert {d["nodes"][0]: d["rank"] for d in result.details} == {"fc0": 4, "fc1": 5}


def test_budget_that_cannot_be_met_is_reported(kit: SimpleNamespace) -> None:
    model = chain(kit, spectral(32, [1.0] * 32, 1))
    _, result = kit.run_pass(Svd(SvdOptions(budget=0.01, rank_floor=0.0)), model)
    assert result.details[0]["rank"] == 1
    assert result.counts["budget_shortfall_params"] == 64 - 10
    _, result = kit.run_pass(Svd(SvdOptions(budget=0.01)), model)  # floor 2 = 32/16
    assert result.details[0]["rank"] == 2
    assert result.counts["budget_shortfall_params"] == 128 - 10


def test_rank_helpers() -> None:
    assert max_useful_rank(64, 64, 0.1) == 28  # 28·128 < 0.9·4096 <= 29·128
    assert max_useful_rank(2, 2, 0.0) == 0  # r = 1 keeps 4 of 4: no gain
    assert max_useful_rank(4, 6, -100.0) == 4  # capped at full rank
    assert [round_rank(r, 8, 28, up=True) for r in (1, 8, 9, 27)] == [8, 8, 16, 28]
    assert [round_rank(r, 8, 28, up=False) for r in (1, 9, 17)] == [8, 8, 16]
    assert rank_for_energy([np.array([3.0, 1.0]), np.array([1.0, 1.0])], 0.9) == 2
    assert rank_for_energy([np.array([3.0, 1.0])], 0.9) == 1


def test_allocate_budget_steps_down_the_cheapest_ladder() -> None:
    cheap = BudgetItem("cheap", 8, 8, 1, [np.array([8.0, 1e-3, 1e-3, 1e-3, 0, 0, 0, 0])])
    costly = BudgetItem("costly", 8, 8, 1, [np.ones(8)])
    allocation = allocate_budget([cheap, costly], fraction=0.75, multiple=1, min_gain=0.0)
    # dense (64) -> rank 3 (48) -> rank 2 (32): 32 + 64 = 96 fits; the flat layer stays dense.
    assert allocation.ranks == {"cheap": 2} and allocation.kept == 32 + 64
    assert allocation.target == 96 and allocation.dense == 128


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rank=4,energy=0.9", "give one rank rule, not rank and energy"),
        ("energy=1.5", "energy must be in (0, 1], not 1.5"),
        ("budget=0", "budget must be in (0, 1], not 0.0"),
        ("rank=0", "rank must be >= 1"),
        ("multiple=0", "multiple must be >= 1"),
        ("min-gain=1", "min-gain must be < 1"),
        ("scheme=diagonal", "expected one of channel, spatial"),
        ('include=["re:("]', "bad regex in 're:('"),
        ("damping=0", "damping must be > 0"),
    ],
)
def test_bad_options_are_refused(text: str, message: str) -> None:
    with pytest.raises(
        PipelineError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        parse_pipeline(f"svd{{{text}}}")


def test_options_round_trip_as_text() -> None:
    for text in (
        "svd{energy=0.95,multiple=8}",
        "svd{budget=0.6}",
        'svd{rank=4,scheme=spatial,exclude=[head,"re:^enc.*ffn"],refit=false}',
    ):
        (pass_,) = parse_pipeline(text)
        assert parse_pipeline(pass_.spec())[0].options == pass_.options
    assert parse_pipeline("svd{energy=0.95,multiple=8}")[0].spec() == "svd{energy=0.95,multiple=8}"
