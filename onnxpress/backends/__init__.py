"""Backends that compile an optimized ONNX model for a device. Today: Apache TVM (``tvm/``).

May import: onnxpress.core, calibration, analysis and passes (a backend prepares a model
with verified passes). Never imported by them. Read first: ``tvm/backend.py``.
"""
