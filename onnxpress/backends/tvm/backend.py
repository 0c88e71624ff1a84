"""``onnxpress compile`` / ``onnxpress run``: ONNX -> Apache TVM (Relax) library + manifest.

  compile(model, target, input_shapes, output_dir):
      prepare (prepare.py: static shapes, verified lower-gru/fold-constants/cleanup)
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxpress.backends.tvm.build import (
    LIBRARY_STEM,
    build,
    check_parallel,
    export,
    import_relax,
    links_pool,
)
from onnxpress.backends.tvm.prepare import (
    LOOP_GRU_PIPELINE,
    PREPARE_PIPELINE,
    graph_inputs,
    prepare,
    with_dynamic_lstm,
    with_masked_lowering,
)
from onnxpress.backends.tvm.runtime import (  # re-exported: the runtime half of compile/run
    MANIFEST,
    MANIFEST_FORMAT,
    CompileError,
    require_tvm,
)
from onnxpress.backends.tvm.targets import TargetSpec, parse_target, split_threads, tvm_target
from onnxpress.backends.tvm.tune import TuneOptions, TuningProgress
from onnxpress.backends.tvm.verify import differential_check, has_qdq
from onnxpress.core.io import prepare_model
from onnxpress.core.manager import VerifyConfig
from onnxpress.core.report import Report
from onnxpress.core.version import __version__

logger = logging.getLogger(__name__)

# Compiled vs onnxruntime: max |diff| / max |ref| per output (float reassociation only).
COMPILE_TOLERANCE = 1e-4


@dataclass
class CompileResult:
    output_dir: Path
    library: Path
    manifest: dict[str, Any]
    report: Report | None
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _interface(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    def entry(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        return {
            "name": vi.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim],
        }

    return [entry(vi) for vi in graph_inputs(model)], [entry(vi) for vi in model.graph.output]


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
        "Or: `onnxpress run <this folder> --inputs x.npz [--verify model.onnx]`, which also\n"
        "installs onnxpress's parallel launch where the manifest's `parallel.launch` names it\n"
        "(a kernel's tasks claimed by whichever thread is free; plain TVM uses its own pool).\n"
        "Shapes, dtypes, target and versions are in manifest.json.\n"
    )


def _parallel_json(spec: TargetSpec, parallel: str) -> dict[str, Any]:
    threads = split_threads(spec, parallel)
    return {
        "split": "dynamic" if threads else "static",
        "threads": threads or None,
        "launch": "onnxpress" if links_pool(spec) else "tvm",  # thread_pool.py
    }


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
    gru: str = "loop",
    parallel: str = "dynamic",
    tuning: TuneOptions | None = None,
    on_tuning_progress: Callable[[TuningProgress], None] | None = None,
) -> CompileResult:
    """Compile an ONNX model with TVM into the folder ``output`` (library, manifest.json,
    README.md); ``onnxpress.compile`` is this function, mirroring ``onnxpress compile``.

    ``target`` is a name (see targets.py) or TargetSpec; ``input_shapes`` maps input names
    to static shapes (default: the model's, a symbolic leading axis set to 1). Nothing is
    written unless every step, including the check against onnxruntime on targets that run
    here, succeeded. Existing files of the same names in ``output`` are replaced.
    ``int8="auto"`` turns a QDQ model's quantized convolutions and matmuls into integer
    compute (int8.py), verified within one quantization step; ``"off"`` keeps Relax's
    float (fake-quant) computation. ``tuning`` runs MetaSchedule first (tune.py: trials,
    persistent database, optional RPC device), reporting to ``on_tuning_progress``.
    ``gru="loop"`` compiles each ONNX GRU as one recurrence kernel (gru.py); ``"unroll"``
    runs lower-gru first (one set of ops per step). LSTMs always compile as loops
    (lstm.py), on CPU targets. ``parallel="dynamic"`` lets the threads of a library built
    for this host (``x86``) share each kernel's loop iterations as they go
    (dynamic_parallel.py); ``"static"`` keeps TVM's fixed split.
    """
    if gru not in ("loop", "unroll"):
        raise CompileError(f"gru must be 'loop' or 'unroll', not {gru!r}")
    if int8 not in ("auto", "off"):
        raise CompileError(f"int8 must be 'auto' or 'off', not {int8!r}")
    check_parallel(parallel)
    tvm = require_tvm()
    spec = target if isinstance(target, TargetSpec) else parse_target(target)
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise CompileError(f"{out_dir}: exists and is not a folder")
    loaded, source = prepare_model(model)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    gru_notes = []
    if gru == "loop" and spec.is_gpu:
        gru = "unroll"  # the recurrence kernel is a CPU loop nest; GPUs get dlight's schedules
        gru_notes.append("GRU ops unrolled by lower-gru on GPU targets (no GPU loop kernel)")
    pipeline = with_dynamic_lstm(
        loaded,
        with_masked_lowering(loaded, LOOP_GRU_PIPELINE if gru == "loop" else PREPARE_PIPELINE),
    )
    # --no-verify: no onnxruntime run anywhere, the prepare pipeline's checks included
    prepare_checks = VerifyConfig(level="numeric" if verify else "structure")
    prepared = prepare(loaded, input_shapes, pipeline=pipeline, verify=prepare_checks, seed=seed)
    seconds["prepare"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mod = import_relax(prepared, loop_rnn=not spec.is_gpu)
    seconds["import"] = time.perf_counter() - t0
    lowering = None
    if int8 == "auto" and has_qdq(prepared.model):
        from onnxpress.backends.tvm.int8 import lower_qdq_to_integer

        t0 = time.perf_counter()
        mod, lowering = lower_qdq_to_integer(mod, tvm_target(spec))
        seconds["int8"] = time.perf_counter() - t0
    tuned = None
    if tuning is not None:
        from onnxpress.backends.tvm.tune import tune_module

        t0 = time.perf_counter()
        tuned = tune_module(
            mod, spec, tuning, on_tuning_progress, default_schedules=default_schedules
        )
        seconds["tune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    executable = build(
        mod,
        spec,
        default_schedules=default_schedules,
        database=tuned.database if tuned is not None else None,
        parallel=parallel,
    )
    seconds["compile"] = time.perf_counter() - t0
    inputs, outputs = _interface(prepared.model)
    notes = [*prepared.notes, *spec.notes, *gru_notes]
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
        "parallel": _parallel_json(spec, parallel),
        "tuning": tuned.summary.to_json() if tuned is not None else None,
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
            spread = {
                n: c["onnxruntime_spread"] for n, c in checks.items() if "onnxruntime_spread" in c
            }
            if spread:  # the limit lies beyond onnxruntime's own spread (verify.py)
                manifest["verification"]["onnxruntime_spread"] = spread
            failed = [n for n, c in checks.items() if not c["error"] <= c["limit"]]
            if failed:
                check = checks[failed[0]]
                raise CompileError(
                    f"compiled output '{failed[0]}' differs from onnxruntime: "
                    f"{check['metric']} {check['error']:.3g} > {check['limit']:.3g}"
                    + (
                        f" ({_beyond(check)} beyond onnxruntime's own spread "
                        f"{check['onnxruntime_spread']:.3g})"
                        if "onnxruntime_spread" in check
                        else ""
                    )
                )
        elif verify:
            notes.append(f"not run here: this machine cannot load a {spec.name} library")
        if tuned is not None and tuning is not None and tuning.rpc is not None:
            _time_on_device(library, spec, tuning, manifest, notes)
        manifest["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(_readme(spec, library.name, manifest), encoding="utf-8")
        out_dir.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CompileResult(out_dir, out_dir / library.name, manifest, prepared.report, seconds, notes)


def _beyond(check: dict[str, Any]) -> str:
    """How far beyond onnxruntime's spread a check's limit lies, in its own words."""
    return "one step" if check["metric"].startswith("max-abs/step") else "the tolerance"


def _time_on_device(
    library: Path, spec: TargetSpec, tuning: TuneOptions, manifest: dict[str, Any], notes: list[str]
) -> None:
    """Time the compiled library on the RPC device it was tuned on (manifest "tuning")."""
    from onnxpress.backends.tvm.rpc import time_library

    if spec.library_suffix != ".so" or tuning.rpc is None:
        notes.append(f"not timed over RPC: a {spec.library_suffix} library must be linked first")
        return
    device = "cuda" if spec.is_gpu else "cpu"
    timing = time_library(library, tuning.rpc, manifest["inputs"], device)
    manifest["tuning"]["library_timing"] = timing
