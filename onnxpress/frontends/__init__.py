"""Importers that turn models from other frameworks into checked ONNX (``frontends.torch``)."""
