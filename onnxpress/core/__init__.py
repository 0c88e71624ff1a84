"""The compiler's core: the model IR, loading and saving, passes and their registry, pipelines,
the pass manager and its verifier, statistics and the report data.

May import: nothing else in onnxpress (it is the bottom layer; see the import contracts in
pyproject.toml). Read first: ``manager.py`` (a pipeline run: each pass, then ``verify.py``),
then ``pass_base.py`` (what a pass is) and ``ir.py`` (the graph a pass rewrites).
The hardware targets (``targets.py``) and the emulation of their int8 kernels
(``int8_layers.py``, ``int8_emulation.py``, ``emulated_runner.py``) are verification's too.
``calibration_data.py`` and ``report.py`` live here because the pass manager takes the one
and builds the other.
"""
