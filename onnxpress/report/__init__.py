"""What the CLI shows: rich tables of a run's report and of a model, progress bars for the
long loops (passes, tuning, distillation), plain text when the output is not a terminal.
The report's data and its JSON schema are ``onnxpress.core.report`` (the pass manager builds
it); this package only renders.

May import: everything below it (core ... backends, train). Read first: ``render.py``, then
``progress.py``.
"""
