"""Loading refuses unsafe or broken files; saving is atomic and keeps model-level fields."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import make_mlp
from onnx import TensorProto, helper, numpy_helper

import onnxpress
from onnxpress.core.errors import ModelLoadError, ModelSaveError
from onnxpress.core.io import load_model, same_file, save_model


def _external_model(folder: Path, location: str = "weights.bin") -> Path:
    """An MLP whose W1 lives in external data at ``location``."""
    model = make_mlp()
    path = folder / "ext.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=64,
    )
    return path


def _set_location(
    path: Path, location: str, offset: int | None = None, length: int | None = None
) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
            if entry.key == "offset" and offset is not None:
                entry.value = str(offset)
            if entry.key == "length" and length is not None:
                entry.value = str(length)
    path.write_bytes(model.SerializeToString())


def test_external_data_inside_folder_loads(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    model = load_model(path)
    w1 = next(t for t in model.graph.initializer if t.name == "W1")
    np.testing.assert_array_equal(
        numpy_helper.to_array(w1), numpy_helper.to_array(make_mlp().graph.initializer[0])
    )


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("/etc/passwd", "is absolute"),
        ("../weights.bin", "leaves the model folder"),
        ("sub/../../weights.bin", "leaves the model folder"),
        ("missing.bin", "not found"),
    ],
)
def test_unsafe_external_paths_are_refused(tmp_path: Path, location: str, message: str) -> None:
    path = _external_model(tmp_path)
    _set_location(path, location)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value) and "tensor '" in str(info.value)


def test_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    inner = tmp_path / "model"
    inner.mkdir()
    path = _external_model(inner)
    outside = tmp_path / "secret.bin"
    os.replace(inner / "weights.bin", outside)
    (inner / "weights.bin").symlink_to(outside)
    with pytest.raises(ModelLoadError, match="resolves outside the model folder"):
        load_model(path)


def test_offset_and_length_outside_the_file_are_refused(tmp_path: Path) -> None:
    path = _external_model(tmp_path)
    size = (tmp_path / "weights.bin").stat().st_size
    _set_location(path, "weights.bin", offset=size + 10)
    with pytest.raises(ModelLoadError, match="offset"):
        load_model(path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    path = _external_model(fresh)
    _set_location(path, "weights.bin", offset=0, length=size + 1)
    with pytest.raises(ModelLoadError, match=r"outside 'weights\.bin'"):
        load_model(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"this is not a protobuf at all \xff\xfe", "not an ONNX model"),
        (b"\x08\x07", "not an ONNX model"),
    ],
)
def test_garbage_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    data = make_mlp().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        load_model(path)


def test_save_is_atomic_and_refuses_the_input(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(make_mlp(), str(src))
    before = src.read_bytes()
    with pytest.raises(ModelSaveError, match="would overwrite the input model"):
        save_model(make_mlp(1), src, protect=src)
    assert src.read_bytes() == before
    out = save_model(make_mlp(1), tmp_path / "out.onnx", protect=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]
    assert onnx.load(str(out)).graph.node[0].op_type == "MatMul"


def test_save_with_external_data(tmp_path: Path) -> None:
    out = save_model(make_mlp(hidden=64), tmp_path / "big.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    reloaded = load_model(out)
    np.testing.assert_array_equal(
        numpy_helper.to_array(reloaded.graph.initializer[0]),
        numpy_helper.to_array(make_mlp(hidden=64).graph.initializer[0]),
    )


def test_optimize_keeps_metadata_functions_and_custom_opsets() -> None:
    model = make_mlp()
    # A local function and a custom-domain opset import must survive the round trip.
    fn = helper.make_function(
        "custom.ops",
        "Twice",
        ["a"],
        ["b"],
        [helper.make_node("Add", ["a", "a"], ["b"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.functions.append(fn)
    model.opset_import.append(helper.make_opsetid("custom.ops", 1))
    graph = model.graph
    graph.node.append(helper.make_node("Twice", ["y"], ["y2"], domain="custom.ops", name="twice"))
    graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 4]))
    graph.doc_string = "graph doc"
    out, _ = onnxpress.optimize(model, passes="cleanup,toposort")
    assert {p.key: p.value for p in out.metadata_props} == {"author": "tests", "license": "MIT"}
    assert out.doc_string == "a test MLP" and out.graph.doc_string == "graph doc"
    assert out.producer_name == "onnxpress-tests"
    assert [f.name for f in out.functions] == ["Twice"]
    assert {o.domain: o.version for o in out.opset_import}["custom.ops"] == 1
    assert "Identity" not in [n.op_type for n in out.graph.node]


def test_large_model_path_uses_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Models over the protobuf limit are checked, run and saved through files on disk.

    The threshold is lowered so that a small model takes the same code path as a 2 GB one.
    """
    import onnxpress.core.io as model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = make_mlp(hidden=64)
    assert model.ByteSize() > 1000
    optimized, report = onnxpress.optimize(model, passes="cleanup")
    assert report.passes[0].verification.value == 0.0
    out = save_model(optimized, tmp_path / "large.onnx")
    assert (tmp_path / "large.onnx.data").exists()
    reloaded = load_model(out)
    assert len(reloaded.graph.node) == 4


def test_outputs_get_the_umask_mode(tmp_path: Path) -> None:
    """The atomic temp file's 0600 is not kept: a deployed model stays readable by others."""
    old = os.umask(0o022)
    try:
        out = save_model(make_mlp(), tmp_path / "out.onnx")
        assert out.stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        assert save_model(make_mlp(), tmp_path / "o2.onnx").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_same_file_sees_hard_links_and_symlinks(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(make_mlp(), str(src))
    os.link(src, tmp_path / "hard.onnx")
    (tmp_path / "soft.onnx").symlink_to(src)
    assert same_file(src, tmp_path / "hard.onnx") and same_file(src, tmp_path / "soft.onnx")
    assert not same_file(src, tmp_path / "other.onnx")


def test_per_channel_dequantize_below_opset_13_gets_a_hint() -> None:
    """onnxruntime's quantize_static(per_channel=True) on an opset-11 model writes this."""
    from onnxpress.core.errors import InvalidModelError
    from onnxpress.core.io import prepare_model

    inits = [
        numpy_helper.from_array(np.ones((4, 2), np.int8), "w"),
        numpy_helper.from_array(np.full(4, 0.1, np.float32), "s"),
        numpy_helper.from_array(np.zeros(4, np.int8), "z"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0),
            helper.make_node("MatMul", ["x", "wf"], ["y"]),
        ],
        "per_channel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(InvalidModelError) as raised:
        prepare_model(model)
    message = str(raised.value)
    assert "Unrecognized attribute: axis for operator DequantizeLinear" in message
    assert "need opset 13, the model imports 11" in message and "\n" not in message
