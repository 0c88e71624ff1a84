"""The TVM steps of a compile: ONNX -> Relax module -> fused, scheduled, built, exported.

  import_relax: TVM's ONNX importer on a prepared model, with the GRU/LSTM loop converters of
      gru.py and lstm.py and a Clip of Relax ops for the duration of one import
      (``importer_overrides``);
  fuse / apply_database: legalize and fuse the module, give tuned kernels their records;
  build: ``tvm.compile`` with onnxpress's default CPU schedules (schedule.py) and TIR
      passes (``tir_pipeline``);
  export: the library file in a folder, with onnxpress's parallel launch (thread_pool.py).

backend.py (compile_model) runs them in order; tune.py and tune_db.py build candidates and
guards with them. TVM is imported lazily, inside each function.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from onnxpress.backends.tvm import dynamic_parallel, thread_pool
from onnxpress.backends.tvm.gru import convert_gru
from onnxpress.backends.tvm.lstm import convert_lstm
from onnxpress.backends.tvm.prefetch import prefetch_pass
from onnxpress.backends.tvm.prepare import Prepared, check_coverage
from onnxpress.backends.tvm.runtime import CompileError, require_tvm
from onnxpress.backends.tvm.schedule import cpu_lowering_passes, cpu_pipeline
from onnxpress.backends.tvm.targets import TargetSpec, split_threads, tvm_target
from onnxpress.backends.tvm.tir_passes import stack_scratch_pass

LIBRARY_STEM = "model"
PARALLEL = ("dynamic", "static")  # how CPU kernels split their parallel loops (build)


logger = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    # TVM errors carry a C++/Python backtrace; the message is the last line that is not a frame.
    for line in reversed(lines):
        if not line.startswith(("File ", "at ", "0:", "1:", "Traceback")) and ":" not in line[:3]:
            return f"{type(exc).__name__}: {line}"
    return type(exc).__name__


@contextlib.contextmanager
def importer_overrides(loop_rnn: bool) -> Iterator[None]:
    """TVM's ONNX importer, for the duration of the block, with Clip as Relax maximum and
    minimum ops when its bounds are constants (the stock converter emits TE kernels, which
    no Relax pass sees through: blocked_layout.py), Min/Max/Sum/Mean as pairwise ops and,
    with ``loop_rnn``, the GRU and LSTM loop converters."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    class Gru(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v7(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            return convert_gru(bb, list(inputs), dict(attr))

    class Lstm(frontend.OnnxOpConverter):
        @classmethod
        def _impl_v7(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            return convert_lstm(bb, list(inputs), dict(attr))

    class Clip(frontend.Clip):
        @classmethod
        def _impl_v13(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            x = inputs[0]
            bounds = [_scalar(b) for b in list(inputs[1:3]) + [None] * (3 - len(inputs))]
            if str(x.ty.dtype) != "float32" or any(b is False for b in bounds):
                return super()._impl_v13(bb, inputs, attr, params)
            return _clipped(bb, x, bounds[0], bounds[1])

        @classmethod
        def _impl_v1(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            if str(inputs[0].ty.dtype) != "float32":
                return super()._impl_v1(bb, inputs, attr, params)
            return _clipped(bb, inputs[0], attr.get("min"), attr.get("max"))

    def _scalar(bound: Any) -> float | bool | None:
        """A bound's value, None when absent (or NaN: unbounded), False when not constant."""
        if bound is None:
            return None
        if not isinstance(bound, tvm.ir.Constant) or bound.value.numpy().size != 1:
            return False
        value = float(bound.value.numpy().reshape(()))
        return None if value != value else value

    def _clipped(bb: Any, x: Any, low: float | None, high: float | None) -> Any:
        if low is not None:
            x = bb.emit(relax.op.maximum(x, relax.const(float(low), "float32")))
        if high is not None:
            x = bb.emit(relax.op.minimum(x, relax.const(float(high), "float32")))
        return x

    def pairwise(base: Any) -> Any:
        """Min/Max/Sum/Mean of tensors folded pairwise (minimum, maximum, add): the stock
        converter broadcasts the inputs, stacks them and reduces the stack, a reduction
        kernel that fuses with nothing, for every two-input clamp."""

        class Pairwise(base):
            @classmethod
            def _impl_v1(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
                if all(isinstance(i, tvm.ir.GenericConst) for i in inputs):
                    return super()._impl_v1(bb, inputs, attr, params)
                return cls._impl_dynamic(bb, list(inputs))

        return Pairwise

    original = frontend._get_convert_map

    def overridden() -> dict[str, Any]:
        table = dict(original())
        table["Clip"] = Clip
        for name in ("Min", "Max", "Sum", "Mean"):
            table[name] = pairwise(table[name])
        if loop_rnn:
            table.update({"GRU": Gru, "LSTM": Lstm})
        return table

    frontend._get_convert_map = overridden
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
        with importer_overrides(loop_rnn):
            return from_onnx(
                prepared.model,
                shape_dict=dict(prepared.input_shapes),
                dtype_dict=dict(prepared.input_dtypes),
            )
    except Exception as exc:
        raise CompileError(f"TVM's ONNX importer failed: {_first_line(exc)}") from exc


def check_parallel(parallel: str) -> None:
    """CompileError unless ``parallel`` is one of PARALLEL."""
    if parallel not in PARALLEL:
        raise CompileError(f"parallel must be 'dynamic' or 'static', not {parallel!r}")


def tir_pipeline(threads: int) -> str:
    """The name of TVM's TIR pipeline plus onnxpress's passes, registered on first use: the
    dynamic split of parallel loops for ``threads`` runtime threads (dynamic_parallel.py;
    none when 0), kernel scratch on the stack (tir_passes.py) and the prefetch of a split
    reduction's next chunk (prefetch.py)."""
    import tvm
    from tvm.tirx import compilation_pipeline as pipelines

    name = f"onnxpress-cpu-{threads}"

    def factory() -> Any:
        default, host, device = pipelines.get_tir_pipeline("s_tir")
        passes = [default]
        if threads:
            passes.append(dynamic_parallel.dynamic_parallel_pass(threads))
        passes.append(stack_scratch_pass())
        passes.append(prefetch_pass())
        return tvm.transform.Sequential(passes), host, device

    if name not in pipelines.PIPELINE_MAP:
        pipelines.register_tir_pipeline(name, factory)
    return name


def build(
    mod: Any,
    spec: TargetSpec,
    *,
    default_schedules: bool = True,
    database: Any = None,
    parallel: str = "dynamic",
) -> Any:
    """``tvm.compile`` for a target: the relax default pipeline (dlight on CUDA), plus
    onnxpress's untuned CPU schedules (schedule.py) when ``default_schedules``.

    With a MetaSchedule ``database`` (tune.py), the module is fused and every kernel with a
    tuning record gets its best schedule first; the default schedules skip those kernels.
    ``parallel="dynamic"`` splits the parallel loops of a library for this host by claimed
    chunks (dynamic_parallel.py, targets.split_threads); ``"static"`` keeps TVM's split,
    which is also what a library falls back to when TVM fails on the dynamic form."""
    tvm = require_tvm()
    target = tvm_target(spec)
    check_parallel(parallel)
    threads = split_threads(spec, parallel)

    def compile_with(tir: str) -> Any:
        if spec.kind == "llvm" and default_schedules:
            return tvm.compile(
                mod, target=target, relax_pipeline=cpu_pipeline(target), tir_pipeline=tir
            )
        return tvm.compile(mod, target=target, tir_pipeline=tir)

    try:
        if database is not None:
            mod = apply_database(fuse(mod, target, default_schedules), target, database)
    except Exception as exc:
        raise CompileError(f"TVM could not compile for {spec.name}: {_first_line(exc)}") from exc
    try:
        return compile_with(tir_pipeline(threads))
    except Exception as exc:
        error = exc
    if threads:  # TVM's simplifier has failed on a kernel after the dynamic split (an
        # int32 literal overflow, tune_db.record_builds): the static split builds the same
        # kernels, with the same results, only without the rebalancing
        logger.warning("the dynamic loop split failed (%s); TVM's static split", _first_line(error))
        try:
            return compile_with(tir_pipeline(0))
        except Exception:
            pass
    raise CompileError(f"TVM could not compile for {spec.name}: {_first_line(error)}") from error


def links_pool(spec: TargetSpec) -> bool:
    """Whether ``spec``'s libraries carry onnxpress's parallel launch: CPU, Linux."""
    return spec.kind == "llvm" and spec.library_suffix == ".so" and sys.platform == "linux"


def export(executable: Any, spec: TargetSpec, folder: Path) -> Path:
    """Write the library; a CPU library for Linux carries onnxpress's parallel launch
    (thread_pool.py), compiled with the library's own compiler."""
    path = folder / (LIBRARY_STEM + spec.library_suffix)
    options: dict[str, Any] = {"cc": spec.cross_compiler} if spec.cross_compiler else {}
    try:
        with tempfile.TemporaryDirectory(prefix="onnxpress-pool-") as scratch:
            if links_pool(spec):
                pool = thread_pool.object_file(Path(scratch), spec.cross_compiler)
                options["addons"] = [str(pool)]
            executable.export_library(str(path), **options)
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
        passes += cpu_lowering_passes(target)
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
