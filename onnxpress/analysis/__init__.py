"""Analyses that passes share: the channel dependency groups of structured pruning
(``channels/``) and the data-aware layer refit (``refit.py``: streamed moments, whitened SVD,
least-squares refit against the original model), and ``saturation.py``: which int8 layers
saturate on targets that sum u8 x s8 pairs in int16.

May import: onnxpress.core and onnxpress.calibration. ``channels`` and ``refit`` are
independent of each other. Read first: ``channels/groups.py``, then ``refit.py``.
"""
