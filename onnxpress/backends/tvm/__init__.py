"""The Apache TVM backend: ``onnxpress compile`` / ``onnxpress run`` and ``onnxpress.compile``.

Flow: ``prepare.py`` (static shapes, verified passes, coverage) -> ``build.py`` (Relax import
with the GRU/LSTM loop converters of ``rnn.py``/``gru.py``/``lstm.py``; int8 lowering in
``int8*.py``; fuse, schedules in ``schedule.py``/``tile_schedule.py``, build, export) ->
``verify.py`` (against onnxruntime) -> the folder and manifest of ``runtime.py``. Tuning:
``tune.py`` with its database ``tune_db.py`` and devices over ``rpc.py``; targets in
``targets.py``. TVM itself is imported lazily, inside functions.

May import: onnxpress.core, calibration, analysis, passes. Read first: ``backend.py``.
Importing the package sizes TVM's runtime thread pool to the physical cores (targets.py).
"""

from onnxpress.backends.tvm.targets import configure_threads

configure_threads()
