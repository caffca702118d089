"""What a checkpoint holds: its family, kind, progress and metrics, from its pickle alone.

The pickle is read by the inert unpickler; which layout family it is and what each top-level
key holds is decided by ``sweeper.formats.families``.
"""

from __future__ import annotations

import enum
import os
import struct
from dataclasses import dataclass, field

from sweeper.errors import FileRefused
from sweeper.formats import families
from sweeper.formats.family import Description, Kind, Role, ScalarReader
from sweeper.formats.records import (
    _MAX_PICKLE_BYTES,
    Archive,
    read_archive,
    read_record,
    record_data_offset,
)
from sweeper.formats.unpickler import (
    InertOrderedDict,
    StorageRef,
    TensorRef,
    _load_inert,
    as_number,
    walk_values,
)

__all__ = ["Checkpoint", "KeyUsage", "Kind", "Mode", "key_usage", "open_checkpoint"]


class Mode(enum.Enum):
    INFERENCE = "inference"
    WEIGHTS = "weights"


@dataclass(frozen=True)
class KeyUsage:
    """One top-level key: its role and the storage bytes first reached through it."""

    key: str
    role: Role
    tensor_bytes: int
    tensors: int


@dataclass(frozen=True)
class Checkpoint:
    """What ``open_checkpoint`` learnt from a file's directory and pickle (no tensor data read
    but the few bytes of a score a family keeps in a tensor)."""

    path: str
    file_size: int
    kind: Kind
    epoch: int | None
    step: int | None
    metrics: tuple[tuple[str, float], ...]
    archive: Archive = field(repr=False)
    root: object = field(repr=False, compare=False)
    # Numbers one level down (``{"metrics": {"val_acc": 0.9}}`` -> ``metrics.val_acc``), in
    # metadata: where keep_best looks when the top level holds no such name.
    inner_metrics: tuple[tuple[str, float], ...]
    # Its layout family's word on every top-level key.
    description: Description = field(repr=False, compare=False)

    @property
    def family(self) -> str:
        return self.description.family

    @property
    def progress(self) -> tuple[int, int] | None:
        """(epoch, step) as stored in the file; None when it stores neither."""
        if self.epoch is None and self.step is None:
            return None
        return (self.epoch if self.epoch is not None else -1, self.step or 0)


def open_checkpoint(fd: int, path: str) -> Checkpoint:
    """Classify an open file from its central directory and pickle alone."""
    archive = read_archive(fd, path)
    root, storages = _load_inert(
        read_record(fd, archive, "data.pkl", path, _MAX_PICKLE_BYTES), path
    )
    for storage in storages:
        record = archive.data_record(storage.key)
        if record is None:
            raise FileRefused(path, f"truncated archive: storage record data/{storage.key} missing")
        if record.size != storage.nbytes:
            raise FileRefused(
                path, f"malformed archive: record data/{storage.key} has the wrong size"
            )
    description = families.describe(root, _scalar_reader(fd, archive, path))
    progress = description.progress
    return Checkpoint(
        path,
        archive.file_size,
        description.kind,
        progress.epoch,
        progress.step,
        progress.metrics,
        archive,
        root,
        _inner_metrics(root, description),
        description,
    )


_SCALAR_FORMATS = {"float64": "d", "float32": "f", "float16": "e", "int64": "q", "int32": "i"}


def _scalar_reader(fd: int, archive: Archive, path: str) -> ScalarReader:
    """Reads the number in a one-element tensor of a typed storage (a few bytes, no CRC: a
    metric, never anything sweeper writes or deletes by)."""
    order = (
        ">" if "byteorder" in archive.records and archive.records["byteorder"].size == 3 else "<"
    )

    def read(tensor: TensorRef) -> float | None:
        storage_type = tensor.storage.storage_type
        code = _SCALAR_FORMATS.get(storage_type.dtype)
        if tensor.numel != 1 or code is None or tensor.dtype is not None:
            return None
        record = archive.data_record(tensor.storage.key)
        if record is None:
            return None
        start = (
            record_data_offset(fd, archive, record, path) + tensor.offset * storage_type.itemsize
        )
        data = os.pread(fd, storage_type.itemsize, start)
        if len(data) != storage_type.itemsize:
            return None
        number: float = struct.unpack(order + code, data)[0]
        return float(number)

    return read


def _inner_metrics(root: object, description: Description) -> tuple[tuple[str, float], ...]:
    if not isinstance(root, dict):
        return ()
    found = []
    for key, value in root.items():
        if not isinstance(key, str) or description.roles.get(key) != "metadata":
            continue
        if not isinstance(value, dict) or isinstance(value, InertOrderedDict):
            continue
        for inner, item in value.items():
            number = as_number(item)
            if isinstance(inner, str) and number is not None and not isinstance(number, bool):
                found.append((f"{key}.{inner}", float(number)))
    return tuple(found)


def key_usage(checkpoint: Checkpoint) -> tuple[KeyUsage, ...]:
    """Each top-level key's role and the tensor bytes first reached through it (for inspect)."""
    root = checkpoint.root
    if not isinstance(root, dict):
        return ()
    seen: set[int] = set()
    usage = []
    for key, value in root.items():
        role = checkpoint.description.roles.get(key, "metadata")
        items = list(walk_values(value, seen))
        storage_bytes = sum(s.nbytes for s in items if isinstance(s, StorageRef))
        tensors = sum(1 for t in items if isinstance(t, TensorRef))
        usage.append(KeyUsage(str(key), role, storage_bytes, tensors))
    return tuple(usage)
