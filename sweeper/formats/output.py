"""The inference output: the kept subtree as a fresh pickle, the records to copy, writing
and verification.
"""

from __future__ import annotations

import bisect
import errno
import functools
import io
import itertools
import json
import logging
import mmap
import os
import pickle
import queue
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Self, TypeVar

from sweeper import extents
from sweeper.errors import FileRefused
from sweeper.formats.checkpoint import (
    Checkpoint,
    Kind,
    Mode,
)
from sweeper.formats.records import (
    _ALIGNMENT,
    _CENTRAL,
    _CENTRAL_SIG,
    _DESCRIPTOR_SIG,
    _EOCD,
    _EOCD_SIG,
    _LOCAL,
    _LOCAL_SIG,
    _MAX_CONFIG_NODES,
    _MAX_FINGERPRINT_ITEMS,
    _MAX_PICKLE_BYTES,
    _U16,
    _U32,
    _ZIP64_EOCD,
    _ZIP64_EOCD_SIG,
    _ZIP64_LOCATOR,
    _ZIP64_LOCATOR_SIG,
    COPY_CHUNK,
    Archive,
    Record,
    _data_offset,
    _pread_exact,
    crcs_of_ranges,
    read_archive,
    read_record,
    record_data_offset,
)
from sweeper.formats.unpickler import (
    DeviceRef,
    DtypeRef,
    InertDefaultDict,
    InertDict,
    InertObject,
    InertOrderedDict,
    NumpyArray,
    NumpyDtype,
    NumpyScalar,
    ParameterRef,
    PathValue,
    SizeRef,
    StorageRef,
    TensorRef,
    TypeRef,
    _MalformedPickle,
    _no_build,
    load_inert,
    numpy_scalar_value,
    walk_values,
)

log = logging.getLogger(__name__)

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
        return numpy_scalar_value(value)
    if value is None or isinstance(value, str | int | float | bool | bytes):
        return value
    raise FileRefused(path, f"config holds an unsupported value of type {type(value).__name__}")


def _portable_metadata(value: object, key: str, path: str) -> object:
    """A kept metadata value in a form ``torch.load(weights_only=True)`` accepts: configs,
    namespaces and Lightning's ``AttributeDict`` anywhere in it make it all plain data."""
    if type(value) in _PLAIN_SCALARS and key != "config":  # an epoch, a score: nothing to walk
        return value
    foreign = (InertObject, InertDict)
    if key == "config" or any(isinstance(item, foreign) for item in walk_values(value)):
        try:
            return PlainData(_plain_config(value, path))
        except RecursionError:
            raise FileRefused(path, f"metadata key {key!r} nests too deeply") from None
    if isinstance(value, NumpyScalar):
        number = numpy_scalar_value(value)
        if number is None:
            raise FileRefused(path, f"metadata key {key!r} holds an unsupported numpy scalar")
        return number
    for item in walk_values(value):
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

    What is weights, training state and metadata is the checkpoint's layout family's word
    (``sweeper.formats.families``).  Kept: the model keys as they are and every metadata key,
    configs and namespaces turned into plain containers; dropped: training state (optimizer,
    scheduler, AMP scaler, RNG state, ...) and what the copy cannot carry.
    """
    path = checkpoint.path
    description = checkpoint.description
    if checkpoint.kind is not Kind.FULL:
        if checkpoint.kind is Kind.UNREDUCIBLE:
            raise FileRefused(path, f"cannot reduce it: {description.reason}")
        if checkpoint.kind is Kind.OTHER:
            raise FileRefused(path, "not a full training checkpoint: no model weights")
        raise FileRefused(path, f"already {_article(checkpoint.kind)}; nothing to extract")
    root = checkpoint.root
    assert isinstance(root, dict) and description.weights_key is not None
    weights = root[description.weights_key]
    if not isinstance(weights, dict):
        raise FileRefused(path, f"{description.weights_key!r} is not a state dict")
    if mode is Mode.WEIGHTS:
        return weights
    kept: dict[object, object] = {}
    for key, value in root.items():
        role = description.roles[key]
        if role == "model":
            kept[key] = value
        elif role == "metadata":
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
    # Where the source record's data starts, as torch lays it out: the copy puts its data at
    # the same offset modulo _SHARE_BLOCK, so that its blocks can be the source's (None: 64).
    source_data_offset: int | None = None


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
    writer = _PickleWriter()
    pickled = _written(checkpoint, mode, lambda selected: writer.dump(selected))
    entries = _output_entries(checkpoint, _inline("data.pkl", pickled), writer.storages, provenance)
    source_keys = {new_key: storage.key for new_key, storage in writer.storages}
    return OutputPlan(tuple(entries), _layout(entries)[1], source_keys)


def output_size(checkpoint: Checkpoint, mode: Mode, provenance: Provenance | None = None) -> int:
    """``plan_output(checkpoint, mode, provenance).total_size``, without writing the pickle: its
    length is counted by :class:`_PickleSizer`, the archive's from the records' sizes alone.
    What a plan of every full checkpoint costs when only the bytes it frees are wanted; the
    plan itself (its CRCs) is made when a copy is written or an existing one judged."""
    sizer = _PickleSizer()
    pickled = _written(checkpoint, mode, sizer.size)
    entry = OutputEntry("data.pkl", pickled, 0, None, None)  # no CRC: it takes no room
    return _archive_size(_output_entries(checkpoint, entry, sizer.storages, provenance))


_W = TypeVar("_W")


def _written(checkpoint: Checkpoint, mode: Mode, write: Callable[[object], _W]) -> _W:
    """``write`` (a dump, or a count) of the object an extraction writes; FileRefused when it
    cannot be written."""
    selected = select_output(checkpoint, mode)
    try:
        return write(selected)
    except _MalformedPickle as error:
        raise FileRefused(checkpoint.path, f"cannot write the output: {error}") from None
    except RecursionError:
        raise FileRefused(checkpoint.path, "refused: the pickle nests too deeply") from None


def _output_entries(
    checkpoint: Checkpoint,
    pickle_entry: OutputEntry,
    storages: list[tuple[str, StorageRef]],
    provenance: Provenance | None,
) -> list[OutputEntry]:
    """The output's records, in the order torch writes them: the pickle, the version records,
    the storages it names (copied from the source) and the provenance record."""
    byteorder = b"little"
    if "byteorder" in checkpoint.archive.records:
        byteorder = b"big" if checkpoint.archive.records["byteorder"].size == 3 else b"little"
    entries = [
        pickle_entry,
        _inline(".format_version", b"1"),
        _inline(".storage_alignment", str(_ALIGNMENT).encode()),
        _inline("byteorder", byteorder),
    ]
    prefix = checkpoint.archive.prefix
    for new_key, storage in storages:
        source = checkpoint.archive.data_record(storage.key)
        assert source is not None  # open_checkpoint checked every storage has its record
        at = _torch_data_offset(source, prefix) if source.size >= _SHARE_MIN_BYTES else None
        entries.append(OutputEntry(f"data/{new_key}", source.size, source.crc32, None, source, at))
    entries.append(_inline("version", b"3\n"))
    if provenance is not None:
        entries.append(_inline(PROVENANCE_RECORD, provenance.encode()))
    return entries


# Sharing blocks with the source (sweeper.extents) needs each record's data at the same offset
# modulo the filesystem block as in the source.  4 KiB is the block of XFS, btrfs and ext4 as
# made by default.  A record too small to hold a few whole blocks is not worth the padding (up
# to 4 KiB): it is packed at 64 bytes, as torch packs it, and copied.
_SHARE_BLOCK = 4096
_SHARE_MIN_BYTES = 64 * 1024


def _torch_data_offset(record: Record, prefix: str) -> int:
    """Where torch's writer puts ``record``'s data: after its local header, its name, a zip64
    field when the size or offset needs one and an ``FB`` padding field, at the next 64-byte
    boundary (caffe2's ``getPadding``).  Read from the directory alone, so planning reads
    nothing more; for a file written otherwise it may be wrong, and then that record is copied
    rather than shared -- the copy is the same either way."""
    name = f"{prefix}/{record.name}".encode()
    start = record.header_offset + _LOCAL.size + len(name) + 4
    if _needs_zip64(record.header_offset, record.size):
        start += 4 + (16 if record.size >= _U32 else 0) + (8 if record.header_offset >= _U32 else 0)
    return start + (-start) % _ALIGNMENT


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
    if entry.source_data_offset is not None:  # at the source's offset modulo the block
        padding = (entry.source_data_offset - start) % _SHARE_BLOCK
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


def _archive_size(entries: list[OutputEntry]) -> int:
    """``_layout(entries)[1]``, from the lengths alone: no header is built."""
    offset = 0
    central = 0
    for entry in entries:
        name = len(_ARCHIVE_PREFIX) + 1 + len(entry.name.encode())
        zip64 = _needs_zip64(offset, entry.size)
        start = offset + _LOCAL.size + name + (20 if zip64 else 0) + 4  # zip64 and FB fields
        if entry.source_data_offset is not None:
            start += (entry.source_data_offset - start) % _SHARE_BLOCK
        else:
            start += (-start) % _ALIGNMENT
        descriptor = (24 if zip64 else 16) if entry.size else 0
        central += _CENTRAL.size + name + (28 if zip64 else 0)
        offset = start + entry.size + descriptor
    return offset + central + _ZIP64_EOCD.size + _ZIP64_LOCATOR.size + _EOCD.size


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


@dataclass(frozen=True)
class Written:
    """What :func:`write_output` did."""

    # By record: where its local header is and the CRC-32 of its data, both read back from the
    # output file, the header found byte for byte as planned.
    read_back: dict[str, tuple[int, int]]
    shared_bytes: int  # bytes of records whose blocks are the source's own: cloned, not written


# A record whose slot in the source (its local header up to the next record's) is larger than
# this, or an inline one larger than this, is written alone; smaller ones are written in runs
# of about this much output: buffers that stay in the CPU's caches, reused from run to run.
_RUN_BYTES = 1024 * 1024


def write_output(
    source_fd: int,
    source: Checkpoint,
    plan: OutputPlan,
    out_fd: int,
    should_stop: Callable[[], bool] = lambda: False,
    *,
    share: bool = False,
    make_room: Callable[[int, int], None] = lambda unshared, shared: None,
) -> Written:
    """Write the planned archive to ``out_fd`` (positioned at 0), copying storage records from
    ``source_fd``.  ``should_stop`` is polled between runs and chunks so a daemon can abort a
    long copy promptly.

    Small records (a few KB each, thousands of them in some models) are written in runs of
    about 1 MiB of output (``_RUN_BYTES``), so that they cost a few system calls per run
    rather than several per record.  A run's source records, where they follow one another
    in the source, are read with one pread, and each one's local header is checked against
    the central directory from those bytes; the run's output (sweeper's own local headers,
    the data, the data descriptors) is assembled in one buffer and written with one pwrite.
    The output's layout is the one :func:`_layout` plans, whatever the source's: the source's
    local headers cannot be copied as they are (other names, other alignment), and copies
    already on disk must keep matching their plan.  A record too large for a run is copied
    alone, in the kernel (``copy_file_range``), 8 MiB at a time.

    Everything written is read back through the output file on a second thread while the
    next run or chunk is written: each local header is compared byte for byte with the
    planned one and each record's data is CRC'd (``verify_output`` compares the CRCs with the
    source's, so a corrupt source record is refused).  Writeback is started every ~8 MiB
    (``sync_file_range``), so the final fsync finds little left to do.

    With ``share``, the whole blocks of each storage record are first cloned from the source
    (``sweeper.extents``: no data read or written, no new space), where the filesystem can;
    only the bytes around them are then written.  Before the first byte is written,
    ``make_room(unshared, shared)`` is told how many bytes still need space: a full disk is
    refused there, with nothing written.  A record with cloned blocks is read back whole at
    the end, from the disk itself where the filesystem allows (else ``verify_output`` reads it).
    """
    entries = plan.entries
    placed, total = _layout(list(entries))
    archive = source.archive
    starts: dict[int, int] = {}

    def source_start(index: int) -> int:  # asked only for records copied alone or cloned
        if index not in starts:
            record = entries[index].source
            assert record is not None
            starts[index] = record_data_offset(source_fd, archive, record, source.path)
        return starts[index]

    cloned = (
        _clone_records(source_fd, out_fd, plan, placed, source_start, should_stop) if share else {}
    )
    shared = sum(length for _, length in cloned.values())
    make_room(total - shared, shared)
    read_back = _ReadBack(out_fd, source.path)
    writeback = _Writeback(out_fd)
    runs = _RunWriter(source_fd, archive, source.path, out_fd)
    try:
        run: list[int] = []
        run_source = 0  # source bytes the run reads
        for index, entry in enumerate(entries):
            header_offset, header, descriptor = placed[index]
            record = entry.source
            slot = 0 if record is None else runs.slot_end(record) - record.header_offset
            alone = index in cloned or max(slot, entry.size) > _RUN_BYTES
            end = header_offset + len(header) + entry.size + len(descriptor)
            if run and (alone or end - placed[run[0]][0] > _RUN_BYTES or run_source > _RUN_BYTES):
                read_back.feed(*runs.write(entries, placed, run, should_stop))
                writeback.wrote_up_to(header_offset)
                run, run_source = [], 0
            if not alone:
                run.append(index)
                run_source += slot
                continue
            _write_all(out_fd, header, header_offset)
            data_at = header_offset + len(header)
            if entry.inline is not None:  # read back by verify_output
                _write_all(out_fd, entry.inline, data_at)
            else:
                head, middle = cloned.get(index, (entry.size, 0))
                feed = _unread
                if not middle:
                    read_back.feed(header_offset, len(header), [(entry.name, header_offset, header,
                                                                 data_at, 0)])  # fmt: skip
                    feed = functools.partial(read_back.feed_chunk, entry.name)
                start = source_start(index)
                try:
                    for at, length in ((0, head), (head + middle, entry.size - head - middle)):
                        _copy_range(source_fd, start + at, out_fd, data_at + at, length,
                                    should_stop, feed, writeback.wrote_up_to)  # fmt: skip
                except EOFError:
                    raise FileRefused(source.path, "truncated while it was being read") from None
            _write_all(out_fd, descriptor, end - len(descriptor))
            writeback.wrote_up_to(end)
        if run:
            read_back.feed(*runs.write(entries, placed, run, should_stop))
        offset = placed[-1][0] + len(placed[-1][1]) + entries[-1].size + len(placed[-1][2])
        _write_all(out_fd, _central_directory(entries, placed, offset), offset)
        if os.fstat(out_fd).st_size != total:
            os.ftruncate(out_fd, total)
    finally:
        crcs = read_back.finish()
    sharing = [i for i in cloned if entries[i].name not in crcs]
    spans = [(placed[i][0] + len(placed[i][1]), entries[i].size) for i in sharing]
    from_disk = _crcs_from_disk(out_fd, spans, source.path, should_stop) if spans else None
    if from_disk is not None:
        for index, crc in zip(sharing, from_disk, strict=True):
            header_offset, header, _ = placed[index]
            if os.pread(out_fd, len(header), header_offset) == header:
                crcs[entries[index].name] = (header_offset, crc)
    return Written(crcs, shared)


class _RunWriter:
    """Writes runs of small records: one read of the source per stretch of consecutive
    records, one write of the output, through two buffers reused from run to run."""

    def __init__(self, source_fd: int, archive: Archive, path: str, out_fd: int) -> None:
        self._source_fd = source_fd
        self._archive = archive
        self._path = path
        self._out_fd = out_fd
        self._source = bytearray()
        self._out = bytearray()
        # Where each source record's slot ends: at the next record's local header, as the
        # central directory orders them (it has checked that none overlaps the next).
        self._offsets = sorted(record.header_offset for record in archive.records.values())

    def slot_end(self, record: Record) -> int:
        after = bisect.bisect_right(self._offsets, record.header_offset)
        return self._offsets[after] if after < len(self._offsets) else self._archive.central_offset

    def write(
        self, entries: tuple[OutputEntry, ...], placed: list[tuple[int, bytes, bytes]],
        run: list[int], should_stop: Callable[[], bool],
    ) -> tuple[int, int, list[_Check]]:  # fmt: skip
        """Write the entries ``run`` (consecutive in the output); returns what to read back."""
        if should_stop():
            raise Interrupted
        start = placed[run[0]][0]
        last = placed[run[-1]]
        length = last[0] + len(last[1]) + entries[run[-1]].size + len(last[2]) - start
        datas = iter(self._read_source([e.source for i in run if (e := entries[i]).source]))
        if len(self._out) < length:
            self._out = bytearray(length)
        out = memoryview(self._out)
        checks: list[_Check] = []
        for index in run:
            entry = entries[index]
            header_offset, header, descriptor = placed[index]
            at = header_offset - start
            out[at : at + len(header)] = header
            at += len(header)
            out[at : at + entry.size] = entry.inline if entry.inline is not None else next(datas)
            out[at + entry.size : at + entry.size + len(descriptor)] = descriptor
            checks.append((entry.name, header_offset, header, start + at, entry.size))
        _write_all(self._out_fd, out[:length], start)
        return start, length, checks

    def _read_source(self, records: list[Record]) -> list[memoryview]:
        """The data of ``records``, each local header checked against the directory, read
        with one pread per stretch of records that follow one another in the source."""
        ends = [self.slot_end(record) for record in records]
        needed = sum(end - record.header_offset for record, end in zip(records, ends, strict=True))
        if len(self._source) < needed:
            self._source = bytearray(needed)
        buffer = memoryview(self._source)
        datas: list[memoryview] = []
        into = 0
        first = 0
        while first < len(records):
            last = first
            while last + 1 < len(records) and records[last + 1].header_offset == ends[last]:
                last += 1
            low, high = records[first].header_offset, ends[last]
            view = buffer[into : into + high - low]
            done = 0
            while done < len(view):
                got = os.preadv(self._source_fd, [view[done:]], low + done)
                if got == 0:
                    raise FileRefused(self._path, "truncated while it was being read")
                done += got

            def read(length: int, offset: int, what: str, view: memoryview = view,
                     low: int = low, high: int = high) -> bytes:  # fmt: skip
                if offset + length > high:
                    raise FileRefused(self._path, f"malformed archive: {what} runs into the next")
                return bytes(view[offset - low : offset - low + length])

            for record, end in zip(records[first : last + 1], ends[first : last + 1], strict=True):
                at = _data_offset(read, self._archive, record, self._path)
                if at + record.size > end:
                    raise FileRefused(
                        self._path, f"malformed archive: record {record.name!r} overlaps the next"
                    )
                datas.append(view[at - low : at - low + record.size])
            into += high - low
            first = last + 1
        return datas


# What to read back and check: (record, local header offset or -1 to carry on the record's CRC,
# the planned local header, data offset, data length).
_Check = tuple[str, int, bytes, int, int]


class _Writeback:
    """Starts the disk writing the output every ~8 MiB written (``sync_file_range``)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._started = 0  # writeback started for the bytes before this offset

    def wrote_up_to(self, end: int) -> None:
        if end - self._started >= COPY_CHUNK:
            _start_writeback(self._fd, self._started, end - self._started)
            self._started = end


def _unread(offset: int, length: int) -> None:
    """A chunk of a record read back whole later."""


_DIRECT_ALIGNMENT = 4096  # what O_DIRECT asks of offsets, lengths and buffers, at most


def _crcs_from_disk(
    fd: int, spans: list[tuple[int, int]], path: str, should_stop: Callable[[], bool]
) -> list[int] | None:
    """CRC-32 of each (offset, length) span of ``fd`` read from the disk itself (``O_DIRECT``),
    on two threads: a record whose blocks were cloned is in no page cache, and the disk is what
    is being proven.  None where the file cannot be read so (tmpfs; then ``verify_output``
    reads it as any other)."""
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return None
    results = [0] * len(spans)
    order = sorted(range(len(spans)), key=lambda i: spans[i][1], reverse=True)
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work() -> None:
        try:
            view = memoryview(mmap.mmap(-1, COPY_CHUNK))  # page-aligned, as O_DIRECT wants
            while True:
                with lock:
                    if not order or errors:
                        return
                    index = order.pop(0)
                offset, length = spans[index]
                at = offset - offset % _DIRECT_ALIGNMENT
                crc = 0
                while at < offset + length:
                    if should_stop():
                        raise Interrupted
                    blocks = -(-(offset + length - at) // _DIRECT_ALIGNMENT)
                    want = min(COPY_CHUNK, blocks * _DIRECT_ALIGNMENT)
                    got = os.preadv(direct, [view[:want]], at)
                    if got <= 0:
                        raise FileRefused(path, "read back: the copy ends early")
                    crc = zlib.crc32(
                        view[max(offset, at) - at : min(offset + length, at + got) - at], crc
                    )
                    at += got
                results[index] = crc
        except BaseException as error:  # re-raised in the calling thread
            with lock:
                errors.append(error)
        # The buffer is not closed here: the error's traceback may still hold a slice of it.

    try:
        helper = threading.Thread(target=work, name="read-back-disk", daemon=True)
        helper.start()
        work()
        helper.join()
    finally:
        os.close(direct)
    if errors:
        error = errors[0]
        if isinstance(error, OSError) and error.errno == errno.EINVAL:
            return None  # O_DIRECT opened but refused here: read as any other
        raise error
    return results


_CLONE_CHUNK = 1024 * 1024 * 1024  # between two looks at should_stop


def _clone_records(
    source_fd: int,
    out_fd: int,
    plan: OutputPlan,
    placed: list[tuple[int, bytes, bytes]],
    source_start: Callable[[int], int],
    should_stop: Callable[[], bool],
) -> dict[int, tuple[int, int]]:
    """Clone the whole blocks of each storage record laid out for it (``source_data_offset``)
    whose data sits at the same offset modulo the block as in the source; (bytes before them,
    bytes cloned) by entry index.  The first clone the filesystem refuses ends the trying: the
    rest is copied."""
    try:
        block = extents.block_size(out_fd)
    except OSError:
        return {}
    cloned: dict[int, tuple[int, int]] = {}
    for index, (entry, (header_offset, header, _)) in enumerate(
        zip(plan.entries, placed, strict=True)
    ):
        start = header_offset + len(header)
        if entry.source_data_offset is None or entry.source is None:
            continue
        source_at = source_start(index)
        if (source_at - start) % block:  # torch did not write it; or blocks of over 4 KiB
            continue
        head = (-start) % block
        middle = max(0, entry.size - head) // block * block
        done = 0
        try:
            while done < middle:
                if should_stop():
                    raise Interrupted
                length = min(_CLONE_CHUNK, middle - done)
                at = head + done
                extents.clone_range(source_fd, source_at + at, out_fd, start + at, length)
                done += length
        except extents.CannotShare as refused:
            log.debug("%s: blocks not shared (%s); copying", entry.name, refused)
            return {**cloned, index: (head, done)} if done else cloned
        if done:
            cloned[index] = (head, done)
    return cloned


class _ReadBack:
    """Reads what was written back from the output on a helper thread: compares each local
    header with the planned one and keeps a CRC per record."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd = fd
        self._path = path
        self._jobs: queue.SimpleQueue[tuple[int, int, list[_Check]] | None] = queue.SimpleQueue()
        self._crcs: dict[str, tuple[int, int]] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="read-back", daemon=True)
        self._thread.start()

    def feed(self, offset: int, length: int, checks: list[_Check]) -> None:
        """Read back ``length`` bytes at ``offset`` and make the checks on them."""
        self._jobs.put((offset, length, checks))

    def feed_chunk(self, name: str, offset: int, length: int) -> None:
        """Read back a chunk of record ``name``'s data, carrying on its CRC."""
        self._jobs.put((offset, length, [(name, -1, b"", offset, length)]))

    def _run(self) -> None:
        buffer = bytearray()
        while (job := self._jobs.get()) is not None:
            if self._error is not None:
                continue
            offset, length, checks = job
            try:
                if len(buffer) < length:
                    buffer = bytearray(length)
                view = memoryview(buffer)[:length]
                done = 0
                while done < length:
                    got = os.preadv(self._fd, [view[done:]], offset + done)
                    if got <= 0:
                        raise FileRefused(self._path, "read back: the copy ends early")
                    done += got
                for name, header_at, header, data_at, size in checks:
                    crc = 0
                    if header_at < 0:
                        header_at, crc = self._crcs[name]
                    elif view[header_at - offset : header_at - offset + len(header)] != header:
                        raise FileRefused(self._path, f"read back: record {name!r}'s local "
                                                      "header differs: write error")  # fmt: skip
                    data = view[data_at - offset : data_at - offset + size]
                    self._crcs[name] = (header_at, zlib.crc32(data, crc))
            except BaseException as error:  # re-raised by finish()
                self._error = error

    def finish(self) -> dict[str, tuple[int, int]]:
        self._jobs.put(None)
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
    wrote_up_to: Callable[[int], None],
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
        copied_chunk(dst_offset + done, copied)
        done += copied
        wrote_up_to(dst_offset + done)


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


def _packed_size(plan: OutputPlan) -> int:
    """The size of the plan's archive with every record packed at 64 bytes, as copies were laid
    out before their blocks could be shared: such a copy is as good as one laid out now."""
    entries = [replace(entry, source_data_offset=None) for entry in plan.entries]
    return _layout(entries)[1]


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
    read_back: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """Prove the written archive is exactly the plan: every record's CRC matches the source's
    (``read_back`` holds, by record, the local header offset and the CRC already read back
    from this file by ``write_output``: used where the directory points at that header),
    and its pickle describes the same tensors (dtype, shape, stride, offset, storage sharing)
    and the same metadata as the kept part of the source.  Raises FileRefused otherwise."""
    archive = read_archive(out_fd, path)
    if archive.file_size != plan.total_size and archive.file_size != _packed_size(plan):
        raise FileRefused(path, "verification failed: output size differs from the plan")
    read_back = read_back or {}
    crcs = [0] * len(plan.entries)
    unread, spans = [], []
    for index, entry in enumerate(plan.entries):
        record = archive.records.get(entry.name)
        if record is None or record.size != entry.size or record.crc32 != entry.crc32:
            raise FileRefused(path, f"verification failed: record {entry.name!r} differs")
        header_offset, crc = read_back.get(entry.name, (-1, 0))
        if header_offset == record.header_offset:  # its local header and data, read back
            crcs[index] = crc
        else:
            unread.append(index)
            spans.append((record_data_offset(out_fd, archive, record, path), record.size))
    for index, crc in zip(unread, crcs_of_ranges(out_fd, spans, path), strict=True):
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


class _Output(Protocol):
    """Where a writer appends its opcodes: a bytearray, or a count (:class:`_ByteCount`)."""

    def __iadd__(self, data: bytes | memoryview, /) -> Self: ...


class _PickleWriter:
    def __init__(self) -> None:
        self._written = bytearray()
        self._out: _Output = self._written
        self._memo: dict[int, int] = {}
        self._alive: list[object] = []  # keeps memoized objects alive so their ids stay unique
        self._globals: dict[str, int] = {}
        self._storage_keys: dict[int, str] = {}
        self.storages: list[tuple[str, StorageRef]] = []

    def dump(self, value: object) -> bytes:
        self._out += b"\x80\x02"
        self._save(value)
        self._out += b"."
        return bytes(self._written)

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


class _ByteCount:
    """A :class:`_PickleSizer`'s output: counts what is appended, keeps nothing."""

    __slots__ = ("length",)

    def __init__(self) -> None:
        self.length = 0

    def __iadd__(self, data: bytes | memoryview, /) -> Self:
        self.length += len(data)
        return self


class _PickleSizer(_PickleWriter):
    """The length of what :class:`_PickleWriter` writes for a value, and the storages it
    names, without writing it: the same walk, with the same memo, summing the opcodes'
    lengths.  The values most pickles are made of (strings, ints, memo references, plain
    configs) are counted without making their bytes."""

    def __init__(self) -> None:
        super().__init__()
        self._count = _ByteCount()
        self._out = self._count

    def size(self, value: object) -> int:
        self._save(value)
        return len(b"\x80\x02") + self._count.length + len(b".")

    def _put(self, value: object) -> None:
        index = len(self._memo)
        self._memo[id(value)] = index
        self._alive.append(value)
        self._count.length += 2 if index < 256 else 5

    def _get(self, index: int) -> None:
        self._count.length += 2 if index < 256 else 5

    def _save_plain(self, value: PlainData) -> None:
        buffer = io.BytesIO()
        pickler = pickle.Pickler(buffer, protocol=2)
        pickler.fast = True
        pickler.dump(value.value)
        self._count.length += buffer.tell() - 3  # without PROTO and STOP

    def _save(self, value: object) -> None:
        kind = type(value)
        if kind is str:
            memo = self._memo.get(id(value))
            if memo is not None:
                self._get(memo)
                return
            assert isinstance(value, str)
            length = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
            self._count.length += 5 + length  # BINUNICODE, its length, the text
            self._put(value)
        elif kind is int:
            assert isinstance(value, int)
            self._count.length += _int_size(value)
        else:
            super()._save(value)


def _int_size(value: int) -> int:
    """The length of ``_PickleWriter._save_int(value)``'s opcode."""
    if 0 <= value < 256:
        return 2
    if 0 <= value < 65536:
        return 3
    if -(2**31) <= value < 2**31:
        return 5
    length = (value.bit_length() + 8) // 8
    return 2 + length if length < 256 else 5 + length
