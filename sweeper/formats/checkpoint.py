"""What a checkpoint holds: its kind, family, progress and metrics, from its pickle alone."""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from sweeper.errors import FileRefused
from sweeper.formats.records import _MAX_PICKLE_BYTES, Archive, read_archive, read_record
from sweeper.formats.unpickler import (
    InertObject,
    InertOrderedDict,
    NumpyArray,
    NumpyDtype,
    NumpyScalar,
    ParameterRef,
    StorageRef,
    TensorRef,
    _load_inert,
)

# ---------------------------------------------------------------------------------------------
# What a checkpoint holds.


class Kind(enum.Enum):
    FULL = "full training checkpoint"
    INFERENCE = "inference checkpoint"
    WEIGHTS = "bare weights"
    OTHER = "not a checkpoint"


class Mode(enum.Enum):
    INFERENCE = "inference"
    WEIGHTS = "weights"


MODEL_KEY = "model_state_dict"
# Keys that only resuming training needs; everything else is kept.  Matched anywhere in the key,
# case-insensitively: optimizer_state_dict, lr_scheduler, grad_scaler, cuda_rng_state, ...
_TRAINING_STATE = re.compile(r"optim|sched|scaler|rng|random_state", re.IGNORECASE)
_EPOCH_KEYS = ("epoch",)
_STEP_KEYS = ("global_step", "step", "iteration", "iter")


def is_training_state_key(key: object) -> bool:
    return isinstance(key, str) and bool(_TRAINING_STATE.search(key))


@dataclass(frozen=True)
class KeyUsage:
    """One top-level key: its role and the storage bytes first reached through it."""

    key: str
    role: Literal["model", "training-state", "metadata"]
    tensor_bytes: int
    tensors: int


@dataclass(frozen=True)
class Checkpoint:
    """What ``open_checkpoint`` learnt from a file's directory and pickle (no tensor data read)."""

    path: str
    file_size: int
    kind: Kind
    epoch: int | None
    step: int | None
    metrics: tuple[tuple[str, float], ...]
    archive: Archive = field(repr=False)
    root: object = field(repr=False, compare=False)
    # Numbers one level down (``{"metrics": {"val_acc": 0.9}}`` -> ``metrics.val_acc``), outside
    # training state: where keep_best looks when the top level holds no such name.
    inner_metrics: tuple[tuple[str, float], ...] = ()

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
    kind = _classify(root)
    epoch = step = None
    metrics: list[tuple[str, float]] = []
    if isinstance(root, dict):
        for key, value in root.items():
            number = _as_number(value)
            if number is None or not isinstance(key, str):
                continue
            if key in _EPOCH_KEYS and isinstance(number, int):
                epoch = number
            elif key in _STEP_KEYS and isinstance(number, int):
                step = number if step is None else step
            elif not isinstance(number, bool):
                metrics.append((key, float(number)))
    return Checkpoint(
        path,
        archive.file_size,
        kind,
        epoch,
        step,
        tuple(metrics),
        archive,
        root,
        _inner_metrics(root),
    )


def _inner_metrics(root: object) -> tuple[tuple[str, float], ...]:
    if not isinstance(root, dict):
        return ()
    found = []
    for key, value in root.items():
        if not isinstance(key, str) or key == MODEL_KEY or is_training_state_key(key):
            continue
        if not isinstance(value, dict) or isinstance(value, InertOrderedDict):
            continue
        for inner, item in value.items():
            number = _as_number(item)
            if isinstance(inner, str) and number is not None and not isinstance(number, bool):
                found.append((f"{key}.{inner}", float(number)))
    return tuple(found)


def _classify(root: object) -> Kind:
    if not isinstance(root, dict):
        return Kind.OTHER
    if MODEL_KEY in root:
        if any(is_training_state_key(k) for k in root):
            return Kind.FULL
        return Kind.INFERENCE
    if root and all(isinstance(v, TensorRef | ParameterRef) for v in root.values()):
        return Kind.WEIGHTS
    return Kind.OTHER


def _as_number(value: object) -> int | float | None:
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, NumpyScalar):
        return _numpy_scalar_value(value)
    return None


def _numpy_scalar_value(value: NumpyScalar) -> int | float | bool | None:
    dtype = value.dtype
    if not isinstance(dtype, NumpyDtype) or not dtype.args or not isinstance(dtype.args[0], str):
        return None
    code = dtype.args[0]
    data = value.data
    formats = {
        "f8": "d",
        "f4": "f",
        "f2": "e",
        "i8": "q",
        "i4": "i",
        "i2": "h",
        "i1": "b",
        "u8": "Q",
        "u4": "I",
        "u2": "H",
        "u1": "B",
        "b1": "?",
    }
    if code not in formats or not isinstance(data, bytes):
        return None
    fmt = "<" + formats[code]
    if len(data) != struct.calcsize(fmt):
        return None
    number: int | float | bool = struct.unpack(fmt, data)[0]
    return number


def _walk(value: object, seen: set[int] | None = None) -> Iterator[object]:
    """Every value reachable from ``value``, each object once (iterative: pickles can nest deep)."""
    seen = set() if seen is None else seen
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(item.keys())
            if isinstance(item, InertOrderedDict):
                stack.extend(item.attributes.values())
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif isinstance(item, TensorRef):
            stack.extend((item.storage, item.hooks, item.metadata))
        elif isinstance(item, ParameterRef):
            stack.extend((item.data, item.hooks, item.state))
        elif isinstance(item, InertObject):
            stack.append(item.state)
        elif isinstance(item, NumpyScalar | NumpyArray):
            stack.append(item.data if isinstance(item, NumpyScalar) else item.args)


def key_usage(checkpoint: Checkpoint) -> tuple[KeyUsage, ...]:
    """Each top-level key's role and the tensor bytes first reached through it (for inspect)."""
    root = checkpoint.root
    if not isinstance(root, dict):
        return ()
    seen: set[int] = set()
    usage = []
    for key, value in root.items():
        role: Literal["model", "training-state", "metadata"] = (
            "model"
            if key == MODEL_KEY
            else "training-state"
            if is_training_state_key(key)
            else "metadata"
        )
        items = list(_walk(value, seen))
        storage_bytes = sum(s.nbytes for s in items if isinstance(s, StorageRef))
        tensors = sum(1 for t in items if isinstance(t, TensorRef))
        usage.append(KeyUsage(str(key), role, storage_bytes, tensors))
    return tuple(usage)
