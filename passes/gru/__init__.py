"""The GRU passes: ``fuse.py`` (fuse-gru: unrolled GRU cells -> one GRU op) and ``lower.py``
(lower-gru: a GRU op -> primitive ops per step), with the cell model they share
(``cell.py``), the graph matching (``graph.py``, ``probe.py``) and node emission (``emit.py``).

May import: onnxpress.core, calibration, analysis; not the other lossy passes.
Read first: ``cell.py``, then ``fuse.py``.
"""
