"""Per-layer int8 sensitivities, measured once per model and calibration set and cached.

The sensitivity of a layer is the relative L2 error of the model's first output when only
that layer is quantized (``qdq{method=minmax,include=[layer]}``, no bias correction, no
recovery), on the calibration batches. Trials that keep the k most sensitive layers float
read this ranking instead of measuring it again; the ranking is stored in the search folder
(``sensitivity.json``) under a key made of the model's bytes, the calibration arrays and the
targets, so a resumed search, or another worker, reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import onnx

from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.manager import PassManager, VerifyConfig
from onnxpress.core.pipeline import parse_pipeline
from onnxpress.core.targets import Target
from onnxpress.core.verify import Runner, run_all

logger = logging.getLogger(__name__)

LAYER_OPS = {"Conv", "MatMul", "Gemm"}
SENSITIVITY_BATCHES = 4
CACHE_VERSION = 1


def cache_key(
    model: onnx.ModelProto, calibration: CalibrationData, targets: tuple[Target, ...]
) -> str:
    digest = hashlib.sha256(model.SerializeToString())
    for batch in calibration.batches(limit=SENSITIVITY_BATCHES):
        for name in sorted(batch):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(batch[name]).tobytes())
    digest.update(",".join(t.name for t in targets).encode())
    digest.update(str(CACHE_VERSION).encode())
    return digest.hexdigest()


def _rel_l2(ref: np.ndarray, new: np.ndarray) -> float:
    ref64, new64 = ref.astype(np.float64), new.astype(np.float64)
    norm = float(np.linalg.norm(ref64))
    return float(np.linalg.norm(new64 - ref64) / norm) if norm > 0 else 0.0


def measure_int8(
    model: onnx.ModelProto, calibration: CalibrationData, targets: tuple[Target, ...]
) -> dict[str, float]:
    """Layer name -> output error with only that layer in int8 (names of ``model``)."""
    batches = list(calibration.batches(limit=SENSITIVITY_BATCHES))
    data = CalibrationData.from_batches(batches)
    reference = run_all(Runner(model, optimized=True), batches)
    errors: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or not node.name:
            continue
        if any(c in node.name for c in ",{}[]=\"' "):
            continue  # not expressible in pipeline text; stays in the quantized set
        text = f'qdq{{method=minmax,include=["{node.name}"],bias-correction=false,recover=false}}'
        try:
            quantized, report = PassManager(
                parse_pipeline(text), VerifyConfig(level="off"), data, targets=targets
            ).run(model)
        except Exception as exc:
            logger.info("int8 sensitivity of %s not measured: %s", node.name, exc)
            continue
        if not report.passes[-1].result.changed:
            continue
        outputs = run_all(Runner(quantized, optimized=True), batches)
        errors[node.name] = float(
            np.mean([_rel_l2(ref[0], out[0]) for ref, out in zip(reference, outputs, strict=True)])
        )
    return errors


def int8_ranking(
    model: onnx.ModelProto,
    calibration: CalibrationData,
    targets: tuple[Target, ...],
    cache: Path | None,
) -> tuple[tuple[str, ...], dict[str, float], bool]:
    """(layers most sensitive first, their errors, whether the cache answered)."""
    key = cache_key(model, calibration, targets)
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text(encoding="utf-8"))
            if stored.get("key") == key:
                errors = {str(k): float(v) for k, v in stored["int8"].items()}
                return _ranked(errors), errors, True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            logger.warning("%s: unreadable sensitivity cache; measuring again", cache)
    errors = measure_int8(model, calibration, targets)
    if cache is not None:
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "int8": errors}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, cache)
    return _ranked(errors), errors, False


def _ranked(errors: dict[str, float]) -> tuple[str, ...]:
    return tuple(sorted(errors, key=lambda name: (-errors[name], name)))
