"""The core: IR, I/O, registry, pipeline, pass manager and verification.

Imports nothing else of onnxpress. Read ``manager`` first.
"""
