"""The onnxpress version, in one place (the package exports it as ``onnxpress.__version__``)."""

__version__ = "0.1.0"
