"""``python -m onnxpress.cli``: the same as the ``onnxpress`` command."""

from onnxpress.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
