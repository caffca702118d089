"""The byte layout of torch zip checkpoints: the only module that parses zip headers or pickles.

A ``torch.save`` file is an uncompressed zip archive.  ``<prefix>/data.pkl`` is a protocol-2
pickle of the saved object in which every tensor storage is a *persistent id*
``("storage", torch.FloatStorage, "7", "cuda:0", numel)`` pointing at the record
``<prefix>/data/7``: raw little-endian element bytes, stored, 64-byte aligned, with a CRC-32.

sweeper never lets torch (or anything else) execute that pickle.  ``_InertUnpickler`` resolves
every global through an explicit allowlist to an *inert* stand-in (a tensor becomes a
:class:`TensorRef`, an OmegaConf ``DictConfig`` an :class:`InertObject` holding its state);
anything not on the list is refused with :class:`~sweeper.errors.UnsafePickle` naming it.
Nothing the file says is ever called.  Extraction then writes a fresh pickle of the kept
subtree with :class:`_PickleWriter` and copies the referenced storage records byte for byte,
so no tensor is ever deserialised and ``import torch`` is never needed.
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import functools
import io
import itertools
import json
import os
import pickle
import queue
import re
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sweeper.errors import FileRefused, UnsafePickle

_T = TypeVar("_T")

# ---------------------------------------------------------------------------------------------
# Zip structures (APPNOTE.TXT).  Only what torch writes: stored records, optional zip64.

_LOCAL_SIG = b"PK\x03\x04"
_CENTRAL_SIG = b"PK\x01\x02"
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_DESCRIPTOR_SIG = b"PK\x07\x08"
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_U32 = 0xFFFFFFFF
_U16 = 0xFFFF
_ALIGNMENT = 64  # torch's storage alignment: data of every record starts on a 64-byte boundary
_MAX_COMMENT = 0xFFFF
# Bounds on what a file may make sweeper read into memory; real checkpoints are far below both.
_MAX_PICKLE_BYTES = 256 * 1024 * 1024
_MAX_DIRECTORY_BYTES = 64 * 1024 * 1024
_MAX_CONFIG_NODES = 1_000_000
_MAX_FINGERPRINT_ITEMS = 20_000_000
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Record:
    """One entry of the central directory, named relative to the archive's top folder."""

    name: str
    header_offset: int
    size: int
    crc32: int


@dataclass(frozen=True)
class Archive:
    """The central directory of a torch zip file: what is where, without reading any data."""

    file_size: int
    prefix: str
    records: Mapping[str, Record]
    central_offset: int

    def data_record(self, key: str) -> Record | None:
        return self.records.get(f"data/{key}")


def _pread_exact(fd: int, length: int, offset: int, path: str, what: str) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise FileRefused(path, f"truncated archive: {what} runs past the end of the file")
    return data


def read_archive(fd: int, path: str) -> Archive:
    """Parse the end records and central directory of the open file ``fd``.

    Reads only the file's tail.  A file whose end-of-central-directory record is missing was
    not finished by its writer (torch writes the directory last), so it is reported as
    truncated; records that overlap, point past the directory, are compressed or encrypted,
    or do not share one top folder make the archive malformed.
    """
    size = os.fstat(fd).st_size
    head = os.pread(fd, len(_LEGACY_MAGIC), 0)
    if head.startswith(_LEGACY_MAGIC):
        raise FileRefused(
            path,
            "legacy (pre-zip) torch format is not supported: re-save it with torch >= 1.6",
        )
    if not head.startswith(_LOCAL_SIG):
        raise FileRefused(path, "not a torch checkpoint: not a zip archive")
    tail_len = min(size, _EOCD.size + _MAX_COMMENT + _ZIP64_LOCATOR.size)
    tail = os.pread(fd, tail_len, size - tail_len)
    eocd_at = tail.rfind(_EOCD_SIG, 0, max(0, len(tail) - _EOCD.size + len(_EOCD_SIG)))
    if eocd_at < 0:
        raise FileRefused(path, "truncated archive: no end-of-central-directory record")
    _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len = _EOCD.unpack_from(
        tail, eocd_at
    )
    eocd_pos = size - tail_len + eocd_at
    if eocd_pos + _EOCD.size + comment_len != size:
        raise FileRefused(path, "malformed archive: data after the end-of-central-directory record")
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        raise FileRefused(path, "malformed archive: multi-disk archives are not supported")
    directory_end = eocd_pos
    if _U16 in (n_total,) or _U32 in (cd_size, cd_offset):
        loc_pos = eocd_pos - _ZIP64_LOCATOR.size
        if loc_pos < 0:
            raise FileRefused(path, "malformed archive: zip64 locator missing")
        sig, _, z64_pos, _ = _ZIP64_LOCATOR.unpack(
            _pread_exact(fd, _ZIP64_LOCATOR.size, loc_pos, path, "zip64 locator")
        )
        if sig != _ZIP64_LOCATOR_SIG or z64_pos + _ZIP64_EOCD.size > loc_pos:
            raise FileRefused(path, "malformed archive: bad zip64 locator")
        z64 = _ZIP64_EOCD.unpack(
            _pread_exact(fd, _ZIP64_EOCD.size, z64_pos, path, "zip64 end record")
        )
        if z64[0] != _ZIP64_EOCD_SIG:
            raise FileRefused(path, "malformed archive: bad zip64 end-of-central-directory record")
        n_total, cd_size, cd_offset = z64[7], z64[8], z64[9]
        directory_end = z64_pos
    elif eocd_pos >= _ZIP64_LOCATOR.size:
        # torch (miniz) always writes zip64 end records; the classic fields then still fit.
        loc = os.pread(fd, _ZIP64_LOCATOR.size, eocd_pos - _ZIP64_LOCATOR.size)
        if loc[:4] == _ZIP64_LOCATOR_SIG:
            directory_end = _ZIP64_LOCATOR.unpack(loc)[2]
    if cd_offset + cd_size > directory_end or directory_end > size:
        raise FileRefused(path, "malformed archive: central directory out of bounds")
    if cd_size > _MAX_DIRECTORY_BYTES:
        raise FileRefused(path, "refused: central directory is implausibly large")
    directory = _pread_exact(fd, cd_size, cd_offset, path, "central directory")
    records = _parse_central_directory(directory, n_total, cd_offset, path)
    return Archive(size, records[0], records[1], cd_offset)


def _parse_central_directory(
    directory: bytes, count: int, cd_offset: int, path: str
) -> tuple[str, dict[str, Record]]:
    records: dict[str, Record] = {}
    prefix: str | None = None
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(directory):
            raise FileRefused(path, "malformed archive: central directory is short")
        fields = _CENTRAL.unpack_from(directory, pos)
        sig, flags, method, crc, csize, usize = (
            fields[0],
            fields[3],
            fields[4],
            fields[7],
            fields[8],
            fields[9],
        )
        name_len, extra_len, comment_len, offset = fields[10], fields[11], fields[12], fields[16]
        if sig != _CENTRAL_SIG:
            raise FileRefused(path, "malformed archive: bad central directory entry")
        start = pos + _CENTRAL.size
        raw_name = directory[start : start + name_len]
        extra = directory[start + name_len : start + name_len + extra_len]
        pos = start + name_len + extra_len + comment_len
        if pos > len(directory):
            raise FileRefused(path, "malformed archive: central directory is short")
        if flags & 0x1:
            raise FileRefused(path, "malformed archive: encrypted records are not supported")
        if method != 0 or (csize != usize and _U32 not in (csize, usize)):
            raise FileRefused(path, "not a torch checkpoint: compressed zip records")
        usize, offset = _apply_zip64_extra(extra, usize, csize, offset, path)
        name = raw_name.decode("utf-8", "replace")
        top, sep, rest = name.partition("/")
        if not sep or not rest:
            raise FileRefused(path, f"not a torch checkpoint: record {name!r} outside a top folder")
        if prefix is None:
            prefix = top
        elif top != prefix:
            raise FileRefused(path, "not a torch checkpoint: records under several top folders")
        if rest in records:
            raise FileRefused(path, f"malformed archive: duplicate record {name!r}")
        records[rest] = Record(rest, offset, usize, crc)
    if prefix is None or "data.pkl" not in records:
        raise FileRefused(path, "not a torch checkpoint: no data.pkl record")
    ordered = sorted(records.values(), key=lambda r: r.header_offset)
    for here, after in zip(ordered, [*ordered[1:], None], strict=True):
        limit = after.header_offset if after is not None else cd_offset
        if here.header_offset + _LOCAL.size + len(prefix) + 1 + len(here.name) + here.size > limit:
            raise FileRefused(path, f"malformed archive: record {here.name!r} overlaps the next")
    return prefix, records


def _apply_zip64_extra(
    extra: bytes, usize: int, csize: int, offset: int, path: str
) -> tuple[int, int]:
    """Sizes and offset that overflowed 32 bits live, in this order, in the zip64 extra field."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        if tag == 0x0001:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, pos + 4))
            try:
                if usize == _U32:
                    usize = values.pop(0)
                if csize == _U32:
                    values.pop(0)
                if offset == _U32:
                    offset = values.pop(0)
            except IndexError:
                raise FileRefused(path, "malformed archive: zip64 extra field is short") from None
            return usize, offset
        pos += 4 + length
    if usize == _U32 or offset == _U32:
        raise FileRefused(path, "malformed archive: zip64 sizes missing")
    return usize, offset


def record_data_offset(fd: int, archive: Archive, record: Record, path: str) -> int:
    """Where ``record``'s bytes start, after checking its local header matches the directory."""

    def read(length: int, offset: int, what: str) -> bytes:
        return _pread_exact(fd, length, offset, path, what)

    return _data_offset(read, archive, record, path)


def _data_offset(
    read: Callable[[int, int, str], bytes], archive: Archive, record: Record, path: str
) -> int:
    header = read(_LOCAL.size, record.header_offset, "local header")
    fields = _LOCAL.unpack(header)
    if fields[0] != _LOCAL_SIG:
        raise FileRefused(path, f"malformed archive: bad local header for {record.name!r}")
    name_len: int = fields[9]
    extra_len: int = fields[10]
    full_name = f"{archive.prefix}/{record.name}".encode()
    stored = read(name_len, record.header_offset + _LOCAL.size, "record name")
    if stored != full_name:
        raise FileRefused(path, f"malformed archive: local header names {stored!r}")
    start = record.header_offset + _LOCAL.size + name_len + extra_len
    if start + record.size > archive.central_offset:
        raise FileRefused(path, f"truncated archive: record {record.name!r} is cut short")
    return start


def read_record(fd: int, archive: Archive, name: str, path: str, limit: int) -> bytes:
    """Read one small record whole and check its CRC."""
    record = archive.records.get(name)
    if record is None:
        raise FileRefused(path, f"not a torch checkpoint: no {name} record")
    if record.size > limit:
        raise FileRefused(path, f"refused: record {name!r} is implausibly large")
    data = _pread_exact(fd, record.size, record_data_offset(fd, archive, record, path), path, name)
    if zlib.crc32(data) != record.crc32:
        raise FileRefused(path, f"CRC mismatch in record {name!r}: the file is corrupt")
    return data


def crc_of_range(fd: int, offset: int, length: int, path: str, crc: int = 0) -> int:
    """CRC-32 of ``length`` bytes at ``offset`` (continuing ``crc``), read in bounded chunks so
    memory stays flat."""
    buffer = bytearray(min(COPY_CHUNK, max(length, 1)))
    view = memoryview(buffer)
    done = 0
    while done < length:
        want = min(len(buffer), length - done)
        got = os.preadv(fd, [view[:want]], offset + done)
        if got <= 0:
            raise FileRefused(path, "truncated archive: record data runs past the end of the file")
        crc = zlib.crc32(view[:got], crc)
        done += got
    return crc


def crcs_of_ranges(fd: int, spans: list[tuple[int, int]], path: str) -> list[int]:
    """CRC-32 of each (offset, length) span, on up to two threads: zlib.crc32 and preadv release
    the GIL, so a large file is checked at twice the speed of one core."""
    results = [0] * len(spans)
    order = sorted(range(len(spans)), key=lambda i: spans[i][1], reverse=True)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not order or errors:
                    return
                index = order.pop(0)
            try:
                results[index] = crc_of_range(fd, *spans[index], path)
            except BaseException as error:  # re-raised in the calling thread
                with lock:
                    errors.append(error)

    big = sum(1 for _, length in spans if length >= COPY_CHUNK)
    helper = threading.Thread(target=work, name="crc", daemon=True) if big > 1 else None
    if helper is not None:
        helper.start()
    work()
    if helper is not None:
        helper.join()
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------------------------------
# Inert pickle values.  Identity matters (shared storages, tied weights), so these compare by
# identity and the unpickler's memo hands out the same object for every reference.


def _no_build(cls: type[_T]) -> type[_T]:
    """Refuse pickle's BUILD on a value: dataclasses with slots bring a ``__setstate__`` that
    would set their fields, frozen or not."""

    def refuse(self: object, state: object) -> None:
        raise _MalformedPickle(f"{type(self).__name__} cannot take pickled state")

    cls.__setstate__ = refuse  # type: ignore[attr-defined]
    return cls


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class StorageType:
    name: str  # e.g. "FloatStorage"
    dtype: str  # e.g. "float32"
    itemsize: int


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class StorageRef:
    storage_type: StorageType
    key: str
    location: str
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage_type.itemsize


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class DtypeRef:
    name: str  # "float32", as in torch.float32


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class TensorRef:
    """A tensor as its pickle describes it: a view (offset, size, stride) of a storage."""

    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool
    hooks: object
    metadata: object = None
    dtype: DtypeRef | None = None  # set only by _rebuild_tensor_v3

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.size:
            count *= dim
        return count


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class ParameterRef:
    data: TensorRef
    requires_grad: bool
    hooks: object
    state: object = None


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class DeviceRef:
    args: tuple[object, ...]


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class SizeRef:
    dims: tuple[int, ...]


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class TypeRef:
    """A class named as a value (OmegaConf metadata's ``typing.Any``, ``dict``): never called."""

    name: str


@dataclass(frozen=True, eq=False, slots=True)
class NumpyDtype:  # the one value BUILD may fill: numpy.dtype pickles its byte order
    args: tuple[object, ...]
    state: object = None

    def __setstate__(self, state: object) -> None:  # BUILD: numpy.dtype pickles its byte order
        object.__setattr__(self, "state", state)


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class NumpyScalar:
    dtype: object
    data: object


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class NumpyArray:
    args: tuple[object, ...]


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class PathValue:
    parts: tuple[object, ...]


class _Sealed(type):
    """Classes the pickle may name but never change: pickle's BUILD sets attributes on whatever
    object it is given, and a class is shared by every file sweeper reads."""

    def __setattr__(cls, name: str, value: object) -> None:
        raise _MalformedPickle(f"{cls.__name__} cannot be changed")

    def __delattr__(cls, name: str) -> None:
        raise _MalformedPickle(f"{cls.__name__} cannot be changed")


class InertObject(metaclass=_Sealed):
    """An allowlisted class instance (OmegaConf containers and nodes): its state, and nothing else.

    The class defines no hooks at all, so ``NEWOBJ`` is a bare ``object.__new__`` and ``BUILD``
    stores the state in the instance's ``__dict__``, both inside the C unpickler: none of the
    real class's code runs, and calling the class with arguments (``REDUCE``) fails.
    """

    global_name = "?"

    @property
    def state(self) -> dict[str, object]:
        return self.__dict__


class InertOrderedDict(OrderedDict[Any, Any], metaclass=_Sealed):
    """``collections.OrderedDict`` whose pickled attributes (a state dict's ``_metadata``) are
    kept as data instead of being set through ``setattr``."""

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _MalformedPickle("OrderedDict state is not a dict of attributes")
        self.attributes = dict(state)

    attributes: dict[str, object] = {}  # noqa: RUF012 - replaced per instance, never mutated


class InertDefaultDict(dict[Any, Any], metaclass=_Sealed):
    def __init__(self, factory: object = None, *args: object) -> None:
        super().__init__()
        if args:
            raise _MalformedPickle("defaultdict takes one argument")
        self.factory = factory


class _MalformedPickle(Exception):
    pass


_STORAGE_TYPES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("float64", 8),
    "FloatStorage": ("float32", 4),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexDoubleStorage": ("complex128", 16),
    "ComplexFloatStorage": ("complex64", 8),
    "UntypedStorage": ("uint8", 1),
}
_DTYPES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex128",
    "complex64",
    "complex32",
    "uint16",
    "uint32",
    "uint64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "double",
    "float",
    "half",
    "long",
    "int",
    "short",
    "cfloat",
    "cdouble",
]


def _int_tuple(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | SizeRef):
        raise _MalformedPickle(f"tensor {what} is not a tuple")
    dims = value.dims if isinstance(value, SizeRef) else value
    if not all(type(d) is int and d >= 0 for d in dims):
        raise _MalformedPickle(f"tensor {what} holds a non-integer")
    return dims


def _checked_tensor(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    metadata: object = None,
    dtype: DtypeRef | None = None,
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise _MalformedPickle("tensor without a storage record")
    if type(offset) is not int or offset < 0:
        raise _MalformedPickle("tensor storage offset is not a non-negative integer")
    dims, steps = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(dims) != len(steps):
        raise _MalformedPickle("tensor size and stride differ in length")
    if not isinstance(requires_grad, bool):
        raise _MalformedPickle("tensor requires_grad is not a bool")
    tensor = TensorRef(storage, offset, dims, steps, requires_grad, hooks, metadata, dtype)
    if tensor.numel:
        last = offset + sum((d - 1) * s for d, s in zip(dims, steps, strict=True))
        if last >= storage.numel:
            raise _MalformedPickle("tensor reaches past the end of its storage")
    return tensor


def _rebuild_tensor_v2(*args: object) -> TensorRef:
    if len(args) not in (6, 7):
        raise _MalformedPickle("_rebuild_tensor_v2 takes 6 or 7 arguments")
    metadata = args[6] if len(args) == 7 else None
    return _checked_tensor(args[0], args[1], args[2], args[3], args[4], args[5], metadata)


def _rebuild_tensor_v3(*args: object) -> TensorRef:
    if len(args) not in (7, 8):
        raise _MalformedPickle("_rebuild_tensor_v3 takes 7 or 8 arguments")
    dtype = args[6]
    if not isinstance(dtype, DtypeRef):
        raise _MalformedPickle("_rebuild_tensor_v3 dtype is not a torch dtype")
    metadata = args[7] if len(args) == 8 else None
    return _checked_tensor(args[0], args[1], args[2], args[3], args[4], args[5], metadata, dtype)


def _rebuild_parameter(*args: object) -> ParameterRef:
    if len(args) not in (3, 4) or not isinstance(args[0], TensorRef):
        raise _MalformedPickle("_rebuild_parameter takes a tensor")
    if not isinstance(args[1], bool):
        raise _MalformedPickle("_rebuild_parameter requires_grad is not a bool")
    return ParameterRef(args[0], args[1], args[2], args[3] if len(args) == 4 else None)


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise _MalformedPickle("_codecs.encode used for something other than bytes")
    return codecs.encode(text, encoding)


def _bytearray(data: object = b"", *rest: object) -> bytearray:
    # Only from bytes (or latin-1 text, protocol 2's spelling): bytearray(10**12) would be a way
    # to make sweeper allocate whatever a hostile file asks for.
    if isinstance(data, str) and rest in ((), ("latin-1",), ("latin1",)):
        return bytearray(data, "latin-1")
    if not isinstance(data, bytes) or rest:
        raise _MalformedPickle("bytearray built from something other than bytes")
    return bytearray(data)


def _inert_class(global_name: str) -> type[InertObject]:
    return type(global_name.rpartition(".")[2], (InertObject,), {"global_name": global_name})


def _make(factory: Callable[..., object]) -> Callable[..., object]:
    def call(*args: object) -> object:
        return factory(args)

    return call


def _allowed_globals() -> dict[str, object]:
    allowed: dict[str, object] = {
        "collections.OrderedDict": InertOrderedDict,
        "collections.defaultdict": InertDefaultDict,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch.device": _make(DeviceRef),
        "torch.Size": lambda dims=(): SizeRef(_int_tuple(tuple(dims), "size")),
        "_codecs.encode": _codecs_encode,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.complex": complex,
        "builtins.bytearray": _bytearray,
        "pathlib.PosixPath": _make(PathValue),
        "pathlib.Path": _make(PathValue),
        "typing.Any": TypeRef("typing.Any"),
        "argparse.Namespace": _inert_class("argparse.Namespace"),
    }
    for name, (dtype, itemsize) in _STORAGE_TYPES.items():
        allowed[f"torch.{name}"] = StorageType(name, dtype, itemsize)
    for dtype in _DTYPES:
        allowed[f"torch.{dtype}"] = DtypeRef(dtype)
    for builtin in ("dict", "list", "tuple", "int", "float", "str", "bytes", "bool", "object"):
        allowed[f"builtins.{builtin}"] = TypeRef(builtin)
    for omegaconf_class in (
        "dictconfig.DictConfig",
        "listconfig.ListConfig",
        "base.ContainerMetadata",
        "base.Metadata",
        "nodes.AnyNode",
        "nodes.StringNode",
        "nodes.IntegerNode",
        "nodes.FloatNode",
        "nodes.BooleanNode",
        "nodes.BytesNode",
        "nodes.PathNode",
        "nodes.UnionNode",
        "nodes.InterpolationResultNode",
    ):
        name = f"omegaconf.{omegaconf_class}"
        allowed[name] = _inert_class(name)
    for numpy_core in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{numpy_core}.scalar"] = lambda dtype, data=None: NumpyScalar(dtype, data)
        allowed[f"{numpy_core}._reconstruct"] = _make(NumpyArray)
    allowed["numpy.dtype"] = _make(NumpyDtype)
    allowed["numpy.ndarray"] = TypeRef("numpy.ndarray")
    return allowed


_PY2_BUILTINS = {"long": "int", "unicode": "str"}


@_no_build
@dataclass(frozen=True, slots=True)
class _Callable:
    """An allowlisted function as the pickle sees it: callable, and nothing else to touch."""

    function: Callable[..., object]

    def __call__(self, *args: object) -> object:
        return self.function(*args)


def _shareable(allowed: object) -> object:
    """An allowlisted global as every file's unpickling may share it: nothing a pickle can reach
    is changeable.  Classes are sealed (``_Sealed``), values frozen with slots and no BUILD
    (``_no_build``), builtin types read-only; functions are wrapped in a frozen ``_Callable``.
    So a hostile file can never alter how the next user's file is read or verified."""
    if isinstance(allowed, type) or dataclasses.is_dataclass(allowed):
        return allowed
    if callable(allowed):
        return _Callable(allowed)
    raise AssertionError(f"unshareable allowlist entry {allowed!r}")


_ALLOWED_GLOBALS = {name: _shareable(value) for name, value in _allowed_globals().items()}


# ---------------------------------------------------------------------------------------------
# The opcode walk: what a pickle would make the unpickler allocate, counted before it runs.
#
# CPython's unpickler allocates as it goes, and a few bytes of pickle can ask for a lot: a list
# of 40M small ints is an 80 MB data.pkl that costs gigabytes once unpickled, fingerprinted and
# compared, and ``LONG_BINPUT 0x7fffffff`` sizes the memo at 16 GiB before any allowlist is
# asked.  So every opcode is stepped over, never executed, and what it would do to the
# unpickler's stack, memo and containers is counted; a file past any bound is refused unread.
#
# The bounds are far above what torch.save writes for any real checkpoint.  Measured (torch
# 2.13): a Llama-2-7B-shaped state dict (291 tensors) with its AdamW state is 36k opcodes, 19k
# objects, 19k container items, 8k memo entries and a stack 595 deep; each parameter adds ~125
# opcodes, ~62 objects, ~66 items and ~28 memo entries (its tensor, and its optimizer entry with
# three tensors).  A model of 100,000 parameter tensors with AdamW state, beyond any single-file
# checkpoint seen in practice, is 12.5M opcodes, 6.3M objects, 6.6M items, 2.8M memo entries and
# a stack 2k deep (pickle writes containers in batches of 1000): under every bound.  At the
# bounds unpickling may still cost ~1 GiB, which classification pays in a worker process under
# an address-space limit (see sweeper.inventory).
_MAX_PICKLE_OPCODES = 16_000_000
_MAX_PICKLE_OBJECTS = 8_000_000  # values made: literals, containers, instances, call results
_MAX_CONTAINER_ITEMS = 8_000_000  # references put into lists, dicts, tuples and instances
_MAX_MEMO_ENTRIES = 4_000_000
# Values (and marks) on the unpickler's stack at once: how deeply the data nests, and the
# largest container written in one piece (a tuple: lists, dicts and sets come in batches).
_MAX_STACK_DEPTH = 1_000_000
# Each opcode is at least a byte and adds at most one to any count, so a shorter pickle cannot
# pass a bound: under an address-space limit, where a huge memo index fails as a MemoryError
# (a refused file), it need not be walked.
_WALK_ALWAYS_BYTES = min(
    _MAX_PICKLE_OPCODES,
    _MAX_PICKLE_OBJECTS,
    _MAX_CONTAINER_ITEMS,
    _MAX_MEMO_ENTRIES,
    _MAX_STACK_DEPTH,
)
_CHECK_EVERY = 65_536  # opcodes between looks at the counts (each grows by at most 1 an opcode)

# How to step over each opcode's argument: a size for fixed arguments, or a negative code.  The
# opcodes that involve a MARK have codes of their own (INST steps over its two lines too).
(
    _LENGTH1, _LENGTH4, _LENGTH8, _ONE_LINE, _TWO_LINES, _PUT4, _PUT_LINE, _STOP, _MARK,
    _MARK_TO_VALUE, _MARK_INTO, _POP, _POP_MARK, _INST, _BAD,
) = (-1, -4, -8, -10, -11, -12, -13, -14, -20, -21, -22, -23, -24, -25, -99)  # fmt: skip
_STEP = [_BAD] * 256
for _ops, _step in (
    (b")2NRabs}]\x81\x85\x86\x87\x88\x89\x92\x93\x94Q", 0),
    (b"Khq\x80\x82", 1), (b"M\x83", 2), (b"Jj\x84", 4), (b"G\x95", 8),
    (b"UC\x8c\x8a", _LENGTH1), (b"TXB\x8b", _LENGTH4), (b"\x8d\x8e\x96", _LENGTH8),
    (b"IFLSVgP", _ONE_LINE), (b"c", _TWO_LINES), (b"r", _PUT4), (b"p", _PUT_LINE), (b".", _STOP),
    (b"(", _MARK), (b"tldo", _MARK_TO_VALUE), (b"eu", _MARK_INTO), (b"0", _POP),
    (b"1", _POP_MARK), (b"i", _INST),
):  # fmt: skip
    for _op in _ops:
        _STEP[_op] = _step

# What every other opcode does: its change to the stack's depth, and one number tallying the
# objects it makes, the container items it stores and the memo entries it adds, packed so that
# the walk pays one addition per opcode (no field can reach 2**25 between two looks).
_ITEM, _MEMO, _FIELD = 1 << 25, 1 << 50, (1 << 25) - 1
_DEPTH = [0] * 256
_TALLY = [0] * 256
for _ops, _depth, _tally in (
    (b"IJKLFGNPSTUVXBC})]c\x88\x89\x8a\x8b\x8c\x8d\x8e\x96\x82\x83\x84", 1, 1),  # a new value
    (b"2ghj", 1, 0),  # another reference to a value already made
    (b"R\x81\x93", -1, 1),  # a call or a class: two values in, one out
    (b"Q", 0, 1),  # BINPERSID: a persistent id in, a storage out
    (b"\x92", -2, 1),  # NEWOBJ_EX: class, args and kwargs in, the instance out
    (b"a", -1, _ITEM), (b"s", -2, 2 * _ITEM), (b"b", -1, _ITEM),  # APPEND, SETITEM, BUILD
    (b"\x85", 0, 1 + _ITEM), (b"\x86", -1, 1 + 2 * _ITEM), (b"\x87", -2, 1 + 3 * _ITEM),
    (b"pqr\x94", 0, _MEMO),
):  # fmt: skip
    for _op in _ops:
        _DEPTH[_op], _TALLY[_op] = _depth, _tally


_memo_walk_needed = True


def rely_on_address_space_limit() -> None:
    """For a worker process whose RLIMIT_AS is set: an oversized memo then fails as MemoryError
    (a refused file), so small pickles, which cannot pass any bound, need no walk."""
    global _memo_walk_needed
    _memo_walk_needed = False


def _check_pickle(data: bytes, path: str) -> None:
    """Walk the opcodes of ``data`` and refuse it (:class:`FileRefused`, naming the bound) when
    it would make the unpickler allocate more than the bounds above allow, or when a memo index
    a PUT names is beyond the number of PUTs so far (+256), as no pickler writes them: CPython
    sizes its memo by the largest index it is given.  Allocates nothing that grows with the
    pickle but its list of open MARKs, itself bounded."""
    i, end, puts, ops, depth, tally = 0, len(data), 0, 0, 0, 0
    marks: list[int] = []
    look = _CHECK_EVERY
    step, depths, tallies, unpack = _STEP, _DEPTH, _TALLY, struct.unpack_from
    try:
        while i < end:
            op = data[i]
            size = step[op]
            i += 1
            ops += 1
            if ops >= look:
                _check_counts(ops, tally, depth + len(marks), path)
                look += _CHECK_EVERY
            if size >= 0:
                i += size
            elif size == _LENGTH4:
                i += 4 + unpack("<I", data, i)[0]
            elif size == _PUT4:
                if unpack("<I", data, i)[0] > puts + 256:
                    raise _Malformed("memo index out of sequence")
                puts += 1
                i += 4
            elif size == _LENGTH1:
                i += 1 + data[i]
            elif size == _MARK:
                marks.append(depth)
            elif size in (_MARK_INTO, _MARK_TO_VALUE, _INST):
                if size == _INST:
                    i = data.index(b"\n", data.index(b"\n", i) + 1) + 1
                if not marks:
                    raise _Malformed("no MARK to build to")
                items = depth - marks.pop()
                if items < 0:
                    raise _Malformed("stack underflow")
                tally += items * _ITEM
                depth -= items
                if size != _MARK_INTO:  # the values between the mark make one new value
                    depth += 1
                    tally += 1
            elif size == _POP:
                if marks and marks[-1] == depth:
                    marks.pop()
                else:
                    depth -= 1
            elif size == _POP_MARK:
                if not marks:
                    raise _Malformed("no MARK to pop")
                depth = marks.pop()
            elif size == _STOP:
                _check_counts(ops, tally, depth + len(marks), path)
                return
            elif size == _ONE_LINE:
                i = data.index(b"\n", i) + 1
            elif size == _TWO_LINES:
                i = data.index(b"\n", data.index(b"\n", i) + 1) + 1
            elif size == _PUT_LINE:
                newline = data.index(b"\n", i)
                if int(data[i:newline]) > puts + 256:
                    raise _Malformed("memo index out of sequence")
                puts += 1
                i = newline + 1
            elif size == _LENGTH8:
                i += 8 + unpack("<Q", data, i)[0]
            else:  # not an opcode torch writes: let nothing this odd reach the unpickler
                raise _Malformed(f"opcode {op:#04x} is not allowed")
            depth += depths[op]
            tally += tallies[op]
    except (ValueError, struct.error, IndexError):
        raise FileRefused(path, "malformed pickle in data.pkl: cut short") from None
    except _Malformed as error:
        raise FileRefused(path, f"malformed pickle in data.pkl: {error}") from None
    raise FileRefused(path, "malformed pickle in data.pkl: no STOP opcode")


class _Malformed(Exception):
    pass


def _check_counts(ops: int, tally: int, depth: int, path: str) -> None:
    """Refuse the file if a count passed its bound; the reason names the bound."""
    objects, items, memo = tally & _FIELD, (tally >> 25) & _FIELD, tally >> 50
    for count, bound, what in (
        (ops, _MAX_PICKLE_OPCODES, "opcodes"),
        (objects, _MAX_PICKLE_OBJECTS, "objects"),
        (items, _MAX_CONTAINER_ITEMS, "container items"),
        (memo, _MAX_MEMO_ENTRIES, "memo entries"),
        (depth, _MAX_STACK_DEPTH, "values on the stack at once (nesting)"),
    ):
        if count > bound:
            raise FileRefused(
                path,
                f"refused: data.pkl has more than {bound:,} {what}, more than any real checkpoint",
            )
    if depth < 0:
        raise _Malformed("stack underflow")


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol 2 spells builtins the Python 2 way
            module, name = "builtins", _PY2_BUILTINS.get(name, name)
        qualified = f"{module}.{name}"
        try:
            return _ALLOWED_GLOBALS[qualified]
        except KeyError:
            raise UnsafePickle(self._path, qualified) from None

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _MalformedPickle(f"unknown persistent id {pid!r:.80}")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise _MalformedPickle("storage of an unknown type")
        if not (isinstance(key, str) and isinstance(location, str) and type(numel) is int):
            raise _MalformedPickle("malformed storage reference")
        if numel < 0:
            raise _MalformedPickle("negative storage size")
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = StorageRef(storage_type, key, location, numel)
        return known


# Why a file is refused when reading it runs out of memory: in a worker process, that is its
# address-space limit (classify_memory_limit); the same words wherever it happens.
MEMORY_REFUSAL = "refused: reading it needs more memory than sweeper allows (classify_memory_limit)"


def load_inert(data: bytes, path: str) -> object:
    """Unpickle ``data`` into inert values; nothing in it is ever executed."""
    return _load_inert(data, path)[0]


def _load_inert(data: bytes, path: str) -> tuple[object, list[StorageRef]]:
    """The inert root object and every storage the pickle references."""
    # Bounded before anything is allocated: workers under an address-space limit skip the walk
    # for pickles too small to pass a bound (the limit turns a huge memo into a refusal).
    if _memo_walk_needed or len(data) >= _WALK_ALWAYS_BYTES:
        _check_pickle(data, path)
    try:
        unpickler = _InertUnpickler(data, path)
        return unpickler.load(), list(unpickler.storages.values())
    except UnsafePickle:
        raise
    except (_MalformedPickle, pickle.UnpicklingError, ValueError, TypeError, EOFError) as error:
        raise FileRefused(path, f"malformed pickle in data.pkl: {error}") from None
    except (AttributeError, IndexError, KeyError, RecursionError) as error:
        raise FileRefused(
            path, f"malformed pickle in data.pkl: {type(error).__name__}: {error}"
        ) from None
    except MemoryError:
        raise FileRefused(path, MEMORY_REFUSAL) from None


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


# ---------------------------------------------------------------------------------------------
# The output: the kept subtree as a fresh pickle, and the records to copy.


_PLAIN_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


@_no_build
@dataclass(frozen=True, eq=False, slots=True)
class PlainData:
    """A subtree made only of dicts, lists, tuples, strings, numbers, bools, bytes and None
    (a converted config): the writer hands it to the C pickler whole."""

    value: object


def _plain_config(value: object, path: str, budget: list[int] | None = None) -> object:
    """An OmegaConf container's pickled state as plain dicts and lists, interpolations unresolved.

    ``${oc.env:HOME}`` stays the text ``"${oc.env:HOME}"``: nothing is evaluated, so nothing of
    sweeper's environment can leak into a user's file.
    """
    if type(value) in _PLAIN_SCALARS:
        return value
    # A config that shares sub-objects (d = {"a": d, "b": d} forty times) would expand into a
    # tree of 2**40 nodes: count what is produced and stop long before memory runs out.
    budget = budget if budget is not None else [_MAX_CONFIG_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        raise FileRefused(path, "config is implausibly large (shared sub-objects?)")
    if isinstance(value, InertObject):
        state = value.state
        if not isinstance(state, dict):
            raise FileRefused(path, f"config: {type(value).global_name} without state")
        if type(value).global_name.startswith("omegaconf.nodes."):
            return _plain_config(state.get("_val"), path, budget)
        if type(value).global_name in (
            "omegaconf.dictconfig.DictConfig",
            "omegaconf.listconfig.ListConfig",
            "argparse.Namespace",
        ):
            content = (
                state if type(value).global_name == "argparse.Namespace" else state.get("_content")
            )
            return _plain_config(content, path, budget)
        raise FileRefused(path, f"config holds an unsupported {type(value).global_name}")
    if isinstance(value, dict):
        return {
            _plain_config(k, path, budget): _plain_config(v, path, budget) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        items = [_plain_config(v, path, budget) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, PathValue):
        return "/".join(str(p) for p in value.parts).replace("//", "/")
    if isinstance(value, NumpyScalar):
        return _numpy_scalar_value(value)
    if value is None or isinstance(value, str | int | float | bool | bytes):
        return value
    raise FileRefused(path, f"config holds an unsupported value of type {type(value).__name__}")


def _portable_metadata(value: object, key: str, path: str) -> object:
    """A kept metadata value in a form ``torch.load(weights_only=True)`` accepts."""
    if key == "config" or isinstance(value, InertObject):
        try:
            return PlainData(_plain_config(value, path))
        except RecursionError:
            raise FileRefused(path, f"metadata key {key!r} nests too deeply") from None
    if isinstance(value, NumpyScalar):
        number = _numpy_scalar_value(value)
        if number is None:
            raise FileRefused(path, f"metadata key {key!r} holds an unsupported numpy scalar")
        return number
    for item in _walk(value):
        # frozenset, defaultdict and classes are not on torch's weights_only allowlist either.
        if isinstance(
            item,
            NumpyArray
            | NumpyScalar
            | NumpyDtype
            | InertObject
            | PathValue
            | frozenset
            | TypeRef
            | InertDefaultDict,
        ):
            what = "defaultdict" if isinstance(item, InertDefaultDict) else type(item).__name__
            raise FileRefused(path, f"metadata key {key!r} holds a {what}, not loadable safely")
    return value


def select_output(checkpoint: Checkpoint, mode: Mode) -> object:
    """The object an extraction writes: the weights, plus (inference mode) the metadata.

    Kept: ``model_state_dict`` and every other top-level key that is not training state
    (optimizer, scheduler, AMP scaler, RNG state), with configs turned into plain containers.
    """
    path = checkpoint.path
    if checkpoint.kind is not Kind.FULL:
        if checkpoint.kind is Kind.OTHER:
            raise FileRefused(path, f"not a full training checkpoint: no {MODEL_KEY!r}")
        raise FileRefused(path, f"already {_article(checkpoint.kind)}; nothing to extract")
    root = checkpoint.root
    assert isinstance(root, dict)
    weights = root[MODEL_KEY]
    if not isinstance(weights, dict):
        raise FileRefused(path, f"{MODEL_KEY!r} is not a state dict")
    if mode is Mode.WEIGHTS:
        return weights
    kept: dict[object, object] = {}
    for key, value in root.items():
        if key == MODEL_KEY:
            kept[key] = value
        elif not is_training_state_key(key):
            kept[key] = _portable_metadata(value, str(key), path)
    return kept


def _article(kind: Kind) -> str:
    return f"an {kind.value}" if kind.value[0] in "aeiou" else kind.value


@dataclass(frozen=True)
class OutputEntry:
    name: str  # relative to the archive folder
    size: int
    crc32: int
    inline: bytes | None  # small records written from memory
    source: Record | None  # storage records copied from the source


@dataclass(frozen=True)
class OutputPlan:
    """Exactly what an extraction will write, computed before a byte is written."""

    entries: tuple[OutputEntry, ...]
    total_size: int
    source_keys: Mapping[str, str] = field(repr=False)  # output storage key -> source key


_ARCHIVE_PREFIX = "archive"
# Where a copy says which version of which file it was made from.  torch.load reads only the
# records data.pkl names, so an extra record is invisible to it.
PROVENANCE_RECORD = ".data/sweeper_source.json"
_MAX_PROVENANCE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Provenance:
    """The version of the source a copy was made from: enough to tell a copy of an earlier
    version of the same name (stale) from a current one, after the source itself is gone."""

    name: str  # the source's file name (no folder)
    size: int
    mtime_ns: int
    pickle_crc32: int  # CRC-32 of the source's data.pkl record
    # (st_dev, st_ino) of the folder the source was in: a copy carried into another folder is
    # not that folder's copy of a file of the same name, and is never refreshed there.
    folder: tuple[int, int] | None = None

    def same_version(self, other: Provenance) -> bool:
        """Made from the same content of the same-named file (wherever the folder)."""
        mine = (self.name, self.size, self.mtime_ns, self.pickle_crc32)
        return mine == (other.name, other.size, other.mtime_ns, other.pickle_crc32)

    def encode(self) -> bytes:
        fields: dict[str, object] = {
            "source": self.name,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "pickle_crc32": self.pickle_crc32,
        }
        if self.folder is not None:
            fields["folder"] = list(self.folder)
        return json.dumps(fields, sort_keys=True, ensure_ascii=True).encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> Provenance | None:
        try:
            fields = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):  # a user's file: anything
            return None
        if not isinstance(fields, dict):
            return None
        name, size = fields.get("source"), fields.get("size")
        mtime_ns, crc = fields.get("mtime_ns"), fields.get("pickle_crc32")
        if not isinstance(name, str) or not all(type(n) is int for n in (size, mtime_ns, crc)):
            return None
        if name in ("", ".", "..") or "/" in name or "\0" in name:  # a file name, nothing else
            return None
        assert isinstance(size, int) and isinstance(mtime_ns, int) and isinstance(crc, int)
        folder = fields.get("folder")
        where = None
        if isinstance(folder, list) and len(folder) == 2 and all(type(n) is int for n in folder):
            where = (folder[0], folder[1])
        return cls(name, size, mtime_ns, crc, where)


def provenance_of(
    checkpoint: Checkpoint, name: str, mtime_ns: int, folder: tuple[int, int] | None
) -> Provenance:
    """What a copy made now from ``checkpoint`` (file ``name`` in the folder whose (st_dev,
    st_ino) is ``folder``, modified at ``mtime_ns``) records about its source."""
    pickle_record = checkpoint.archive.records["data.pkl"]
    return Provenance(name, checkpoint.file_size, mtime_ns, pickle_record.crc32, folder)


def read_provenance(fd: int, archive: Archive, path: str) -> Provenance | None:
    """The source a copy names, or None when it names none (not written by this sweeper)."""
    if PROVENANCE_RECORD not in archive.records:
        return None
    return Provenance.decode(
        read_record(fd, archive, PROVENANCE_RECORD, path, _MAX_PROVENANCE_BYTES)
    )


def plan_output(
    checkpoint: Checkpoint, mode: Mode, provenance: Provenance | None = None
) -> OutputPlan:
    """Lay out the output archive: a new data.pkl, the storage records it references, and
    (when given) the record of the source version it is made from."""
    selected = select_output(checkpoint, mode)
    writer = _PickleWriter()
    try:
        pickled = writer.dump(selected)
    except _MalformedPickle as error:
        raise FileRefused(checkpoint.path, f"cannot write the output: {error}") from None
    except RecursionError:
        raise FileRefused(checkpoint.path, "refused: the pickle nests too deeply") from None
    byteorder = b"little"
    if "byteorder" in checkpoint.archive.records:
        byteorder = b"big" if checkpoint.archive.records["byteorder"].size == 3 else b"little"
    entries = [
        _inline("data.pkl", pickled),
        _inline(".format_version", b"1"),
        _inline(".storage_alignment", str(_ALIGNMENT).encode()),
        _inline("byteorder", byteorder),
    ]
    for new_key, storage in writer.storages:
        source = checkpoint.archive.data_record(storage.key)
        assert source is not None  # open_checkpoint checked every storage has its record
        entries.append(OutputEntry(f"data/{new_key}", source.size, source.crc32, None, source))
    entries.append(_inline("version", b"3\n"))
    if provenance is not None:
        entries.append(_inline(PROVENANCE_RECORD, provenance.encode()))
    source_keys = {new_key: storage.key for new_key, storage in writer.storages}
    return OutputPlan(tuple(entries), _layout(entries)[1], source_keys)


def _inline(name: str, data: bytes) -> OutputEntry:
    return OutputEntry(name, len(data), zlib.crc32(data), data, None)


def _needs_zip64(offset: int, size: int) -> bool:
    return offset >= _U32 or size >= _U32


def _local_header(name: bytes, offset: int, entry: OutputEntry) -> bytes:
    """A local header laid out as torch's writer (miniz) does: data padded to 64 bytes with an
    ``FB`` extra field, sizes in a data descriptor after the data."""
    zip64 = _needs_zip64(offset, entry.size)
    extra = struct.pack("<HHQQ", 0x0001, 16, entry.size, entry.size) if zip64 else b""
    start = offset + _LOCAL.size + len(name) + len(extra) + 4
    padding = (-start) % _ALIGNMENT
    extra += struct.pack("<2sH", b"FB", padding) + b"Z" * padding
    sizes = _U32 if zip64 else 0
    flags = 0x0808 if entry.size else 0x0800
    header = _LOCAL.pack(
        _LOCAL_SIG, 45 if zip64 else 20, flags, 0, 0, 0x21, 0, sizes, sizes, len(name), len(extra)
    )
    return header + name + extra


def _descriptor(offset: int, entry: OutputEntry) -> bytes:
    if not entry.size:
        return b""
    if _needs_zip64(offset, entry.size):
        return struct.pack("<4sIQQ", _DESCRIPTOR_SIG, entry.crc32, entry.size, entry.size)
    return struct.pack("<4sIII", _DESCRIPTOR_SIG, entry.crc32, entry.size, entry.size)


def _layout(entries: list[OutputEntry]) -> tuple[list[tuple[int, bytes, bytes]], int]:
    """(header offset, local header, descriptor) per entry, and the archive's total size."""
    placed = []
    offset = 0
    central = 0
    for entry in entries:
        name = f"{_ARCHIVE_PREFIX}/{entry.name}".encode()
        header = _local_header(name, offset, entry)
        descriptor = _descriptor(offset, entry)
        placed.append((offset, header, descriptor))
        central += _CENTRAL.size + len(name) + len(_central_extra(offset, entry))
        offset += len(header) + entry.size + len(descriptor)
    tail = _ZIP64_EOCD.size + _ZIP64_LOCATOR.size + _EOCD.size
    return placed, offset + central + tail


def _central_extra(offset: int, entry: OutputEntry) -> bytes:
    if not _needs_zip64(offset, entry.size):
        return b""
    return struct.pack("<HHQQQ", 0x0001, 24, entry.size, entry.size, offset)


def _central_directory(
    entries: tuple[OutputEntry, ...], placed: list[tuple[int, bytes, bytes]], cd_offset: int
) -> bytes:
    parts = []
    for entry, (offset, _, _) in zip(entries, placed, strict=True):
        name = f"{_ARCHIVE_PREFIX}/{entry.name}".encode()
        zip64 = _needs_zip64(offset, entry.size)
        extra = _central_extra(offset, entry)
        size = _U32 if zip64 else entry.size
        parts.append(
            _CENTRAL.pack(
                _CENTRAL_SIG,
                45 if zip64 else 20,
                45 if zip64 else 20,
                0x0808 if entry.size else 0x0800,
                0,
                0,
                0x21,
                entry.crc32,
                size,
                size,
                len(name),
                len(extra),
                0,
                0,
                0,
                0,
                _U32 if zip64 else offset,
            )
            + name
            + extra
        )
    directory = b"".join(parts)
    count = len(entries)
    z64_offset = cd_offset + len(directory)
    parts = [
        directory,
        _ZIP64_EOCD.pack(
            _ZIP64_EOCD_SIG, 44, 45, 45, 0, 0, count, count, len(directory), cd_offset
        ),
        _ZIP64_LOCATOR.pack(_ZIP64_LOCATOR_SIG, 0, z64_offset, 1),
        _EOCD.pack(
            _EOCD_SIG,
            0,
            0,
            min(count, _U16),
            min(count, _U16),
            min(len(directory), _U32),
            min(cd_offset, _U32),
            0,
        ),
    ]
    return b"".join(parts)


def write_output(
    source_fd: int,
    source: Checkpoint,
    plan: OutputPlan,
    out_fd: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, int]:
    """Write the planned archive to ``out_fd`` (positioned at 0), copying storage records from
    ``source_fd`` in the kernel where it can.  ``should_stop`` is polled between chunks so a
    daemon can abort a long copy promptly.

    Returns the CRC-32 of every copied record *as read back from the output file*: a second
    thread reads each chunk back right after it is copied, so the check overlaps the copy.
    ``verify_output`` compares these with the source's CRCs.
    """
    placed, total = _layout(list(plan.entries))
    offset = 0
    read_back = _ReadBack(out_fd, source.path)
    try:
        for entry, (header_offset, header, descriptor) in zip(plan.entries, placed, strict=True):
            assert header_offset == offset
            _write_all(out_fd, header, offset)
            offset += len(header)
            if entry.inline is not None:
                _write_all(out_fd, entry.inline, offset)
            else:
                assert entry.source is not None
                start = record_data_offset(source_fd, source.archive, entry.source, source.path)
                try:
                    _copy_range(
                        source_fd,
                        start,
                        out_fd,
                        offset,
                        entry.size,
                        should_stop,
                        functools.partial(read_back.feed, entry.name),
                    )
                except EOFError:
                    raise FileRefused(source.path, "truncated while it was being read") from None
            offset += entry.size
            _write_all(out_fd, descriptor, offset)
            offset += len(descriptor)
        _write_all(out_fd, _central_directory(plan.entries, placed, offset), offset)
        if os.fstat(out_fd).st_size != total:
            os.ftruncate(out_fd, total)
    finally:
        crcs = read_back.finish()
    return crcs


class _ReadBack:
    """Reads copied chunks back from the output on a helper thread, keeping a CRC per record."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path
        self._chunks: queue.SimpleQueue[tuple[str, int, int] | None] = queue.SimpleQueue()
        self._crcs: dict[str, int] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="read-back", daemon=True)
        self._thread.start()

    def feed(self, name: str, offset: int, length: int) -> None:
        self._chunks.put((name, offset, length))

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            name, offset, length = chunk
            if self._error is not None:
                continue
            try:
                crc = self._crcs.get(name, 0)
                self._crcs[name] = crc_of_range(self._fd, offset, length, self._path, crc)
            except BaseException as error:  # re-raised by finish()
                self._error = error

    def finish(self) -> dict[str, int]:
        self._chunks.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._crcs


class Interrupted(Exception):
    """A copy stopped because the caller asked it to."""


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Callable[[int, int, int, int], int] | None = None


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a copied chunk to disk now (``sync_file_range``), so the
    final fsync finds little left to do; the fsync is still what makes the file durable."""
    global _sync_file_range
    if _sync_file_range is None:
        try:
            import ctypes

            function = ctypes.CDLL(None, use_errno=True).sync_file_range
            function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            _sync_file_range = function
        except (OSError, AttributeError):
            _sync_file_range = lambda *args: -1  # noqa: E731 - not on this platform
    _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _copy_range(
    src: int,
    src_offset: int,
    dst: int,
    dst_offset: int,
    length: int,
    should_stop: Callable[[], bool],
    copied_chunk: Callable[[int, int], None],
) -> None:
    done = 0
    use_kernel = hasattr(os, "copy_file_range")
    buffer: bytearray | None = None
    while done < length:
        if should_stop():
            raise Interrupted
        want = min(COPY_CHUNK, length - done)
        if use_kernel:
            try:
                copied = os.copy_file_range(src, dst, want, src_offset + done, dst_offset + done)
            except OSError as error:
                if error.errno not in (18, 22, 38, 95):  # EXDEV EINVAL ENOSYS EOPNOTSUPP
                    raise
                use_kernel = False
                continue
            if copied == 0:
                raise EOFError("source record ends early")
        else:
            buffer = buffer if buffer is not None else bytearray(COPY_CHUNK)
            view = memoryview(buffer)[:want]
            copied = os.preadv(src, [view], src_offset + done)
            if copied == 0:
                raise EOFError("source record ends early")
            _write_all(dst, bytes(view[:copied]) if copied < want else view, dst_offset + done)
        _start_writeback(dst, dst_offset + done, copied)
        copied_chunk(dst_offset + done, copied)
        done += copied


_WHOLE_READ_BYTES = 4 * 1024 * 1024  # below this, one read of the records beats one per record


def verify_records(fd: int, archive: Archive, path: str) -> None:
    """Read every record and check its CRC (``inspect --verify``); raises FileRefused."""
    records = list(archive.records.values())
    if archive.central_offset <= _WHOLE_READ_BYTES:
        whole = memoryview(_pread_exact(fd, archive.central_offset, 0, path, "records"))

        def read(length: int, offset: int, what: str) -> bytes:
            if offset + length > len(whole):
                raise FileRefused(path, f"truncated archive: {what} runs past the end of the file")
            return bytes(whole[offset : offset + length])

        starts = [_data_offset(read, archive, r, path) for r in records]
        crcs = [zlib.crc32(whole[at : at + r.size]) for at, r in zip(starts, records, strict=True)]
    else:
        spans = [(record_data_offset(fd, archive, r, path), r.size) for r in records]
        crcs = crcs_of_ranges(fd, spans, path)
    for record, crc in zip(records, crcs, strict=True):
        if crc != record.crc32:
            raise FileRefused(path, f"CRC mismatch in record {record.name!r}: the file is corrupt")


def same_content(archive: Archive, plan: OutputPlan) -> bool:
    """Whether an archive holds exactly the plan's records (names, sizes, CRCs), whatever
    source record each carries: the same weights and metadata."""
    wanted = {entry.name: entry for entry in plan.entries if entry.name != PROVENANCE_RECORD}
    present = {name for name in archive.records if name != PROVENANCE_RECORD}
    if present != set(wanted):
        return False
    return all(
        (archive.records[name].size, archive.records[name].crc32) == (entry.size, entry.crc32)
        for name, entry in wanted.items()
    )


def without_provenance(plan: OutputPlan) -> OutputPlan:
    """The same output as written before copies recorded their source."""
    entries = [entry for entry in plan.entries if entry.name != PROVENANCE_RECORD]
    return OutputPlan(tuple(entries), _layout(entries)[1], plan.source_keys)


def archive_matches_plan(
    fd: int, plan: OutputPlan, path: str, archive: Archive | None = None
) -> bool:
    """Whether an existing file's directory is exactly what ``plan`` would write (same records,
    sizes and CRCs, so the same pickle): cheap, reads only the directory."""
    archive = archive or read_archive(fd, path)
    if archive.file_size != plan.total_size or len(archive.records) != len(plan.entries):
        return False
    for entry in plan.entries:
        record = archive.records.get(entry.name)
        if record is None or (record.size, record.crc32) != (entry.size, entry.crc32):
            return False
    return True


def verify_output(
    out_fd: int,
    plan: OutputPlan,
    source: Checkpoint,
    mode: Mode,
    path: str,
    read_back: Mapping[str, int] | None = None,
) -> None:
    """Prove the written archive is exactly the plan: every record's CRC matches the source's
    (``read_back`` holds CRCs already read back from this file by ``write_output``),
    and its pickle describes the same tensors (dtype, shape, stride, offset, storage sharing)
    and the same metadata as the kept part of the source.  Raises FileRefused otherwise."""
    archive = read_archive(out_fd, path)
    if archive.file_size != plan.total_size:
        raise FileRefused(path, "verification failed: output size differs from the plan")
    spans = []
    for entry in plan.entries:
        record = archive.records.get(entry.name)
        if record is None or record.size != entry.size or record.crc32 != entry.crc32:
            raise FileRefused(path, f"verification failed: record {entry.name!r} differs")
        spans.append((record_data_offset(out_fd, archive, record, path), record.size))
    read_back = read_back or {}
    unread = [i for i, entry in enumerate(plan.entries) if entry.name not in read_back]
    crcs = [read_back.get(entry.name, 0) for entry in plan.entries]
    for index, crc in zip(
        unread, crcs_of_ranges(out_fd, [spans[i] for i in unread], path), strict=True
    ):
        crcs[index] = crc
    for entry, crc in zip(plan.entries, crcs, strict=True):
        if crc != entry.crc32:
            what = "the source record is corrupt" if entry.source is not None else "write error"
            raise FileRefused(source.path, f"CRC mismatch in record {entry.name!r}: {what}")
    written = load_inert(read_record(out_fd, archive, "data.pkl", path, _MAX_PICKLE_BYTES), path)
    expected = select_output(source, mode)
    try:
        same = _same_trees(written, expected, plan.source_keys)
    except (RecursionError, _MalformedPickle) as error:
        raise FileRefused(path, f"verification failed: {error or 'nests too deeply'}") from None
    if not same:
        raise FileRefused(path, "verification failed: output tensors differ from the source")


def _same_trees(written: object, expected: object, key_map: Mapping[str, str]) -> bool:
    """Whether two pickled trees have the same fingerprint (see :func:`_fingerprint`), compared
    item by item as both are made: memory stays flat, where two lists of a tree of 8M small
    ints' fingerprints took 2 GB."""
    pairs = itertools.zip_longest(
        _fingerprint(written, key_map), _fingerprint(expected, None), fillvalue=_END
    )
    for count, (mine, theirs) in enumerate(pairs):
        if count > _MAX_FINGERPRINT_ITEMS:
            raise _MalformedPickle("too many objects to compare")
        if mine != theirs:
            return False
    return True


_END = object()


def _fingerprint(value: object, key_map: Mapping[str, str] | None) -> Iterator[object]:
    """A comparable description of a pickled tree, one item at a time: structure, plain values,
    and for each tensor its source storage key, dtype, offset, size, stride; shared objects are
    numbered so that storage sharing and tied weights compare too."""
    ids: dict[int, int] = {}

    def visit(item: object) -> Iterator[object]:
        if isinstance(item, PlainData):
            item = item.value
        if isinstance(item, StorageRef | TensorRef | ParameterRef | dict | list | tuple):
            if id(item) in ids:
                yield ("ref", ids[id(item)])
                return
            ids[id(item)] = len(ids)
        if isinstance(item, StorageRef):
            key = key_map[item.key] if key_map is not None else item.key
            yield ("storage", key, item.storage_type.name, item.numel)
        elif isinstance(item, TensorRef):
            dtype = item.dtype.name if item.dtype else None
            yield ("tensor", item.offset, item.size, item.stride, item.requires_grad, dtype)
            yield from visit(item.storage)
            yield from visit(item.metadata)
        elif isinstance(item, ParameterRef):
            yield ("parameter", item.requires_grad)
            yield from visit(item.data)
        elif isinstance(item, dict):
            yield ("dict", len(item))
            if isinstance(item, InertOrderedDict):
                yield from visit(item.attributes)
            for k, v in item.items():
                yield from visit(k)
                yield from visit(v)
        elif isinstance(item, list | tuple):
            yield (type(item).__name__, len(item))
            for v in item:
                yield from visit(v)
        elif isinstance(item, DtypeRef):
            yield ("dtype", item.name)
        elif isinstance(item, SizeRef):
            yield ("size", item.dims)
        elif isinstance(item, DeviceRef):
            yield ("device", item.args)
        elif isinstance(item, float) and item != item:
            yield ("float", "nan")
        else:
            yield (type(item).__name__, item)

    return visit(value)


# ---------------------------------------------------------------------------------------------
# The pickle writer: protocol 2, as torch.save writes it, for the inert values above.


class _PickleWriter:
    def __init__(self) -> None:
        self._out = bytearray()
        self._memo: dict[int, int] = {}
        self._alive: list[object] = []  # keeps memoized objects alive so their ids stay unique
        self._globals: dict[str, int] = {}
        self._storage_keys: dict[int, str] = {}
        self.storages: list[tuple[str, StorageRef]] = []

    def dump(self, value: object) -> bytes:
        self._out += b"\x80\x02"
        self._save(value)
        self._out += b"."
        return bytes(self._out)

    def _put(self, value: object) -> None:
        index = len(self._memo)
        self._memo[id(value)] = index
        self._alive.append(value)
        self._out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def _get(self, index: int) -> None:
        self._out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)

    def _global(self, qualified: str) -> None:
        index = self._globals.get(qualified)
        if index is not None:
            self._get(index)
            return
        module, _, name = qualified.rpartition(".")
        self._out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        marker = object()
        self._globals[qualified] = len(self._memo)
        self._put(marker)

    def _reduce(self, qualified: str, args: tuple[object, ...], value: object) -> None:
        self._global(qualified)
        self._save(args)
        self._out += b"R"
        self._put(value)

    def _save_plain(self, value: PlainData) -> None:
        # Without a memo (``fast``) the C pickler's opcodes hold no memo indices, so its output
        # splices into this stream as is; plain data has no shared objects worth keeping.
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=2)
        pickler.fast = True
        pickler.dump(value.value)
        self._out += buffer.getbuffer()[2:-1]  # without PROTO and STOP

    def _save(self, value: object) -> None:
        kind = type(value)
        if kind is str:
            key = id(value)
            if key in self._memo:
                self._get(self._memo[key])
                return
            data = value.encode("utf-8", "surrogatepass")  # type: ignore[attr-defined]
            self._out += b"X" + struct.pack("<I", len(data)) + data
            self._put(value)
            return
        if kind is TensorRef:
            if id(value) in self._memo:
                self._get(self._memo[id(value)])
            else:
                self._save_tensor(value)  # type: ignore[arg-type]
            return
        if kind is int:
            self._save_int(value)  # type: ignore[arg-type]
            return
        if kind is PlainData:
            self._save_plain(value)  # type: ignore[arg-type]
            return
        if value is None:
            self._out += b"N"
        elif value is True:
            self._out += b"\x88"
        elif value is False:
            self._out += b"\x89"
        elif type(value) is int:
            self._save_int(value)
        elif type(value) is float:
            self._out += b"G" + struct.pack(">d", value)
        elif id(value) in self._memo:
            self._get(self._memo[id(value)])
        elif type(value) is str:
            data = value.encode("utf-8", "surrogatepass")
            self._out += b"X" + struct.pack("<I", len(data)) + data
            self._put(value)
        elif type(value) is bytes:
            self._reduce("_codecs.encode", (value.decode("latin-1"), "latin1"), value)
        elif type(value) is tuple:
            self._save_tuple(value)
        elif type(value) is list:
            self._out += b"]"
            self._put(value)
            self._batched(value, b"e")
        elif isinstance(value, InertOrderedDict):
            self._reduce("collections.OrderedDict", (), value)
            if value.attributes:
                self._save(value.attributes)
                self._out += b"b"
            self._batched(list(value.items()), b"u")
        elif type(value) is dict:
            self._out += b"}"
            self._put(value)
            self._batched(list(value.items()), b"u")
        elif isinstance(value, TensorRef):
            self._save_tensor(value)
        elif isinstance(value, ParameterRef):
            args: tuple[object, ...] = (value.data, value.requires_grad, value.hooks)
            if value.state is not None:
                self._reduce(
                    "torch._utils._rebuild_parameter_with_state", (*args, value.state), value
                )
            else:
                self._reduce("torch._utils._rebuild_parameter", args, value)
        elif isinstance(value, StorageRef):
            self._save_storage(value)
        elif isinstance(value, DtypeRef):
            self._global(f"torch.{value.name}")
        elif isinstance(value, DeviceRef):
            self._reduce("torch.device", value.args, value)
        elif isinstance(value, SizeRef):
            self._reduce("torch.Size", (value.dims,), value)
        elif type(value) in (set, frozenset):
            assert isinstance(value, set | frozenset)
            self._reduce(f"builtins.{type(value).__name__}", (list(value),), value)
        elif type(value) is complex:
            assert isinstance(value, complex)
            self._reduce("builtins.complex", (value.real, value.imag), value)
        elif type(value) is bytearray:
            assert isinstance(value, bytearray)
            self._reduce("builtins.bytearray", (bytes(value),), value)
        else:
            raise _MalformedPickle(f"cannot write a {type(value).__name__}")

    def _save_int(self, value: int) -> None:
        if 0 <= value < 256:
            self._out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self._out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self._out += b"J" + struct.pack("<i", value)
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            if len(data) < 256:
                self._out += b"\x8a" + bytes([len(data)]) + data
            else:
                self._out += b"\x8b" + struct.pack("<I", len(data)) + data

    def _save_tuple(self, value: tuple[object, ...]) -> None:
        if not value:
            self._out += b")"
            return
        if len(value) <= 3:
            for item in value:
                self._save(item)
            self._out += b"\x85\x86\x87"[len(value) - 1 : len(value)]
        else:
            self._out += b"("
            for item in value:
                self._save(item)
            self._out += b"t"
        self._put(value)

    def _batched(self, items: list[Any], opcode: bytes) -> None:
        for start in range(0, len(items), 1000):
            self._out += b"("
            for item in items[start : start + 1000]:
                if opcode == b"u":
                    self._save(item[0])
                    self._save(item[1])
                else:
                    self._save(item)
            self._out += opcode

    def _save_tensor(self, tensor: TensorRef) -> None:
        args: tuple[object, ...] = (
            tensor.storage,
            tensor.offset,
            tensor.size,
            tensor.stride,
            tensor.requires_grad,
            tensor.hooks,
        )
        if tensor.dtype is not None:
            self._reduce(
                "torch._utils._rebuild_tensor_v3", (*args, tensor.dtype, tensor.metadata), tensor
            )
        elif tensor.metadata is not None:
            self._reduce("torch._utils._rebuild_tensor_v2", (*args, tensor.metadata), tensor)
        else:
            self._reduce("torch._utils._rebuild_tensor_v2", args, tensor)

    def _save_storage(self, storage: StorageRef) -> None:
        key = self._storage_keys.get(id(storage))
        if key is None:
            key = self._storage_keys[id(storage)] = str(len(self.storages))
            self.storages.append((key, storage))
        # Written as "cpu": an inference copy must load anywhere, without map_location.
        self._out += b"("
        self._save("storage")
        self._global(f"torch.{storage.storage_type.name}")
        self._save(key)
        self._save("cpu")
        self._save(storage.numel)
        self._out += b"tQ"
