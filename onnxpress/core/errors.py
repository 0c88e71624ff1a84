"""Error types: every failure the CLI reports as a one-line message derives from OnnxpressError."""

from __future__ import annotations


class OnnxpressError(Exception):
    """Base class for all errors that onnxpress reports to the user as one line."""


class ModelLoadError(OnnxpressError):
    """The model file cannot be read, parsed or trusted (bad bytes, unsafe external data)."""


class ModelSaveError(OnnxpressError):
    """The output cannot be written (same path as the input, unwritable folder)."""


class OutputConflictError(ModelSaveError):
    """An output would overwrite an input or another output (same inode): a usage error."""


class InvalidModelError(OnnxpressError):
    """The model parses but is not a valid ONNX graph (checker failure, cycle)."""


class PipelineError(OnnxpressError):
    """The pipeline text or recipe is malformed, names an unknown pass or a bad option."""


class CalibrationError(OnnxpressError):
    """Calibration data is unreadable or does not match the model's inputs."""


class PluginError(OnnxpressError):
    """A plugin file or entry point failed to load or registered something invalid."""


class PassError(OnnxpressError):
    """A pass raised while rewriting the graph."""

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"pass '{pass_name}' failed: {message}")
        self.pass_name = pass_name


class VerificationError(OnnxpressError):
    """The graph produced by a pass failed structural or numeric verification."""

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"verification failed after pass '{pass_name}': {message}")
        self.pass_name = pass_name
