"""onnxpress: a graph-rewriting compression compiler for ONNX models."""

from onnxpress.api import optimize
from onnxpress.calibration import CalibrationData
from onnxpress.context import PassContext, TensorShapes
from onnxpress.distill import DistillOptions, DistillReport, distill  # imports torch lazily
from onnxpress.errors import (
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
from onnxpress.io import load_model, save_model
from onnxpress.manager import PassManager, VerifyConfig, bisect
from onnxpress.pass_base import NoOptions, Pass, PassResult, Refusal
from onnxpress.pipeline import load_recipe, parse_pipeline
from onnxpress.registry import all_passes, get_pass, load_plugin_file, register_pass
from onnxpress.report import Report
from onnxpress.stats import model_stats
from onnxpress.tvm_backend import compile_model as compile  # imports TVM lazily
from onnxpress.tvm_runtime import run_compiled

__version__ = "0.1.0"

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
