"""Calibration data: batches of model inputs, from .npz files or a Python iterable.

A ``.npz`` file holds one batch keyed by the model's input names; a folder holds one such
file per batch. Files are read with ``allow_pickle=False``. ``validate`` checks names,
dtypes, ranks, static dimensions and finiteness against the model before any pass runs.
Folders are re-read batch by batch, so large calibration sets are never held in memory.
"""

from __future__ import annotations

import hashlib
import logging
import math
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from numpy.lib import format as npy_format
from onnx import helper

from onnxpress.core.errors import CalibrationError

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


MAX_ARRAY_BYTES = 4 << 30  # one calibration array larger than this is refused unread


def check_npz_headers(file: Path) -> None:
    """Read each member's .npy header (numpy.lib.format) before any array is loaded: refuse
    object dtypes (pickles), empty arrays, and shapes the file cannot hold or that are too
    large to allocate."""
    try:
        with zipfile.ZipFile(file) as archive:
            for member in archive.infolist():
                name = member.filename.removesuffix(".npy")
                with archive.open(member) as fh:
                    version = npy_format.read_magic(fh)
                    read_header = (
                        npy_format.read_array_header_1_0
                        if version == (1, 0)
                        else npy_format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(fh)
                if dtype.hasobject:
                    raise CalibrationError(f"{file}: contains pickled objects; refusing to load")
                count = math.prod(shape)
                if count == 0:
                    raise CalibrationError(f"{file}: array '{name}' is empty (shape {list(shape)})")
                size = count * dtype.itemsize
                if size > MAX_ARRAY_BYTES or size > member.file_size:
                    raise CalibrationError(
                        f"{file}: array '{name}' declares shape {list(shape)} ({size:,} bytes) "
                        f"but the file holds {member.file_size:,} bytes (limit {MAX_ARRAY_BYTES:,})"
                    )
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, RuntimeError) as exc:
        raise CalibrationError(f"{file}: not a readable .npz file ({exc})") from None


def read_npz(file: Path) -> Batch:
    """Every array of an .npz file, after its headers were checked (``check_npz_headers``)."""
    if not file.is_file():
        raise CalibrationError(f"{file}: no such file")
    if not zipfile.is_zipfile(file):
        # np.load would try to unpickle a non-archive; never get that far.
        raise CalibrationError(f"{file}: not a readable .npz file (not a zip archive)")
    check_npz_headers(file)
    try:
        with np.load(file, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise CalibrationError(f"{file}: contains pickled objects; refusing to load") from None
        raise CalibrationError(f"{file}: not a readable .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CalibrationError(f"{file}: not a readable .npz file ({exc})") from None


_read_npz = read_npz


class CalibrationData:
    """Re-iterable batches of named input arrays."""

    def __init__(self, source: Callable[[], Iterator[Batch]], size: int, origin: str) -> None:
        self._source = source
        self._size = size
        self.origin = origin
        self._fingerprints: dict[int | None, str] = {}

    @classmethod
    def from_path(cls, path: str | Path) -> CalibrationData:
        root = Path(path)
        if root.is_dir():
            files = sorted(p for p in root.iterdir() if p.suffix == ".npz")
            if not files:
                raise CalibrationError(f"{root}: folder holds no .npz files")
        elif root.is_file():
            files = [root]
        else:
            raise CalibrationError(f"{root}: no such file or folder")
        for f in files:
            check_npz_headers(f)  # fail early on pickles, corrupt files or huge arrays

        def source() -> Iterator[Batch]:
            for f in files:
                yield _read_npz(f)

        return cls(source, len(files), str(root))

    @classmethod
    def from_batches(cls, batches: Iterable[Mapping[str, np.ndarray]]) -> CalibrationData:
        stored = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
        if not stored:
            raise CalibrationError("calibration iterable yielded no batches")
        return cls(lambda: iter(stored), len(stored), "<iterable>")

    @classmethod
    def coerce(
        cls, value: CalibrationData | str | Path | Iterable[Mapping[str, np.ndarray]] | None
    ) -> CalibrationData | None:
        if value is None or isinstance(value, CalibrationData):
            return value
        if isinstance(value, (str, Path)):
            return cls.from_path(value)
        return cls.from_batches(value)

    def __len__(self) -> int:
        return self._size

    def batches(self, limit: int | None = None) -> Iterator[Batch]:
        for i, batch in enumerate(self._source()):
            if limit is not None and i >= limit:
                return
            yield batch

    def fingerprint(self, limit: int | None = None) -> str:
        """A digest of the first ``limit`` batches' names, dtypes, shapes and bytes (computed
        once): equal digests, equal data, so statistics measured on it may be reused."""
        if limit not in self._fingerprints:
            digest = hashlib.sha256()
            for batch in self.batches(limit):
                for name in sorted(batch):
                    array = np.ascontiguousarray(batch[name])
                    digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
                    digest.update(array.data)
            self._fingerprints[limit] = digest.hexdigest()
        return self._fingerprints[limit]

    def fitted_to(self, model: onnx.ModelProto) -> CalibrationData:
        """These batches, split along axis 0 where the model's inputs have a static batch
        size that divides the arrays' first axis (a 1000-sample .npz for a batch-1 model
        becomes 1000 batches); unchanged otherwise. Checked again by ``validate``."""
        initializers = {t.name for t in model.graph.initializer}
        sizes = {}
        for info in model.graph.input:
            dims = info.type.tensor_type.shape.dim if info.name not in initializers else []
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                sizes[info.name] = dims[0].dim_value
        if not sizes:
            return self

        def pieces(batch: Batch) -> int:
            counts = {
                name: len(array) // sizes[name]
                for name, array in batch.items()
                if name in sizes and array.ndim and len(array) % sizes[name] == 0
            }
            return (
                counts.popitem()[1]
                if len(counts) == len(sizes) and len(set(counts.values())) == 1
                else 1
            )

        def source() -> Iterator[Batch]:
            for batch in self._source():
                count = pieces(batch)
                for index in range(count):
                    yield {
                        name: array[index * sizes[name] : (index + 1) * sizes[name]]
                        if name in sizes and count > 1
                        else array
                        for name, array in batch.items()
                    }

        total = sum(pieces(batch) for batch in self._source())
        if total == self._size:
            return self
        logger.info("calibration %s: split into %d batches of the model's size", self.origin, total)
        return CalibrationData(source, total, self.origin)

    def split(self, held_out: int) -> tuple[CalibrationData, CalibrationData]:
        """(the first len - held_out batches, the last held_out batches), as lazy views."""
        if not 0 < held_out < self._size:
            raise CalibrationError(
                f"{self.origin}: cannot hold out {held_out} of {self._size} calibration batches"
            )
        keep = self._size - held_out

        def head() -> Iterator[Batch]:
            for index, batch in enumerate(self._source()):
                if index >= keep:
                    return
                yield batch

        def tail() -> Iterator[Batch]:
            for index, batch in enumerate(self._source()):
                if index >= keep:
                    yield batch

        return (
            CalibrationData(head, keep, self.origin),
            CalibrationData(tail, held_out, f"{self.origin} (held out)"),
        )

    def validate(self, model: onnx.ModelProto) -> None:
        """Raise CalibrationError if a batch does not fit the model's inputs."""
        initializers = {t.name for t in model.graph.initializer}
        inputs = [i for i in model.graph.input if i.name not in initializers]
        expected = {i.name: i for i in inputs}
        for index, batch in enumerate(self.batches()):
            where = f"{self.origin}: batch {index}"
            missing = sorted(set(expected) - set(batch))
            extra = sorted(set(batch) - set(expected))
            if missing:
                raise CalibrationError(f"{where}: missing model input(s) {missing}")
            if extra:
                raise CalibrationError(
                    f"{where}: unknown input name(s) {extra}; model inputs are {sorted(expected)}"
                )
            for name, info in expected.items():
                _check_array(where, name, batch[name], info)


def _check_array(where: str, name: str, array: np.ndarray, info: onnx.ValueInfoProto) -> None:
    ttype = info.type.tensor_type
    want = helper.tensor_dtype_to_np_dtype(ttype.elem_type) if ttype.elem_type else None
    if want is not None and array.dtype != want:
        raise CalibrationError(
            f"{where}: input '{name}' has dtype {array.dtype}, model expects {want}"
        )
    if array.dtype == object:
        raise CalibrationError(f"{where}: input '{name}' is an object array")
    if ttype.HasField("shape"):
        dims = ttype.shape.dim
        if len(dims) != array.ndim:
            raise CalibrationError(
                f"{where}: input '{name}' has rank {array.ndim} {list(array.shape)}, "
                f"model expects rank {len(dims)}"
            )
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value != array.shape[axis]:
                raise CalibrationError(
                    f"{where}: input '{name}' has shape {list(array.shape)}, model expects "
                    f"{[d.dim_value if d.HasField('dim_value') else (d.dim_param or '?') for d in dims]}"
                )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise CalibrationError(f"{where}: input '{name}' contains NaN or Inf")
