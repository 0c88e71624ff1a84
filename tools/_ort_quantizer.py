"""onnxruntime's own static quantizer as a baseline for the bench scripts: ``ort_quantized``
runs ``onnxruntime.quantization.quantize_static`` in its QDQ format, with the settings its
documentation recommends for x86 CPUs (per-channel int8 weights, uint8 activations, the
pre-processing step first) on the same calibration batches onnxpress gets.

Its models run on onnxruntime's fastest int8 kernels on every x86 CPU (u8 x s8). On x86
without VNNI those kernels add weight pairs in int16 and can saturate: onnxpress's default
``qdq`` avoids that (passes/qdq/saturation.py), often with uint8 weights that onnxruntime runs
on slower u8 x u8 kernels. So onnxruntime on this model is the fastest int8 onnxruntime
offers, not a model that holds on every target; the zoo times it beside onnxpress's own
(docs/BENCHMARKS.md, run 27).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

logger = logging.getLogger(__name__)


def ort_quantized(
    model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]
) -> onnx.ModelProto | None:
    """``model`` quantized by onnxruntime's quantize_static (QDQ), or None where it fails."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = list(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return dict(self.left.pop(0)) if self.left else None

    with tempfile.TemporaryDirectory() as tmp:
        source, prepared, target = (Path(tmp) / n for n in ("m.onnx", "pre.onnx", "q.onnx"))
        onnx.save(model, source)
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        except Exception as error:  # its optimizer refuses some graphs: quantize as exported
            logger.warning("quant_pre_process failed (%s); quantizing the model as it is", error)
            prepared = source
        try:
            quantize_static(
                str(prepared),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        except Exception as error:
            logger.warning("onnxruntime's quantize_static failed: %s", error)
            return None
        return onnx.load(target)
