"""Analyses that passes share: the channel dependency groups of structured pruning
(``channels/``) and the data-aware layer refit (``refit.py``: streamed moments, whitened SVD,
least-squares refit against the original model).

May import: onnxpress.core and onnxpress.calibration. ``channels`` and ``refit`` are
independent of each other. Read first: ``channels/groups.py``, then ``refit.py``.
"""
