"""Load and save ONNX models safely.

Loading reads the protobuf without external data, checks every external-data location
(relative, inside the model's folder after resolving symlinks, offset and length inside the
file) and only then reads the tensors. Saving writes to a temporary file in the destination
folder and renames it, so a failed or interrupted save leaves nothing behind; models over
2 GB are written with their tensors in one external-data file next to the output.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from onnxpress.core.errors import (
    InvalidModelError,
    ModelLoadError,
    ModelSaveError,
    OutputConflictError,
)
from onnxpress.core.ir import ensure_acyclic_sorted
from onnxpress.core.model_checks import check_model
from onnxpress.core.sizing import EXTERNAL_DATA_THRESHOLD, serialized_size

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            yield tensor


def check_external_data(model: onnx.ModelProto, base_dir: Path, source: Path) -> None:
    """Refuse external-data references that leave ``base_dir`` or point outside their file."""
    root = base_dir.resolve()
    for tensor in _external_tensors(model):
        where = f"{source}: tensor '{tensor.name}'"
        try:
            info = ExternalDataInfo(tensor)
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{where}: bad external data entry ({exc})") from None
        location = info.location or ""
        if not location:
            raise ModelLoadError(f"{where}: external data has no location")
        rel = Path(location)
        if rel.is_absolute() or location.startswith(("/", "\\")) or ":" in location:
            raise ModelLoadError(f"{where}: external data path '{location}' is absolute")
        if ".." in rel.parts:
            raise ModelLoadError(
                f"{where}: external data path '{location}' leaves the model folder"
            )
        target = (root / rel).resolve()
        if target != root and root not in target.parents:
            raise ModelLoadError(
                f"{where}: external data path '{location}' resolves outside the model folder"
            )
        if not target.is_file():
            raise ModelLoadError(f"{where}: external data file '{location}' not found")
        size = target.stat().st_size
        try:
            offset = int(info.offset or 0)
            length = None if info.length is None else int(info.length)
        except (TypeError, ValueError):
            raise ModelLoadError(
                f"{where}: external data offset or length is not a number"
            ) from None

        if offset < 0 or offset > size:
            raise ModelLoadError(f"{where}: external data offset {offset} is outside '{location}'")
        if length is not None and (length < 0 or offset + length > size):
            raise ModelLoadError(
                f"{where}: external data [{offset}, {offset + length}) is outside "
                f"'{location}' ({size} bytes)"
            )


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model, validating external data before loading it."""
    file = Path(path)
    if not file.exists():
        raise ModelLoadError(f"{file}: no such file")
    if not file.is_file():
        raise ModelLoadError(f"{file}: not a file")
    if file.stat().st_size == 0:
        raise ModelLoadError(f"{file}: empty file")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{file}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(f"{file}: not an ONNX model (no graph or IR version)")
    if not model.opset_import:
        raise ModelLoadError(f"{file}: not an ONNX model (no opset import)")
    check_external_data(model, file.parent, file)
    if any(True for _ in _external_tensors(model)):
        try:
            onnx.load_external_data_for_model(model, str(file.parent))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{file}: cannot read external data: {exc}") from None
    return model


def prepare_model(model: onnx.ModelProto | str | os.PathLike[str]) -> tuple[onnx.ModelProto, str]:
    """Load (if a path) and check the input model; returns it with a name for messages."""
    if isinstance(model, onnx.ModelProto):
        source = "<model>"
        loaded = onnx.ModelProto()
        loaded.CopyFrom(model)
    else:
        source = str(model)
        loaded = load_model(model)
    ensure_acyclic_sorted(loaded, source)
    check_model(loaded, source)
    try:
        onnx.checker.check_model(loaded, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InvalidModelError(
            f"{source}: fails the ONNX checker: {first}{_checker_hint(loaded, first)}"
        ) from None
    return loaded, source


PER_AXIS_QDQ_OPSET = 13


def _checker_hint(model: onnx.ModelProto, message: str) -> str:
    """What to do about a known checker failure, or ''. onnxruntime's quantize_static with
    per_channel=True writes per-axis (De)QuantizeLinear into models below opset 13, which
    neither the checker nor onnxruntime accepts."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    per_axis = "attribute: axis for operator" in message and "uantizeLinear" in message
    if per_axis and opset < PER_AXIS_QDQ_OPSET:
        return (
            f" (per-channel QuantizeLinear/DequantizeLinear need opset 13, the model imports"
            f" {opset}; onnxruntime refuses it too: quantize a model exported at opset 13+)"
        )
    return ""


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: the same inode (hard links, symlinks), or the same
    resolved path when one does not exist yet."""
    ia, ib = file_identity(a), file_identity(b)
    if ia is not None and ib is not None:
        return ia == ib
    return Path(a).resolve() == Path(b).resolve()


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(device, inode) of the file ``path`` leads to (symlinks followed), None if none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def model_files(path: str | os.PathLike[str], label: str = "input model") -> list[tuple[str, Path]]:
    """(label, path) of the model file and of the external-data files it names."""
    file = Path(path)
    files = [(label, file)]
    if not file.is_file():
        return files
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception:  # unreadable models are reported when they are loaded
        return files
    for tensor in _external_tensors(model):
        with contextlib.suppress(OSError, ValueError, TypeError):
            location = ExternalDataInfo(tensor).location
            if location and (file.parent / location).is_file():
                files.append((f"{label}'s external data", file.parent / location))
    return files


def check_outputs(
    outputs: Mapping[str, str | os.PathLike[str]],
    inputs: Iterable[tuple[str, str | os.PathLike[str]]],
    allow: Iterable[tuple[str, str]] = (),
) -> None:
    """Refuse before any work an output that is a folder or a special file, whose folder is
    missing or not writable, or that is the same file (inode) as an input or another output.

    ``outputs`` maps a label ("output", "report") to a path; ``inputs`` are (label, path);
    ``allow`` lists (output label, input label) pairs that may coincide (``--in-place``).
    """
    known: dict[tuple[int, int], tuple[str, str]] = {}
    for label, path in inputs:
        identity = file_identity(path)
        if identity is not None:
            known.setdefault(identity, (label, str(path)))
    allowed = set(allow)
    for label, path in outputs.items():
        out = Path(path)
        identity = file_identity(out)
        if identity is not None:
            if out.is_dir():
                raise ModelSaveError(f"{out}: the {label} path is a folder")
            if not out.is_file():
                raise ModelSaveError(f"{out}: the {label} path is not a regular file")
            taken = known.get(identity)
            if taken is not None and (label, taken[0]) not in allowed:
                hint = " (use --in-place to overwrite)" if taken[0] == "input model" else ""
                raise OutputConflictError(
                    f"{out}: the {label} would overwrite the {taken[0]} '{taken[1]}'{hint}"
                )
        key = identity or out.resolve()
        for other, other_path in outputs.items():
            if other != label and (file_identity(other_path) or Path(other_path).resolve()) == key:
                raise OutputConflictError(f"{out}: the {label} and the {other} are the same file")
        folder = out.parent if str(out.parent) else Path(".")
        if not folder.is_dir():
            raise ModelSaveError(f"{out}: folder '{folder}' does not exist")
        _probe_writable(out, folder)


def _probe_writable(out: Path, folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise ModelSaveError(f"{out}: cannot write in '{folder}': {exc.strerror}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def new_file_mode() -> int:
    """The mode the umask gives a new file (0o666 & ~umask)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    protect: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` atomically to ``path``.

    ``protect`` names a file that must not be overwritten (the input model). With
    ``external_data=None`` tensors go to ``<name>.data`` only when the model would not fit
    in one protobuf.
    """
    out = Path(path)
    if protect is not None:
        check_outputs({"output": out}, model_files(protect))
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ModelSaveError(f"{out}: folder '{folder}' does not exist")
    if out.is_dir():
        raise ModelSaveError(f"{out}: the output path is a folder")
    size = serialized_size(model)
    use_external = external_data if external_data is not None else size > EXTERNAL_DATA_THRESHOLD
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise ModelSaveError(f"{out}: cannot write in '{folder}': {exc.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    data_name = f"{out.name}.data"
    tmp_data = folder / f".{data_name}.tmp{os.getpid()}"
    try:
        if use_external:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)
            # Write the tensors under the final data name; the file itself is renamed below.
            onnx.save_model(
                to_write,
                str(tmp),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=tmp_data.name,
                size_threshold=1024,
            )
            if tmp_data.exists():
                _rename_external_location(tmp, tmp_data.name, data_name)
                os.replace(tmp_data, folder / data_name)
        else:
            if size > PROTOBUF_LIMIT:
                raise ModelSaveError(f"{out}: model is {size} bytes; save it with external data")
            with open(tmp, "wb") as fh:
                fh.write(model.SerializeToString())
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 would keep other users out
        os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        with contextlib.suppress(OSError):
            tmp_data.unlink()
        if isinstance(exc, OSError):
            raise ModelSaveError(f"{out}: cannot write: {exc.strerror or exc}") from None
        raise
    logger.info("wrote %s (%d bytes%s)", out, size, ", external data" if use_external else "")
    return out


def _rename_external_location(model_file: Path, old: str, new: str) -> None:
    model = onnx.load(str(model_file), load_external_data=False)
    for tensor in _external_tensors(model):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    with open(model_file, "wb") as fh:
        fh.write(model.SerializeToString())
