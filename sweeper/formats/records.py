"""Zip records as torch writes them: the central directory, record offsets, CRCs.

Only what ``torch.save`` writes: stored (uncompressed) records, 64-byte aligned, optional zip64.
Nothing here knows what a record holds.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sweeper.errors import FileRefused

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
