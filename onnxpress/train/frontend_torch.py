"""``export(module, example_inputs, path)``: torch.onnx.export with the checks onnxpress needs.

The legacy (TorchScript) exporter writes the model at a fixed opset with the first axis of
every input and output dynamic (``dim_param: "batch"``); the file is then checked with the
full ONNX checker and strict shape inference, and onnxruntime's outputs are compared with
torch's on the example inputs (and on the same inputs repeated to another batch size when
the batch is dynamic). A mismatch raises VerificationError; nothing is left at ``path``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpress.core.errors import InvalidModelError, VerificationError
from onnxpress.core.verify import Runner, check_structure
from onnxpress.train.distill_options import require_torch

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def _tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def export(
    module: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    tolerance: float = 1e-4,
) -> onnx.ModelProto:
    """Export ``module`` in eval mode to ``path`` and check it; returns the loaded model.

    ``tolerance`` bounds max|ort - torch| / max(1, max|torch|) per output.
    """
    torch = require_torch()
    if not 7 <= opset <= 21:
        raise InvalidModelError(f"opset {opset} is outside the supported range 7..21")
    inputs = _tuple(example_inputs)
    module.eval()
    with torch.no_grad():
        expected = module(*inputs)
    expected_list = list(expected) if isinstance(expected, (tuple, list)) else [expected]
    in_names = list(input_names or [f"input{i}" if i else "input" for i in range(len(inputs))])
    out_names = list(
        output_names or [f"output{i}" if i else "output" for i in range(len(expected_list))]
    )
    axes = {name: {0: "batch"} for name in [*in_names, *out_names]} if dynamic_batch else None
    target = Path(path)
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            inputs,
            str(target),
            dynamo=False,
            opset_version=opset,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=axes,
            training=torch.onnx.TrainingMode.EVAL,
        )
    try:
        model = onnx.load(str(target))
        check_structure(model)
        runner = Runner(model)
        feeds = [{n: t.numpy() for n, t in zip(in_names, inputs, strict=True)}]
        references = [[t.numpy() for t in expected_list]]
        if dynamic_batch:
            doubled = tuple(torch.cat([t, t]) for t in inputs)
            with torch.no_grad():
                again = module(*doubled)
            again_list = list(again) if isinstance(again, (tuple, list)) else [again]
            feeds.append({n: t.numpy() for n, t in zip(in_names, doubled, strict=True)})
            references.append([t.numpy() for t in again_list])
        for feed, reference in zip(feeds, references, strict=True):
            for name, ref, got in zip(out_names, reference, runner(feed), strict=True):
                error = float(np.max(np.abs(ref - got))) / max(1.0, float(np.max(np.abs(ref))))
                if ref.shape != got.shape or not error <= tolerance:
                    raise VerificationError(
                        "export", f"output '{name}' differs from torch (error {error:.2e})"
                    )
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    logger.info("exported %s at opset %d", target, opset)
    return model
