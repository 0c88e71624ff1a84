"""Training with torch: knowledge distillation of a compressed model against the original
(``distill.py``, its loop and options), the ONNX -> torch module that trains and writes back
(``torch_convert.py``, ``torch_ops*.py``) and the torch -> ONNX import helper
(``frontend_torch.py``). torch is imported lazily where the rest of onnxpress may load it.

May import: onnxpress.core, calibration, analysis, passes; not backends (independent).
Read first: ``distill.py``.
"""
