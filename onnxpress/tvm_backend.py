"""``onnxpress compile`` / ``onnxpress run``: ONNX -> Apache TVM (Relax) library + manifest.

  compile(model, target, input_shapes, output_dir):
      prepare (tvm_prepare: static shapes, verified lower-gru/fold-constants/cleanup)
      -> coverage check (one error naming every op the importer cannot take)
      -> tvm.relax.frontend.onnx.from_onnx -> tvm.compile(target) -> export_library
      -> on targets that run here, a differential run against onnxruntime
      -> output_dir/{model.so | model.tar, manifest.json, README.md}
  run_compiled(output_dir, inputs): load with the TVM runtime only and run the VM.

TVM is imported lazily: the rest of onnxpress works without it, and a missing TVM is one
TvmMissingError that says how to install it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.errors import OnnxpressError
from onnxpress.ir import copy_model
from onnxpress.report import Report
from onnxpress.tvm_prepare import Prepared, check_coverage, graph_inputs, prepare
from onnxpress.tvm_targets import TargetSpec, parse_target, tvm_target
from onnxpress.tvm_verify import differential_check, has_qdq
from onnxpress.tvm_verify import max_rel as _max_rel
from onnxpress.verify import Runner

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "onnxpress-tvm/1"
LIBRARY_STEM = "model"
# Compiled vs onnxruntime: max |diff| / max |ref| per output (float reassociation only).
COMPILE_TOLERANCE = 1e-4


class TvmMissingError(OnnxpressError):
    """Apache TVM is not installed."""


class CompileError(OnnxpressError):
    """TVM could not import, compile or export the model, or the result is wrong."""


def require_tvm() -> Any:
    """Import and return the ``tvm`` module, or raise TvmMissingError."""
    try:
        import tvm
    except ImportError as exc:
        raise TvmMissingError(
            f"Apache TVM is not installed ({exc}): pip install onnxpress[tvm]"
        ) from None
    return tvm


@dataclass
class CompileResult:
    output_dir: Path
    library: Path
    manifest: dict[str, Any]
    report: Report | None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # TVM errors carry a C++/Python backtrace; the message is the last line that is not a frame.
    for line in reversed(lines):
        if not line.startswith(("File ", "at ", "0:", "1:", "Traceback")) and ":" not in line[:3]:
            return f"{type(exc).__name__}: {line}"
    return type(exc).__name__


def _interface(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def entry(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        return {
            "name": vi.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim],
        }

    return [entry(vi) for vi in graph_inputs(model)], [entry(vi) for vi in model.graph.output]


def import_relax(prepared: Prepared) -> Any:
    """The Relax IRModule of a prepared model (coverage is checked first)."""
    require_tvm()
    check_coverage(prepared.model)
    from tvm.relax.frontend.onnx import from_onnx

    try:
        return from_onnx(
            prepared.model,
            shape_dict=dict(prepared.input_shapes),
            dtype_dict=dict(prepared.input_dtypes),
        )
    except Exception as exc:
        raise CompileError(f"TVM's ONNX importer failed: {_first_line(exc)}") from exc


def build(mod: Any, spec: TargetSpec, *, default_schedules: bool = True) -> Any:
    """``tvm.compile`` for a target: the relax default pipeline (dlight on CUDA), plus
    onnxpress's untuned CPU schedules (tvm_schedule) when ``default_schedules``."""
    tvm = require_tvm()
    target = tvm_target(spec)
    try:
        if spec.kind == "llvm" and default_schedules:
            from onnxpress.tvm_schedule import cpu_pipeline

            return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target))
        return tvm.compile(mod, target=target)
    except Exception as exc:
        raise CompileError(f"TVM could not compile for {spec.name}: {_first_line(exc)}") from exc


def export(executable: Any, spec: TargetSpec, folder: Path) -> Path:
    path = folder / (LIBRARY_STEM + spec.library_suffix)
    try:
        if spec.cross_compiler:
            executable.export_library(str(path), cc=spec.cross_compiler)
        else:
            executable.export_library(str(path))
    except Exception as exc:
        raise CompileError(f"exporting the {spec.name} library failed: {_first_line(exc)}") from exc
    return path


class CompiledModel:
    """A compiled library loaded with the TVM runtime: call it with numpy arrays."""

    def __init__(self, library: str | os.PathLike[str], device: str = "cpu") -> None:
        tvm = require_tvm()
        from tvm import relax

        self._tvm = tvm
        self.device = tvm.device(device, 0)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in arrays]
        out = self.vm["main"](*args)
        items = [out] if hasattr(out, "numpy") else list(out)
        return [np.asarray(item.numpy()) for item in items]


def _sha256(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def _readme(spec: TargetSpec, library: str, manifest: dict[str, Any]) -> str:
    device = "tvm.cuda()" if spec.is_gpu else "tvm.cpu()"
    first = manifest["inputs"][0]
    shape = tuple(first["shape"])
    return (
        f"# {manifest['source']['name']} compiled by onnxpress for {spec.name}\n\n"
        "Load it from Python with only the TVM runtime (`pip install apache-tvm`):\n\n"
        "```python\n"
        "import numpy as np, tvm\n"
        "from tvm import relax\n"
        f'vm = relax.VirtualMachine(tvm.runtime.load_module("{library}"), {device})\n'
        f'x = tvm.runtime.tensor(np.zeros({shape}, "{first["dtype"]}"), {device})\n'
        'out = vm["main"](x)  # inputs in manifest.json order; a tuple for several outputs\n'
        "```\n\n"
        "Or: `onnxpress run <this folder> --inputs x.npz [--verify model.onnx]`.\n"
        "Shapes, dtypes, target and versions are in manifest.json.\n"
    )


def compile_model(
    model: onnx.ModelProto | str | os.PathLike[str],
    target: str | TargetSpec = "x86",
    output: str | os.PathLike[str] = "compiled",
    *,
    input_shapes: Mapping[str, list[int]] | None = None,
    default_schedules: bool = True,
    verify: bool = True,
    seed: int = 0,
    int8: str = "auto",
) -> CompileResult:
    """Compile an ONNX model with TVM into the folder ``output`` (library, manifest.json,
    README.md); ``onnxpress.compile`` is this function, mirroring ``onnxpress compile``.

    ``target`` is a name (see tvm_targets) or TargetSpec; ``input_shapes`` maps input names
    to static shapes (default: the model's, a symbolic leading axis set to 1). Nothing is
    written unless every step, including the check against onnxruntime on targets that run
    here, succeeded. Existing files of the same names in ``output`` are replaced.
    ``int8="auto"`` turns a QDQ model's quantized convolutions and matmuls into integer
    compute (tvm_int8), verified within one quantization step; ``"off"`` keeps Relax's
    float (fake-quant) computation.
    """
    from onnxpress import __version__
    from onnxpress.api import prepare_model

    tvm = require_tvm()
    spec = target if isinstance(target, TargetSpec) else parse_target(target)
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise CompileError(f"{out_dir}: exists and is not a folder")
    loaded, source = prepare_model(model)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    prepared = prepare(loaded, input_shapes, seed=seed)
    seconds["prepare"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mod = import_relax(prepared)
    seconds["import"] = time.perf_counter() - t0
    if int8 not in ("auto", "off"):
        raise CompileError(f"int8 must be 'auto' or 'off', not {int8!r}")
    lowering = None
    if int8 == "auto" and has_qdq(prepared.model):
        from onnxpress.tvm_int8 import lower_qdq_to_integer

        t0 = time.perf_counter()
        mod, lowering = lower_qdq_to_integer(mod, tvm_target(spec))
        seconds["int8"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    executable = build(mod, spec, default_schedules=default_schedules)
    seconds["compile"] = time.perf_counter() - t0
    inputs, outputs = _interface(prepared.model)
    notes = [*prepared.notes, *spec.notes]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "source": {
            "name": Path(source).stem if source != "<model>" else "model",
            "path": None if source == "<model>" else source,
            "sha256": _sha256(loaded),
        },
        "target": spec.to_json(),
        "library": LIBRARY_STEM + spec.library_suffix,
        "inputs": inputs,
        "outputs": outputs,
        "versions": {"onnxpress": __version__, "tvm": str(tvm.__version__)},
        "prepare": {
            "pipeline": prepared.report.pipeline if prepared.report else "",
            "passes": [
                {"name": p.name, "counts": dict(p.result.counts)}
                for p in (prepared.report.passes if prepared.report else [])
            ],
        },
        "schedules": "onnxpress-default" if default_schedules and spec.kind == "llvm" else "tvm",
        "tuning": None,
        "int8": lowering.to_json() if lowering is not None else None,
        "verification": None,
        "notes": notes,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".onnxpress-compile-", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        library = export(executable, spec, staging)
        seconds["export"] = time.perf_counter() - t0
        if verify and spec.runs_here() and spec.library_suffix == ".so":
            t0 = time.perf_counter()
            checks = differential_check(
                library,
                prepared.model,
                seed=seed,
                in_steps=lowering is not None,
                tolerance=COMPILE_TOLERANCE,
            )
            seconds["verify"] = time.perf_counter() - t0
            errors = {name: check["error"] for name, check in checks.items()}
            manifest["verification"] = {
                "against": "onnxruntime",
                "metric": ", ".join(sorted({c["metric"] for c in checks.values()})),
                "errors": errors,
                "limits": {name: check["limit"] for name, check in checks.items()},
                "limit": max(check["limit"] for check in checks.values()),
            }
            failed = [n for n, c in checks.items() if not c["error"] <= c["limit"]]
            if failed:
                check = checks[failed[0]]
                raise CompileError(
                    f"compiled output '{failed[0]}' differs from onnxruntime: "
                    f"{check['metric']} {check['error']:.3g} > {check['limit']:g}"
                )
        elif verify:
            notes.append(f"not run here: this machine cannot load a {spec.name} library")
        manifest["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(_readme(spec, library.name, manifest), encoding="utf-8")
        out_dir.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CompileResult(out_dir, out_dir / library.name, manifest, prepared.report, seconds, notes)


def load_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CompileError(f"{folder}: no {MANIFEST} (not an onnxpress compile output)")
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CompileError(f"{path}: unknown format {manifest.get('format')!r}")
    return manifest


def run_compiled(
    folder: str | os.PathLike[str], inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Run a compiled folder on named inputs; returns outputs by name.

    An input with more rows on axis 0 than the compiled shape (a multiple of it) is run in
    compiled-size chunks and the outputs are concatenated on axis 0.
    """
    manifest = load_manifest(folder)
    spec = manifest["target"]
    if spec["tvm"]["kind"] != "llvm":
        raise CompileError(f"{folder}: a {spec['name']} library cannot run on this machine")
    arrays, chunks = _check_inputs(manifest, inputs)
    compiled = CompiledModel(Path(folder) / manifest["library"])
    names = [o["name"] for o in manifest["outputs"]]
    results: list[list[np.ndarray]] = []
    for chunk in range(chunks):
        part = [
            a[chunk * len(a) // chunks : (chunk + 1) * len(a) // chunks] if chunks > 1 else a
            for a in arrays
        ]
        results.append(compiled(*part))
    if chunks == 1:
        return dict(zip(names, results[0], strict=True))
    return {n: np.concatenate([r[i] for r in results], axis=0) for i, n in enumerate(names)}


def _check_inputs(
    manifest: dict[str, Any], inputs: Mapping[str, np.ndarray]
) -> tuple[list[np.ndarray], int]:
    arrays: list[np.ndarray] = []
    chunks = 1
    for entry in manifest["inputs"]:
        name, shape, dtype = entry["name"], list(entry["shape"]), np.dtype(entry["dtype"])
        if name not in inputs:
            raise CompileError(f"input '{name}' is missing (inputs: {sorted(inputs)})")
        array = np.asarray(inputs[name])
        if array.dtype != dtype:
            array = array.astype(dtype)
        got = list(array.shape)
        if got != shape:
            rows = got[0] // shape[0] if got and shape and shape[0] else 0
            if not (got[1:] == shape[1:] and rows and got[0] == rows * shape[0]):
                raise CompileError(
                    f"input '{name}' has shape {got}; the library was compiled for {shape}"
                )
            if chunks not in (1, rows):
                raise CompileError("inputs disagree on the number of rows")
            chunks = rows
        arrays.append(array)
    return arrays, chunks


def reference_outputs(
    model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """onnxruntime outputs of ``model`` (used by ``run --verify``)."""
    runner = Runner(copy_model(model))
    feed = {vi.name: np.asarray(inputs[vi.name]) for vi in graph_inputs(model)}
    return dict(zip(runner.output_names, runner(feed), strict=True))


def compare_outputs(
    expected: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]
) -> dict[str, float]:
    return {
        name: _max_rel(np.asarray(ref), np.asarray(got[name])) for name, ref in expected.items()
    }
