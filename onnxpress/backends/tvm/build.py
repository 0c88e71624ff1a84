"""The TVM steps of a compile: ONNX -> Relax module -> fused, scheduled, built, exported.

  import_relax: TVM's ONNX importer (with the GRU/LSTM loop converters of gru.py and lstm.py
      for the duration of one import, ``importer_with_rnn``) on a prepared model;
  fuse / apply_database: legalize and fuse the module, give tuned kernels their records;
  build: ``tvm.compile`` with onnxpress's default CPU schedules (schedule.py);
  export: the library file in a folder.

backend.py (compile_model) runs them in order; tune.py and tune_db.py build candidates and
guards with them. TVM is imported lazily, inside each function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onnxpress.backends.tvm.conv_packed import legalize_passes
from onnxpress.backends.tvm.fast_math import fast_math_pass
from onnxpress.backends.tvm.gru import convert_gru
from onnxpress.backends.tvm.lstm import convert_lstm
from onnxpress.backends.tvm.prepare import Prepared, check_coverage
from onnxpress.backends.tvm.runtime import CompileError, require_tvm
from onnxpress.backends.tvm.schedule import cpu_pipeline
from onnxpress.backends.tvm.targets import TargetSpec, tvm_target
from onnxpress.backends.tvm.tile_schedule import (
    conv_kernel_layout_pass,
    vector_lanes,
    vector_registers,
)

LIBRARY_STEM = "model"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # TVM errors carry a C++/Python backtrace; the message is the last line that is not a frame.
    for line in reversed(lines):
        if not line.startswith(("File ", "at ", "0:", "1:", "Traceback")) and ":" not in line[:3]:
            return f"{type(exc).__name__}: {line}"
    return type(exc).__name__


@contextlib.contextmanager
def importer_with_rnn() -> Iterator[None]:
    """TVM's ONNX importer with the GRU and LSTM loop converters, for the duration of the block."""
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    class Gru(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v7(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            return convert_gru(bb, list(inputs), dict(attr))

    class Lstm(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v7(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            return convert_lstm(bb, list(inputs), dict(attr))

    original = frontend._get_convert_map

    def with_rnn() -> dict[str, Any]:
        table = dict(original())
        table.update({"GRU": Gru, "LSTM": Lstm})
        return table

    frontend._get_convert_map = with_rnn
    try:
        yield
    finally:
        frontend._get_convert_map = original


def import_relax(prepared: Prepared, *, loop_rnn: bool = True) -> Any:
    """The Relax IRModule of a prepared model (coverage is checked first); ``loop_rnn``
    converts GRU and LSTM ops to the loop-form CPU kernels of onnxpress.backends.tvm.rnn."""
    require_tvm()
    check_coverage(prepared.model, loop_rnn=loop_rnn)
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with importer_with_rnn() if loop_rnn else contextlib.nullcontext():
            return from_onnx(
                prepared.model,
                shape_dict=dict(prepared.input_shapes),
                dtype_dict=dict(prepared.input_dtypes),
            )
    except Exception as exc:
        raise CompileError(f"TVM's ONNX importer failed: {_first_line(exc)}") from exc


def build(
    mod: Any, spec: TargetSpec, *, default_schedules: bool = True, database: Any = None
) -> Any:
    """``tvm.compile`` for a target: the relax default pipeline (dlight on CUDA), plus
    onnxpress's untuned CPU schedules (schedule.py) when ``default_schedules``.

    With a MetaSchedule ``database`` (tune.py), the module is fused and every kernel with a
    tuning record gets its best schedule first; the default schedules skip those kernels."""
    tvm = require_tvm()
    target = tvm_target(spec)
    try:
        if database is not None:
            mod = apply_database(fuse(mod, target, default_schedules), target, database)
        if spec.kind == "llvm" and default_schedules:
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


def fuse(mod: Any, target: Any, default_schedules: bool = True) -> Any:
    """Legalize and fuse: the kernels MetaSchedule tunes and the compile pipeline builds.
    With ``default_schedules`` on CPU, the layout rewrite and legalization that
    schedule.py's pipeline runs (conv weights to IHWO, packed: conv_packed.py), so tuned
    kernels are the ones it builds."""
    import tvm
    from tvm.relax import pipeline as relax_pipeline

    passes = [*relax_pipeline.library_dispatch_passes(target)]
    if default_schedules and str(target.kind.name) == "llvm":
        lanes = vector_lanes(target)
        passes += [fast_math_pass(), conv_kernel_layout_pass(lanes)]
        passes += legalize_passes(lanes, vector_registers(target))
    else:
        passes += [
            tvm.relax.transform.LegalizeOps(),
            tvm.relax.transform.AnnotateTIROpPattern(),
            tvm.relax.transform.FoldConstant(),
            tvm.relax.transform.FuseOps(),
            tvm.relax.transform.FuseTIR(),
        ]
    with target:
        return tvm.transform.Sequential(passes)(mod)


def apply_database(mod: Any, target: Any, database: Any) -> Any:
    """Schedule every kernel of a fused module that has a record with its best record."""
    import tvm
    from tvm.relax.transform import MetaScheduleApplyDatabase

    with target, database, tvm.transform.PassContext(opt_level=3):
        return MetaScheduleApplyDatabase(enable_warning=False)(mod)
