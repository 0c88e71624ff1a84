"""The search space read off bundled models, and its pipelines."""

from __future__ import annotations

from pathlib import Path

import onnx
import optuna
import pytest

from onnxpress.core.pipeline import format_pipeline, parse_pipeline
from onnxpress.search.space import SearchSpace, build_space

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_space_of_a_cnn_and_of_a_gru() -> None:
    cnn = build_space(onnx.load(str(MODELS / "cnn_mnist.onnx")), ("/classifier/Gemm",))
    assert cnn.passes == ["prune-channels", "svd", "qdq"]
    assert cnn.convolutional and not cnn.recurrent and not cnn.hardswish
    gru = build_space(onnx.load(str(MODELS / "gru_sunspots.onnx")), ())
    assert gru.recurrent and not gru.convolutional and "qdq" in gru.passes
    mobilenet = build_space(onnx.load(str(MODELS / "mobilenet_mnist.onnx")), ())
    assert mobilenet.hardswish


def test_a_model_without_layers_has_an_empty_space() -> None:
    model = onnx.load(str(MODELS / "mlp_digits.onnx"))
    del model.graph.node[:]
    relu = onnx.helper.make_node("Relu", [model.graph.input[0].name], [model.graph.output[0].name])
    model.graph.node.append(relu)
    del model.graph.initializer[:]
    space = build_space(model, ())
    assert space.passes == [] and "qdq" in space.refusals


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_pipelines_parse_and_round_trip(seed: int) -> None:
    space = SearchSpace(
        prune=True,
        svd=True,
        qdq=True,
        convolutional=True,
        hardswish=True,
        recurrent=True,
        int8_layers=("conv_a", "/b/Gemm", "c.1"),
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for _ in range(10):
        trial = study.ask()
        text = space.pipeline(space.suggest(trial))
        assert format_pipeline(parse_pipeline(text)) == text
        study.tell(trial, 0.0)
    refs = space.references()
    assert set(refs) == {"qdq", "svd{budget=0.75}", "prune-channels{macs=0.75}"}
    assert space.pipeline(refs["qdq"]).endswith("cleanup,qdq,toposort")
    assert "svd{budget=0.75}" in space.pipeline(
        {k: v for k, v in refs["svd{budget=0.75}"].items() if "." in k}
    )
