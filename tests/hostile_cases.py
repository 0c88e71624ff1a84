"""Hostile inputs for the CLI, one builder per case: it writes its files into a folder and
returns the command line and a text the one-line error must contain (tests/cli/
test_hostile_inputs.py runs them). Grouped: data loss, bad models, size bombs, calibration
files, recipes and options, output paths, plugins."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from helpers import make_mlp
from numpy.lib import format as npy_format
from onnx import TensorProto, helper, numpy_helper

Case = Callable[[Path], tuple[list[str], str]]
CASES: dict[str, Case] = {}


def case(name: str) -> Callable[[Case], Case]:
    def register(build: Case) -> Case:
        CASES[name] = build
        return build

    return register


def mlp(folder: Path, name: str = "model.onnx", external: bool = False) -> Path:
    path = folder / name
    if external:
        onnx.save_model(
            make_mlp(),
            str(path),
            save_as_external_data=True,
            location="weights.bin",
            size_threshold=0,
        )
    else:
        onnx.save(make_mlp(), str(path))
    return path


def graph_model(
    folder: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto] | None = None,
    opset: int = 17,
    check: bool = False,
) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if check:
        onnx.checker.check_model(model)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def vi(
    name: str, dims: list[int | str] | None, dtype: int = TensorProto.FLOAT
) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def optimize(model: Path, *args: str) -> list[str]:
    return ["optimize", str(model), *args]


# -- data loss: an output that is an input or another output (exit 2) -----------------------


@case("out-is-external-data")
def _(d: Path) -> tuple[list[str], str]:
    return optimize(mlp(d, external=True), "-o", str(d / "weights.bin")), "external data"


@case("report-is-input-model")
def _(d: Path) -> tuple[list[str], str]:
    m = mlp(d)
    return optimize(m, "-o", str(d / "o.onnx"), "--report", str(m)), "input model"


@case("out-symlink-to-input")
def _(d: Path) -> tuple[list[str], str]:
    m = mlp(d)
    (d / "link.onnx").symlink_to(m)
    return optimize(m, "-o", str(d / "link.onnx")), "would overwrite the input model"


@case("out-hardlink-to-input")
def _(d: Path) -> tuple[list[str], str]:
    m = mlp(d)
    os.link(m, d / "hard.onnx")
    return optimize(m, "-o", str(d / "hard.onnx")), "would overwrite the input model"


@case("report-hardlink-to-external-data")
def _(d: Path) -> tuple[list[str], str]:
    m = mlp(d, external=True)
    os.link(d / "weights.bin", d / "r.json")
    return optimize(m, "-o", str(d / "o.onnx"), "--report", str(d / "r.json")), "external data"


@case("report-same-as-output")
def _(d: Path) -> tuple[list[str], str]:
    return optimize(mlp(d), "-o", str(d / "o.onnx"), "--report", str(d / "o.onnx")), "same file"


@case("report-symlink-to-output")
def _(d: Path) -> tuple[list[str], str]:
    (d / "r.json").symlink_to(d / "o.onnx")
    return optimize(mlp(d), "-o", str(d / "o.onnx"), "--report", str(d / "r.json")), "same file"


@case("out-is-calibration")
def _(d: Path) -> tuple[list[str], str]:
    np.savez(d / "c.npz", x=np.ones((2, 8), np.float32))
    args = optimize(mlp(d), "--calibration", str(d / "c.npz"), "-o", str(d / "c.npz"))
    return args, "calibration data"


@case("out-is-recipe")
def _(d: Path) -> tuple[list[str], str]:
    (d / "r.toml").write_text('pipeline = "cleanup"\n')
    return optimize(mlp(d), "--recipe", str(d / "r.toml"), "-o", str(d / "r.toml")), "recipe"


@case("report-is-plugin")
def _(d: Path) -> tuple[list[str], str]:
    (d / "p.py").write_text("X = 1\n")
    return ["--plugin", str(d / "p.py"), *optimize(mlp(d), "--report", str(d / "p.py"))], "plugin"


@case("in-place-still-protects-external-data")
def _(d: Path) -> tuple[list[str], str]:
    args = optimize(mlp(d, external=True), "--in-place", "-o", str(d / "weights.bin"))
    return args, "external data"


@case("distill-out-is-teacher")
def _(d: Path) -> tuple[list[str], str]:
    np.savez(d / "x.npz", x=np.ones((2, 8), np.float32))
    s, t = mlp(d, "s.onnx"), mlp(d, "t.onnx")
    return [
        "distill",
        str(s),
        "--teacher",
        str(t),
        "--data",
        str(d / "x.npz"),
        "-o",
        str(t),
    ], "teacher"


@case("distill-out-is-data")
def _(d: Path) -> tuple[list[str], str]:
    np.savez(d / "x.npz", x=np.ones((2, 8), np.float32))
    s, t = mlp(d, "s.onnx"), mlp(d, "t.onnx")
    args = ["distill", str(s), "--teacher", str(t), "--data", str(d / "x.npz")]
    return [*args, "-o", str(d / "x.npz")], "data"


@case("run-out-is-inputs")
def _(d: Path) -> tuple[list[str], str]:
    (d / "lib").mkdir()
    np.savez(d / "x.npz", x=np.ones((2, 8), np.float32))
    return ["run", str(d / "lib"), "--inputs", str(d / "x.npz"), "-o", str(d / "x.npz")], "inputs"


@case("run-out-is-manifest")
def _(d: Path) -> tuple[list[str], str]:
    (d / "lib").mkdir()
    (d / "lib" / "manifest.json").write_text("{}")
    np.savez(d / "x.npz", x=np.ones((2, 8), np.float32))
    args = ["run", str(d / "lib"), "--inputs", str(d / "x.npz")]
    return [*args, "-o", str(d / "lib" / "manifest.json")], "compiled folder"


@case("compile-folder-file-is-input")
def _(d: Path) -> tuple[list[str], str]:
    (d / "lib").mkdir()
    m = mlp(d)
    os.link(m, d / "lib" / "manifest.json")
    return ["compile", str(m), "-o", str(d / "lib"), "--no-verify"], "input model"


# -- bad models --------------------------------------------------------------------------------


@case("no-outputs")
def _(d: Path) -> tuple[list[str], str]:
    return optimize(
        graph_model(d, [helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2])], [])
    ), "no outputs"


@case("output-listed-twice")
def _(d: Path) -> tuple[list[str], str]:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return optimize(
        graph_model(d, nodes, [vi("x", [2])], [vi("y", [2]), vi("y", [2])])
    ), "listed twice"


@case("opset-99")
def _(d: Path) -> tuple[list[str], str]:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return optimize(graph_model(d, nodes, [vi("x", [2])], [vi("y", [2])], opset=99)), "opset 99"


@case("bad-dtype-enum-input")
def _(d: Path) -> tuple[list[str], str]:
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    return optimize(
        graph_model(d, nodes, [vi("x", [2], 99)], [vi("y", [2], 99)])
    ), "element type 99"


@case("bad-dtype-enum-initializer")
def _(d: Path) -> tuple[list[str], str]:
    weight = numpy_helper.from_array(np.ones(2, np.float32), "w")
    weight.data_type = 77
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    return optimize(
        graph_model(d, nodes, [vi("x", [2])], [vi("y", [2])], [weight])
    ), "element type 77"


@case("unknown-custom-domain")
def _(d: Path) -> tuple[list[str], str]:
    nodes = [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")]
    graph = helper.make_graph(nodes, "g", [vi("x", [2])], [vi("y", [2])])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    (d / "model.onnx").write_bytes(model.SerializeToString())
    return optimize(d / "model.onnx"), "fails in onnxruntime"


@case("static-dim-2-40")
def _(d: Path) -> tuple[list[str], str]:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return optimize(graph_model(d, nodes, [vi("x", [2**40])], [vi("y", [2**40])])), "elements"


@case("static-output-dim-huge")
def _(d: Path) -> tuple[list[str], str]:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return optimize(
        graph_model(d, nodes, [vi("x", ["n"])], [vi("y", [2**20, 2**20])])
    ), "output 'y'"


@case("negative-dim")
def _(d: Path) -> tuple[list[str], str]:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    return optimize(graph_model(d, nodes, [vi("x", [-3])], [vi("y", [2])])), "negative dimension"


@case("string-input")
def _(d: Path) -> tuple[list[str], str]:
    nodes = [helper.make_node("Identity", ["s"], ["y"])]
    model = graph_model(
        d, nodes, [vi("s", [2], TensorProto.STRING)], [vi("y", [2], TensorProto.STRING)]
    )
    return optimize(model), "input 's' is a string tensor"


@case("sequence-input")
def _(d: Path) -> tuple[list[str], str]:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("SequenceLength", ["s"], ["n"])]
    return optimize(graph_model(d, nodes, [seq], [vi("n", [], TensorProto.INT64)])), "input 's'"


@case("model-fails-in-onnxruntime")
def _(d: Path) -> tuple[list[str], str]:
    shape = numpy_helper.from_array(np.array([3], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")]
    return optimize(
        graph_model(d, nodes, [vi("x", [2, 8])], [vi("y", [3])], [shape])
    ), "input model fails in onnxruntime"


def _bomb(d: Path, op: str) -> Path:
    big = 10**12
    x, ints = vi("x", [1]), TensorProto.INT64
    const = {
        "ConstantOfShape": (
            [big],
            [helper.make_node("ConstantOfShape", ["c0"], ["b"], name="bomb")],
        ),
        "Expand": ([big], [helper.make_node("Expand", ["x", "c0"], ["b"], name="bomb")]),
        "Tile": ([big], [helper.make_node("Tile", ["x", "c0"], ["b"], name="bomb")]),
        "Pad": ([0, big], [helper.make_node("Pad", ["x", "c0"], ["b"], name="bomb")]),
        "Resize": ([big], [helper.make_node("Resize", ["x", "", "", "c0"], ["b"], name="bomb")]),
    }
    if op == "Range":
        inits = [
            numpy_helper.from_array(np.array(v, np.int64), n)
            for n, v in (("a", 0), ("l", big), ("s", 1))
        ]
        nodes = [helper.make_node("Range", ["a", "l", "s"], ["b"], name="bomb")]
        return graph_model(d, nodes, [x], [vi("b", None, ints)], inits)
    if op == "OneHot":
        inits = [
            numpy_helper.from_array(np.array([big], np.int64), "depth"),
            numpy_helper.from_array(np.array([0, 1], np.float32), "values"),
        ]
        nodes = [helper.make_node("OneHot", ["i", "depth", "values"], ["b"], name="bomb")]
        return graph_model(d, nodes, [vi("i", [1], ints)], [vi("b", None)], inits)
    values, nodes = const[op]
    inits = [numpy_helper.from_array(np.array(values, np.int64), "c0")]
    return graph_model(d, nodes, [x], [vi("b", None)], inits)


for _op in ("ConstantOfShape", "Expand", "Tile", "Range", "Pad", "OneHot", "Resize"):
    CASES[f"bomb-{_op.lower()}"] = lambda d, op=_op: (optimize(_bomb(d, op)), f"node 'bomb' ({op})")


def _external(d: Path, key: str, value: str) -> Path:
    m = mlp(d, external=True)
    model = onnx.load(str(m), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == key:
            entry.value = value
    if key not in {e.key for e in model.graph.initializer[0].external_data}:
        model.graph.initializer[0].external_data.add(key=key, value=value)
    m.write_bytes(model.SerializeToString())
    return m


CASES["ext-negative-offset"] = lambda d: (optimize(_external(d, "offset", "-8")), "offset")
CASES["ext-non-numeric-offset"] = lambda d: (
    optimize(_external(d, "offset", "abc")),
    "bad external data entry",
)
CASES["ext-missing-file"] = lambda d: (optimize(_external(d, "location", "nope.bin")), "not found")
CASES["ext-absolute-path"] = lambda d: (
    optimize(_external(d, "location", "/etc/passwd")),
    "absolute",
)
CASES["ext-huge-length"] = lambda d: (optimize(_external(d, "length", str(10**15))), "outside")


def _raw(d: Path, data: bytes) -> Path:
    (d / "model.onnx").write_bytes(data)
    return d / "model.onnx"


CASES["empty-file"] = lambda d: (optimize(_raw(d, b"")), "empty file")
CASES["garbage"] = lambda d: (optimize(_raw(d, b"\x00\x01garbage\xff" * 10)), "not an ONNX model")
CASES["truncated"] = lambda d: (
    optimize(_raw(d, make_mlp().SerializeToString()[:150])),
    "not an ONNX model",
)
CASES["model-is-folder"] = lambda d: (optimize(d), "not a file")
CASES["inspect-no-outputs"] = lambda d: (
    ["inspect", str(graph_model(d, [], [vi("x", [2])], []))],
    "no outputs",
)
CASES["inspect-bomb"] = lambda d: (["inspect", str(_bomb(d, "ConstantOfShape"))], "ConstantOfShape")


def npy_bytes(shape: tuple[int, ...], descr: str = "<f4", payload: bytes = b"\0" * 64) -> bytes:
    buffer = io.BytesIO()
    npy_format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue() + payload


def npz(d: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(d / "c.npz", "w") as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return d / "c.npz"
