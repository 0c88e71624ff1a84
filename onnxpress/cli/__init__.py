"""The ``onnxpress`` command line: ``main.py`` holds the options and dispatches to one module
per command (``optimize.py``; ``inspect.py`` with ``passes``; ``distill.py``; ``compile.py``
with ``run``). The console script is ``onnxpress.cli.main:main``; ``python -m onnxpress.cli``
runs the same.

May import: anything in onnxpress (top layer); nothing imports it. Read first: ``main.py``.
"""
