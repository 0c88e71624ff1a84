"""Running what ``onnxpress compile`` wrote, with the TVM runtime only: the manifest, the
compiled model as a numpy callable, chunked runs over larger batches, and the comparison
with onnxruntime behind ``onnxpress run --verify``.

TVM is imported lazily: a missing TVM is one TvmMissingError that says how to install it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.backends.tvm import thread_pool
from onnxpress.backends.tvm.prepare import graph_inputs
from onnxpress.backends.tvm.targets import runtime_threads
from onnxpress.core.errors import OnnxpressError
from onnxpress.core.ir import copy_model
from onnxpress.core.verify import Runner, max_rel_error

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "onnxpress-tvm/1"


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


class CompiledModel:
    """A compiled library loaded with the TVM runtime: call it with numpy arrays."""

    def __init__(self, library: str | os.PathLike[str], device: str = "cpu") -> None:
        tvm = require_tvm()
        from tvm import relax

        self._tvm = tvm
        self.device = tvm.device(device, 0)
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), self.device)
        # onnxpress's parallel launch, where the library carries it (CPU, Linux)
        self.pool = self.device.dlpack_device_type() == 1 and thread_pool.install(
            library, runtime_threads()
        )
        self._inputs: dict[tuple[int, tuple[int, ...], str], Any] = {}

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        # Inputs are copied into tensors kept from the previous call (a third of the cost of
        # a new tensor); CPU outputs are handed over without a copy through DLPack.
        args = []
        for index, array in enumerate(arrays):
            array = np.ascontiguousarray(array)
            key = (index, array.shape, array.dtype.str)
            tensor = self._inputs.get(key)
            if tensor is None:
                tensor = self._tvm.runtime.empty(array.shape, array.dtype.name, self.device)
                self._inputs[key] = tensor
            tensor.copyfrom(array)
            args.append(tensor)
        out = self.vm["main"](*args)
        items = [out] if hasattr(out, "numpy") else list(out)
        if self.device.dlpack_device_type() == 1:  # kDLCPU
            return [np.from_dlpack(item) for item in items]
        return [np.asarray(item.numpy()) for item in items]


def max_rel(ref: np.ndarray, new: np.ndarray) -> float:
    """The verifier's max-rel (onnxpress.core.verify), made total: a shape mismatch is infinite,
    integer outputs must match exactly, and the NaN/inf of float outputs must match."""
    if ref.shape != new.shape:
        return float("inf")
    if not np.issubdtype(ref.dtype, np.floating):
        return 0.0 if np.array_equal(ref, new) else float("inf")
    return max_rel_error(ref, new)


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
    return {name: max_rel(np.asarray(ref), np.asarray(got[name])) for name, ref in expected.items()}
