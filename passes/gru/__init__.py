"""The GRU passes: ``fuse.py`` (fuse-gru: unrolled GRU cells -> one GRU op) and ``lower.py``
(lower-gru: a GRU op -> primitive ops per step), with the cell model they share
(``cell.py``), the graph matching (``graph.py``, ``probe.py``), node emission (``emit.py``,
``outputs.py``), the pairing of forward and reverse ops into bidirectional ones
(``pair.py``) and cells masked by sequence length (``mask.py``, ``lengths.py``), shared
with fuse-lstm.

May import: onnxpress.core, calibration, analysis; not the other lossy passes.
Read first: ``cell.py``, then ``fuse.py``.
"""
