"""Analyses of a model that passes and reports read: channel groups, refits, int8 saturation.

May import onnxpress.core and onnxpress.calibration. Read ``saturation`` for int8 targets.
"""
