"""Streaming activation capture and the running moments used by data-aware passes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxpress.calibration.activations import (
    Moments,
    regularized_cholesky,
    stream_activations,
    with_outputs,
)


def test_stream_returns_intermediate_tensors(mlp_model: onnx.ModelProto) -> None:
    w1 = numpy_helper.to_array(mlp_model.graph.initializer[0])
    b1 = numpy_helper.to_array(mlp_model.graph.initializer[1])
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((n, 8)).astype(np.float32)} for n in (2, 5)]
    seen = list(stream_activations(mlp_model, ["h0", "h2"], batches))
    assert len(seen) == 2
    for batch, acts in zip(batches, seen, strict=True):
        np.testing.assert_allclose(acts["h0"], batch["x"] @ w1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            acts["h2"], np.maximum(batch["x"] @ w1 + b1, 0), rtol=1e-5, atol=1e-5
        )
    # The caller's model is not changed.
    assert [o.name for o in mlp_model.graph.output] == ["y"]
    assert [o.name for o in with_outputs(mlp_model, ["y", "h0"]).graph.output] == ["y", "h0"]


def test_unknown_tensor_is_refused(mlp_model: onnx.ModelProto) -> None:
    with pytest.raises(ValueError, match="no inferred type"):
        with_outputs(mlp_model, ["nope"])


def test_moments_match_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((3, 4, 6)) for _ in range(3)]
    ys = [x @ rng.standard_normal((6, 2)) for x in xs]
    moments = Moments(6, 2)
    for x, y in zip(xs, ys, strict=True):
        moments.add(x.astype(np.float32), y)
    rows = np.concatenate([x.reshape(-1, 6) for x in xs])
    targets = np.concatenate([y.reshape(-1, 2) for y in ys])
    assert moments.count == 36
    np.testing.assert_allclose(moments.xtx, rows.T @ rows, rtol=1e-5)
    np.testing.assert_allclose(moments.xty, rows.T @ targets, rtol=1e-5)
    np.testing.assert_allclose(moments.second_moment, rows.T @ rows / 36, rtol=1e-5)


def test_cholesky_of_a_singular_gram_is_regularized() -> None:
    x = np.random.default_rng(2).standard_normal((10, 3))
    gram = np.c_[x, x[:, :1]].T @ np.c_[x, x[:, :1]]  # rank 3 of 4
    chol = regularized_cholesky(gram)
    assert np.allclose(np.tril(chol), chol)
    np.testing.assert_allclose(chol @ chol.T, gram, atol=1e-4 * np.trace(gram))
