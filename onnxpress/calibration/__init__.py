"""Calibration: observers that turn streamed activations into ranges (min-max, percentile,
entropy, MSE) and the streaming of a model's intermediate tensors over calibration batches.

May import: onnxpress.core (the batches themselves are ``core.calibration_data``).
Read first: ``activations.py`` (running a model with extra outputs, batch by batch), then
``observers.py``.
"""
