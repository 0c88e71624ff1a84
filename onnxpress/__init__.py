"""onnxpress: a graph-rewriting compression compiler for ONNX models."""

from onnxpress.api import optimize
from onnxpress.backends.tvm.backend import compile_model as compile  # imports TVM lazily
from onnxpress.backends.tvm.runtime import run_compiled
from onnxpress.core.calibration_data import CalibrationData
from onnxpress.core.context import PassContext, TensorShapes
from onnxpress.core.errors import (
    CalibrationError,
    InvalidModelError,
    ModelLoadError,
    ModelSaveError,
    OnnxpressError,
    PassError,
    PipelineError,
    PluginError,
    VerificationError,
)
from onnxpress.core.io import load_model, save_model
from onnxpress.core.manager import PassManager, VerifyConfig, bisect
from onnxpress.core.pass_base import NoOptions, Pass, PassResult, Refusal
from onnxpress.core.pipeline import load_recipe, parse_pipeline
from onnxpress.core.registry import all_passes, get_pass, load_plugin_file, register_pass
from onnxpress.core.report import Report
from onnxpress.core.stats import model_stats
from onnxpress.core.version import __version__
from onnxpress.train.distill import distill  # imports torch lazily
from onnxpress.train.distill_options import DistillOptions, DistillReport  # imports torch lazily

__all__ = [
    "CalibrationData",
    "CalibrationError",
    "DistillOptions",
    "DistillReport",
    "InvalidModelError",
    "ModelLoadError",
    "ModelSaveError",
    "NoOptions",
    "OnnxpressError",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PipelineError",
    "PluginError",
    "Refusal",
    "Report",
    "TensorShapes",
    "VerificationError",
    "VerifyConfig",
    "__version__",
    "all_passes",
    "bisect",
    "compile",
    "distill",
    "get_pass",
    "load_model",
    "load_plugin_file",
    "load_recipe",
    "model_stats",
    "optimize",
    "parse_pipeline",
    "register_pass",
    "run_compiled",
    "save_model",
]
