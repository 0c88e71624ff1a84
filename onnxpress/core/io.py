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
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

from onnxpress.core.errors import InvalidModelError, ModelLoadError, ModelSaveError
from onnxpress.core.ir import ensure_acyclic_sorted

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom under protobuf's 2 GB limit for the graph structure itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            yield tensor


def check_external_data(model: onnx.ModelProto, base_dir: Path, source: Path) -> None:
    """Refuse external-data references that leave ``base_dir`` or point outside their file."""
    root = base_dir.resolve()
    for tensor in _external_tensors(model):
        info = ExternalDataInfo(tensor)
        where = f"{source}: tensor '{tensor.name}'"
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
        offset = int(info.offset or 0)
        if offset < 0 or offset > size:
            raise ModelLoadError(f"{where}: external data offset {offset} is outside '{location}'")
        length = info.length
        if length is not None and (int(length) < 0 or offset + int(length) > size):
            raise ModelLoadError(
                f"{where}: external data [{offset}, {offset + int(length)}) is outside "
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
    try:
        onnx.checker.check_model(loaded, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InvalidModelError(f"{source}: fails the ONNX checker: {first}") from None
    return loaded, source


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes, counting tensors whatever their storage."""
    return int(model.ByteSize())


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


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
    if protect is not None and same_file(out, protect):
        raise ModelSaveError(f"{out}: output path is the input model (use --in-place to overwrite)")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ModelSaveError(f"{out}: folder '{folder}' does not exist")
    size = model_size(model)
    use_external = external_data if external_data is not None else size > EXTERNAL_DATA_THRESHOLD
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
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
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        with contextlib.suppress(OSError):
            tmp_data.unlink()
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
