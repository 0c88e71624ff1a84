"""The pass manager verifies every pass and names the one that breaks the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from helpers import make_mlp

import onnxpress
from onnxpress import PassContext, PassResult, TensorShapes, VerifyConfig
from onnxpress.core.errors import PassError, VerificationError
from onnxpress.core.manager import PassManager, bisect
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.verify import random_inputs

DATA = Path(__file__).parent.parent / "data"
onnxpress.load_plugin_file(DATA / "bad_plugins.py")
onnxpress.load_plugin_file(DATA / "scale_plugin.py")


def test_report_records_every_pass(mlp_model: onnx.ModelProto) -> None:
    model, report = onnxpress.optimize(mlp_model, passes="cleanup,toposort")
    assert [p.name for p in report.passes] == ["cleanup", "toposort"]
    first = report.passes[0]
    assert first.before.nodes == 5 and first.after.nodes == 4
    assert (
        first.before.params == 8 * 16 + 16 + 16 * 4 + 3
        and first.after.params == 8 * 16 + 16 + 16 * 4
    )
    assert first.before.macs == first.after.macs == 8 * 16 + 16 * 4
    assert first.verification.metric == "max-rel" and first.verification.value is not None
    assert first.verification.value <= 1e-5
    assert report.after.nodes == len(model.graph.node) == 4
    data = report.to_json()
    # The unused initializer never reaches the working IR, so no pass counts it; it is gone.
    assert data["passes"][0]["counts"] == {
        "identity_removed": 1,
        "constants_merged": 0,
        "dead_nodes_removed": 0,
        "initializers_removed": 0,
    }
    assert "unused" not in {t.name for t in model.graph.initializer}


def test_input_model_is_not_modified(mlp_model: onnx.ModelProto) -> None:
    before = mlp_model.SerializeToString()
    onnxpress.optimize(mlp_model, passes="cleanup")
    assert mlp_model.SerializeToString() == before


def test_lossless_pass_that_changes_values_is_caught(mlp_model: onnx.ModelProto) -> None:
    with pytest.raises(VerificationError, match="after pass 'wrong-values': output 'y' differs"):
        onnxpress.optimize(mlp_model, passes="cleanup,wrong-values,toposort")


def test_invalid_graph_is_caught_by_structure_check(mlp_model: onnx.ModelProto) -> None:
    with pytest.raises(VerificationError, match="after pass 'break-graph'"):
        onnxpress.optimize(mlp_model, passes="break-graph", verify="structure")


def test_raising_pass_is_named(mlp_model: onnx.ModelProto) -> None:
    with pytest.raises(PassError, match="pass 'explode' failed: RuntimeError: boom"):
        onnxpress.optimize(mlp_model, passes="cleanup,explode")


def test_lossy_pass_is_judged_by_its_budget(mlp_model: onnx.ModelProto) -> None:
    # Doubling the output is a max-rel error of 1.0: inside the default budget of 10 ...
    _, report = onnxpress.optimize(mlp_model, passes="scale-outputs{alpha=2}")
    verdict = report.passes[0].verification
    assert verdict.metric == "max-rel" and verdict.value == pytest.approx(1.0, rel=1e-5)
    # ... but outside a budget set by the user, and a lossless pass after it is compared with
    # its own input, not with the original.
    with pytest.raises(VerificationError, match="max-rel 1 > 0.5"):
        onnxpress.optimize(
            mlp_model, passes="scale-outputs{alpha=2}", verify=VerifyConfig(budget=0.5)
        )
    _, report = onnxpress.optimize(mlp_model, passes="scale-outputs{alpha=2},cleanup")
    assert report.passes[1].verification.value == 0.0


def test_verification_uses_calibration_batches(mlp_model: onnx.ModelProto) -> None:
    # Inputs that are all zero make the output bias-only; the metric must come from them.
    batches = [{"x": np.zeros((4, 8), np.float32)}]
    _, report = onnxpress.optimize(mlp_model, passes="cleanup", calibration=batches)
    assert report.passes[0].verification.value == 0.0


def test_random_inputs_cover_two_batch_sizes_and_signs(mlp_model: onnx.ModelProto) -> None:
    feeds = random_inputs(mlp_model, seed=3)
    assert [f["x"].shape for f in feeds] == [(1, 8), (3, 8)]
    values = np.concatenate([f["x"].ravel() for f in feeds])
    assert values.min() < 0 < values.max()


def test_bisect_finds_the_first_breaking_pass(mlp_model: onnx.ModelProto) -> None:
    passes = parse_pipeline("cleanup,toposort,wrong-values,cleanup")
    assert bisect(mlp_model, passes, VerifyConfig()) == 2
    assert bisect(mlp_model, parse_pipeline("cleanup,toposort"), VerifyConfig()) is None


def test_analyses_are_cached_and_invalidated(mlp_model: onnx.ModelProto) -> None:
    seen: list[TensorShapes] = []

    class Probe(onnxpress.Pass[onnxpress.NoOptions]):
        name = "probe"
        preserves = (TensorShapes,)

        def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
            shapes = ctx.analysis(TensorShapes, graph)
            assert ctx.analysis(TensorShapes, graph) is shapes
            assert shapes.get("h1") == [None, 16]
            seen.append(shapes)
            return PassResult()

    toposort = parse_pipeline("toposort")[0]  # preserves TensorShapes
    cleanup = parse_pipeline("cleanup")[0]  # does not
    PassManager([Probe(), toposort, Probe(), cleanup, Probe()]).run(make_mlp())
    assert seen[0] is seen[1] and seen[1] is not seen[2]


def test_an_unchanged_model_keeps_its_verification(
    mlp_model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxpress.core.manager as manager

    sessions: list[onnx.ModelProto] = []
    real = manager.verification_runner

    def counting_runner(model: onnx.ModelProto, optimized: bool = False) -> object:
        sessions.append(model)
        return real(model, optimized)

    monkeypatch.setattr(manager, "verification_runner", counting_runner)
    # toposort leaves the cleaned model byte-identical: no checker, session or stats again.
    _, report = onnxpress.optimize(mlp_model, passes="cleanup,toposort")
    assert len(sessions) == 2  # the original and the cleaned model
    cleanup, toposort = report.passes
    assert toposort.verification == cleanup.verification and toposort.after is cleanup.after


def test_random_inputs_keep_named_dims_consistent() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("GRU", ["x", "W", "R", "", "", "h0"], ["", "y"], hidden_size=2)],
        "gru",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "batch", 3]),
            helper.make_tensor_value_info("W", TensorProto.FLOAT, [1, 6, 3]),
            helper.make_tensor_value_info("R", TensorProto.FLOAT, [1, 6, 2]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = random_inputs(model, seed=0)
    # "T" heads x's shape, so it varies; "batch" is the same size in x and h0.
    assert [f["x"].shape for f in feeds] == [(1, 8, 3), (3, 8, 3)]
    assert all(f["h0"].shape == (1, 8, 2) for f in feeds)


def test_holdout_batches_are_verified_on_but_not_seen_by_passes(
    mlp_model: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch
) -> None:
    from onnxpress import NoOptions, Pass, register_pass
    from onnxpress.core import manager as manager_module

    seen: list[float] = []
    verified: list[float] = []

    @register_pass("record-calibration-test")
    class RecordCalibration(Pass[NoOptions]):
        """Records the first input value of every calibration batch it is given."""

        def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
            assert ctx.calibration is not None
            seen.extend(float(batch["x"][0, 0]) for batch in ctx.calibration.batches())
            return PassResult()

    real_inputs = manager_module.verification_inputs

    def recording_inputs(model: onnx.ModelProto, calibration: object, seed: int) -> list:
        feeds = real_inputs(model, calibration, seed)  # type: ignore[arg-type]
        verified.extend(float(feed["x"][0, 0]) for feed in feeds)
        return feeds

    monkeypatch.setattr(manager_module, "verification_inputs", recording_inputs)
    batches = [{"x": np.full((2, 8), float(k), np.float32)} for k in range(1, 8)]
    onnxpress.optimize(
        mlp_model,
        passes="record-calibration-test,scale-outputs{alpha=2}",
        calibration=batches,
        verify=VerifyConfig(holdout=2),
    )
    assert seen == [1.0, 2.0, 3.0, 4.0, 5.0] and verified == [6.0, 7.0]
    with pytest.raises(onnxpress.core.errors.CalibrationError, match="cannot hold out 7 of 7"):
        onnxpress.optimize(
            mlp_model, passes="cleanup", calibration=batches, verify=VerifyConfig(holdout=7)
        )
