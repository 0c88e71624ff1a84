"""What each command reads and writes, checked before any work: no output may be an input
(the model, its external data, calibration data, a recipe, a plugin) or another output, by
inode, so hard links and symlinks count; an output must be a writable regular-file path.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path

from onnxpress.core.io import check_outputs, model_files

Named = tuple[str, str | Path]


def data_files(path: str | None, label: str) -> list[Named]:
    """An .npz file, or the .npz files of a folder."""
    if not path:
        return []
    root = Path(path)
    if root.is_dir():
        return [(label, f) for f in sorted(root.iterdir()) if f.suffix == ".npz"]
    return [(label, root)]


def plugin_files(args: argparse.Namespace) -> list[Named]:
    return [("plugin", p) for p in [*args.plugin, *getattr(args, "plugin_sub", [])]]


def guard(
    outputs: Mapping[str, str | Path | None],
    inputs: Iterable[Named],
    *,
    in_place: bool = False,
) -> None:
    """Refuse (one line) outputs that are inputs or each other; ``in_place`` lets the
    output replace the input model file itself (never its external data)."""
    chosen = {label: path for label, path in outputs.items() if path}
    allow = [("output", "input model")] if in_place else []
    check_outputs(chosen, inputs, allow)


def optimize_paths(args: argparse.Namespace, output: Path, calibration: str | None) -> None:
    inputs = [
        *model_files(args.model),
        *data_files(calibration, "calibration data"),
        *([("recipe", args.recipe)] if args.recipe else []),
        *plugin_files(args),
    ]
    guard(
        {"output": output, "output's external data": _data_of(output), "report": args.report},
        inputs,
        in_place=args.in_place,
    )


def _data_of(output: Path) -> Path:
    """Where a model too large for one protobuf is given its tensors (``core.io``)."""
    return output.with_name(f"{output.name}.data")


def distill_paths(args: argparse.Namespace, output: Path) -> None:
    inputs = [
        *model_files(args.model),
        *model_files(args.teacher, "teacher model"),
        *data_files(args.data, "data"),
        *data_files(args.labels, "labels"),
        *plugin_files(args),
    ]
    guard(
        {"output": output, "output's external data": _data_of(output)},
        inputs,
        in_place=args.in_place,
    )


def compile_paths(args: argparse.Namespace, library_names: Iterable[str]) -> None:
    """The files compile writes into its output folder must not be any input."""
    folder = Path(args.output)
    outputs = {f"output '{name}'": folder / name for name in library_names}
    inputs = [*model_files(args.model), *plugin_files(args)]
    if folder.exists() and not folder.is_dir():
        from onnxpress.core.errors import ModelSaveError

        raise ModelSaveError(f"{folder}: the output folder exists and is not a folder")
    if folder.is_dir():
        guard(outputs, inputs)


def run_paths(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    inputs: list[Named] = [("inputs", args.inputs), *plugin_files(args)]
    if folder.is_dir():
        inputs += [("compiled folder's file", f) for f in folder.iterdir() if f.is_file()]
    if args.verify:
        inputs += model_files(args.verify, "reference model")
    guard({"output": args.output}, inputs)
