"""The append-only JSON-lines ledger of what sweeper did and how many bytes it reclaimed.

One record per line, each line written with a single ``os.write`` on an ``O_APPEND`` descriptor
and fsynced before the writer moves on, so the ledger can be trusted as the proof that an
inference copy was written before its source was deleted.  Writers serialise on a private lock
file (``<ledger>.lock``) so a one-shot sweep and the daemon never interleave lines; the daemon's
"only one instance per state directory" lock is a different file (``<ledger>.pid``) so sweeps
still work while the daemon runs.

Paths are held in memory as ``os.fsdecode`` strings (surrogateescape).  On disk (pure-ASCII JSON)
they are stored as clean text (undecodable bytes shown as ``\\xNN``) plus, only when the name is
not valid UTF-8, the exact bytes in base64 under ``<field>_b64``; so every line stays strict JSON
and every name is recoverable.

Bytes are raw ints here; formatting sizes for people is the presenter's job.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import pwd
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, Final, Literal, Protocol

from sweeper.errors import AlreadyRunning, FileRefused, LedgerUnavailable
from sweeper.ledger_views import append_to_view

logger = logging.getLogger(__name__)

#: Written into every line as ``"v"``; readers skip lines of a format they do not know.
FORMAT_VERSION: Final = 1

LOCK_SUFFIX: Final = ".lock"
INSTANCE_LOCK_SUFFIX: Final = ".pid"
ACTION_LOCK_SUFFIX: Final = ".actions.lock"

_FILE_MODE: Final = 0o600
# Traversable, not listable: users reach their own views (sweeper.ledger_views) through it, while
# every file in it stays 0600.
_DIR_MODE: Final = 0o711
# O_NONBLOCK so that a FIFO planted where the ledger should be cannot hang the open; it has no
# effect on regular files, and anything that is not a regular file is refused right after opening.
_OPEN_SAFE: Final = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_PATH_FIELDS: Final = ("path", "output", "root")


class Action:
    """The action names sweeper writes.

    Plain strings rather than an enum: a reader keeps records whose action it does not know, so a
    newer sweeper can add actions without breaking an older ``sweeper report``.
    """

    EXTRACT: Final = "extract"
    REMOVE_TEMP: Final = "remove-temp"  # an interrupted extraction's temporary file, cleaned up
    REFRESH: Final = "refresh"  # a stale inference copy replaced: written, and the old copy's bytes
    EXTRACT_INTENT: Final = "extract-intent"  # a copy is about to be written (or refreshed)
    DELETE_INTENT: Final = "delete-intent"
    DELETE: Final = "delete"
    FAIL: Final = "fail"
    CARRY: Final = "carry"  # the totals of records compacted away (sweeper.ledger_segments)
    ABANDON: Final = "abandon"  # an interrupted run's intent that the tree shows came to nothing
    # The undo window (sweeper.trash): a demoted checkpoint moved into the trash (no bytes
    # freed yet), moved back by ``sweeper restore``, or purged (its bytes freed: counted here).
    TRASH_INTENT: Final = "trash-intent"
    TRASH: Final = "trash"
    RESTORE: Final = "restore"
    PURGE_INTENT: Final = "purge-intent"
    PURGE: Final = "purge"


INTENTS: Final = frozenset(
    {Action.EXTRACT_INTENT, Action.DELETE_INTENT, Action.TRASH_INTENT, Action.PURGE_INTENT}
)
# The records that close an intent of the same run and path: its outcome, its failure, or what
# start-up reconciliation found (see sweeper.journal).
CLOSES: Final = {
    Action.EXTRACT_INTENT: frozenset({Action.EXTRACT, Action.REFRESH, Action.FAIL, Action.ABANDON}),
    Action.DELETE_INTENT: frozenset({Action.DELETE, Action.FAIL, Action.ABANDON}),
    Action.TRASH_INTENT: frozenset({Action.TRASH, Action.FAIL, Action.ABANDON}),
    Action.PURGE_INTENT: frozenset({Action.PURGE, Action.FAIL, Action.ABANDON}),
}


@dataclass(frozen=True)
class Metric:
    """The training metric a checkpoint was judged by (e.g. ``val_loss`` 0.231); may be NaN."""

    name: str
    value: float


@dataclass(frozen=True)
class LedgerRecord:
    """One line of the ledger.

    ``reclaimed_bytes`` is the net number of bytes this record freed (``bytes_deleted -
    bytes_written`` for a completed action; negative for a copy written without deleting anything).
    Only outcome records carry it: intent records (``delete-intent``) have ``None``, so a crash
    between intent and outcome neither loses nor double-counts space.  Totals count only records
    whose ``reclaimed_bytes`` is not ``None``.  ``file_id`` (dev, inode, size, mtime_ns) is the
    file an intent is about as it was then -- the checkpoint a ``delete-intent`` will unlink,
    the stale copy an ``extract-intent`` replaces -- so that start-up reconciliation can tell
    from the tree what an interrupted run did.  ``records`` is set on a ``carry`` record only:
    how many outcome records its totals stand for.  ``bytes_shared`` (a copy's outcome, on a
    filesystem that shares blocks) is the part of ``bytes_written`` whose blocks are its
    source's: it took no new space, and stays allocated when the source is deleted.
    """

    time: datetime
    host: str
    action: str
    path: str
    owner: str
    uid: int
    epoch: int | None
    metric: Metric | None
    reason: str
    output: str | None
    bytes_deleted: int
    bytes_written: int
    reclaimed_bytes: int | None
    run_id: str
    root: str
    file_id: tuple[int, int, int, int] | None = None
    records: int | None = None
    folder_id: tuple[int, int] | None = None
    bytes_shared: int = 0

    def __post_init__(self) -> None:
        if self.time.utcoffset() is None:
            raise ValueError(f"ledger record time must be timezone-aware, got {self.time!r}")
        if self.time.tzinfo is not timezone.utc:
            object.__setattr__(self, "time", self.time.astimezone(timezone.utc))
        for name in ("uid", "bytes_deleted", "bytes_written", "bytes_shared"):
            _require_int(name, getattr(self, name), minimum=0)
        if self.epoch is not None:
            _require_int("epoch", self.epoch, minimum=None)
        if self.reclaimed_bytes is not None:
            _require_int("reclaimed_bytes", self.reclaimed_bytes, minimum=None)
        if self.records is not None:
            _require_int("records", self.records, minimum=0)
        if self.folder_id is not None:
            if len(self.folder_id) != 2:
                raise ValueError(f"folder_id is not (dev, ino): {self.folder_id!r}")
            for number in self.folder_id:
                _require_int("folder_id", number, minimum=0)
        if self.file_id is not None:
            if len(self.file_id) != 4:
                raise ValueError(f"file_id is not (dev, ino, size, mtime_ns): {self.file_id!r}")
            for number in self.file_id:
                _require_int("file_id", number, minimum=0)

    @property
    def is_outcome(self) -> bool:
        """True when the record counts towards reclaimed-space totals."""
        return self.reclaimed_bytes is not None


def utc_now() -> datetime:
    """The time records are stamped with; callers pass it in as their clock."""
    return datetime.now(timezone.utc)


def new_record(
    *,
    now: datetime,
    action: str,
    path: str,
    owner: str,
    uid: int,
    reason: str,
    run_id: str,
    root: str,
    epoch: int | None = None,
    metric: Metric | None = None,
    output: str | None = None,
    bytes_deleted: int = 0,
    bytes_written: int = 0,
    reclaimed_bytes: int | None = None,
    host: str | None = None,
    file_id: tuple[int, int, int, int] | None = None,
    records: int | None = None,
    folder_id: tuple[int, int] | None = None,
    bytes_shared: int = 0,
) -> LedgerRecord:
    """Build a record stamped with ``now`` (converted to UTC) and this machine's host name.

    The caller passes ``now`` so nothing here reads the clock.  ``host`` defaults to
    ``socket.gethostname()``.
    """
    return LedgerRecord(
        time=now,
        host=socket.gethostname() if host is None else host,
        action=action,
        path=path,
        owner=owner,
        uid=uid,
        epoch=epoch,
        metric=metric,
        reason=reason,
        output=output,
        bytes_deleted=bytes_deleted,
        bytes_written=bytes_written,
        reclaimed_bytes=reclaimed_bytes,
        run_id=run_id,
        root=root,
        file_id=file_id,
        records=records,
        folder_id=folder_id,
        bytes_shared=bytes_shared,
    )


def user_name(uid: int) -> str:
    """The login name for ``uid``, or the uid as a string when the user no longer exists."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --- encoding -------------------------------------------------------------------------------------


def _require_int(name: str, value: object, *, minimum: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"ledger record {name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"ledger record {name} must be >= {minimum}, got {value}")


def _clean_text(text: str) -> str:
    """``text`` with no lone surrogates, so strict UTF-8 and strict JSON parsers accept it.

    Bytes smuggled in by surrogateescape come out as ``\\xNN``, as ``os.fsencode`` shows them.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        # A surrogate surrogateescape did not produce: nothing to recover, just keep it visible.
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _raw_path_bytes(path: str) -> bytes | None:
    """The exact bytes of ``path`` when they are not valid UTF-8, else None."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return os.fsencode(path)
        except UnicodeEncodeError:
            return None
    return None


def _format_time(time: datetime) -> str:
    return time.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: str) -> datetime:
    # datetime.fromisoformat accepts a trailing "Z" only from Python 3.11 on.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.utcoffset() is None:
        raise ValueError(f"time {text!r} has no UTC offset")
    return parsed.astimezone(timezone.utc)


def _metric_value_to_json(value: float) -> float | str:
    # Strict JSON has no NaN/Infinity, and a diverged run's loss is exactly where NaN turns up.
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _metric_value_from_json(value: object) -> float:
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return float(value.replace("Infinity", "inf"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"metric value {value!r} is not a number")


def encode_record(record: LedgerRecord) -> bytes:
    """The record as one ledger line: strict JSON, UTF-8, ending in exactly one newline."""
    obj: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "time": _format_time(record.time),
        "host": _clean_text(record.host),
        "action": _clean_text(record.action),
        "run_id": _clean_text(record.run_id),
        "root": None,
        "path": None,
        "output": None,
        "owner": _clean_text(record.owner),
        "uid": record.uid,
        "epoch": record.epoch,
        "metric": None,
        "reason": _clean_text(record.reason),
        "bytes_deleted": record.bytes_deleted,
        "bytes_written": record.bytes_written,
        "reclaimed_bytes": record.reclaimed_bytes,
    }
    for field in _PATH_FIELDS:
        value: str | None = getattr(record, field)
        if value is None:
            continue
        obj[field] = _clean_text(value)
        raw = _raw_path_bytes(value)
        if raw is not None:
            obj[field + "_b64"] = base64.b64encode(raw).decode("ascii")
    if record.metric is not None:
        obj["metric"] = {
            "name": _clean_text(record.metric.name),
            "value": _metric_value_to_json(record.metric.value),
        }
    if record.file_id is not None:
        obj["file_id"] = list(record.file_id)
    if record.records is not None:
        obj["records"] = record.records
    if record.folder_id is not None:
        obj["folder_id"] = list(record.folder_id)
    if record.bytes_shared:
        obj["bytes_shared"] = record.bytes_shared
    # ensure_ascii: pure-ASCII lines, so no tool splits a record at U+2028 or NEL in a file name.
    line = json.dumps(obj, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return line.encode("ascii") + b"\n"


def _get(
    obj: dict[str, Any], key: str, kind: type | tuple[type, ...], optional: bool = False
) -> Any:
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ValueError(f"field {key!r} has unexpected value {value!r}")
    return value


def _decode_path(obj: dict[str, Any], field: str, optional: bool) -> str | None:
    text: str | None = _get(obj, field, str, optional=optional)
    encoded = obj.get(field + "_b64")
    if text is None or encoded is None:
        return text
    if not isinstance(encoded, str):
        raise ValueError(f"field {field + '_b64'!r} has unexpected value {encoded!r}")
    try:
        return os.fsdecode(base64.b64decode(encoded, validate=True))
    except binascii.Error as error:
        raise ValueError(f"field {field + '_b64'!r} is not base64: {error}") from None


def decode_record(line: bytes) -> LedgerRecord:
    """Parse one ledger line (newline optional); ValueError or TypeError if it is not one."""
    obj = json.loads(line.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    version = obj.get("v", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown ledger format version {version!r}")
    metric_obj = _get(obj, "metric", dict, optional=True)
    metric = None
    if metric_obj is not None:
        metric = Metric(
            name=_get(metric_obj, "name", str),
            value=_metric_value_from_json(metric_obj.get("value")),
        )
    root = _decode_path(obj, "root", optional=False)
    path = _decode_path(obj, "path", optional=False)
    file_id = obj.get("file_id")
    if file_id is not None and (
        not isinstance(file_id, list)
        or len(file_id) != 4
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in file_id)
    ):
        raise ValueError(f"field 'file_id' has unexpected value {file_id!r}")
    assert root is not None and path is not None  # optional=False guarantees it
    return LedgerRecord(
        time=_parse_time(_get(obj, "time", str)),
        host=_get(obj, "host", str),
        action=_get(obj, "action", str),
        path=path,
        owner=_get(obj, "owner", str),
        uid=_get(obj, "uid", int),
        epoch=_get(obj, "epoch", int, optional=True),
        metric=metric,
        reason=_get(obj, "reason", str),
        output=_decode_path(obj, "output", optional=True),
        bytes_deleted=_get(obj, "bytes_deleted", int),
        bytes_written=_get(obj, "bytes_written", int),
        reclaimed_bytes=_get(obj, "reclaimed_bytes", int, optional=True),
        run_id=_get(obj, "run_id", str),
        root=root,
        file_id=None if file_id is None else (file_id[0], file_id[1], file_id[2], file_id[3]),
        records=_get(obj, "records", int, optional=True) if "records" in obj else None,
        folder_id=_int_pair(obj.get("folder_id")),
        bytes_shared=_get(obj, "bytes_shared", int) if "bytes_shared" in obj else 0,
    )


def _int_pair(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in value)
    ):
        raise ValueError(f"field 'folder_id' has unexpected value {value!r}")
    return (value[0], value[1])


# --- files and locks ------------------------------------------------------------------------------


def lock_path_for(ledger_path: str | os.PathLike[str]) -> str:
    """The writers' lock file that goes with ``ledger_path``."""
    return os.fspath(ledger_path) + LOCK_SUFFIX


def instance_lock_path_for(ledger_path: str | os.PathLike[str]) -> str:
    """The daemon's one-instance lock file that goes with ``ledger_path``."""
    return os.fspath(ledger_path) + INSTANCE_LOCK_SUFFIX


def _open_private(path: str, flags: int, *, create: bool) -> int:
    """Open ``path`` refusing symlinks and non-regular files; create it 0o600 if ``create``."""
    if create:
        flags |= os.O_CREAT
        parent = os.path.dirname(path)
        if parent:
            _make_ledger_dir(parent)
    try:
        fd = os.open(path, flags | _OPEN_SAFE, _FILE_MODE)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileRefused(path, "is a symlink; sweeper refuses to follow it") from None
        if error.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO or socket, or a directory
            raise FileRefused(path, "is not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FileRefused(path, "is not a regular file")
        # Back to blocking so flock(LOCK_EX) waits as intended.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_ledger_dir(path: str) -> None:
    """Create the ledger's folder, and any missing folder above it, unless it exists.

    The folder itself gets exactly ``_DIR_MODE``: mkdir's mode goes through the umask (0077 under
    the systemd units), which would close it to the users who read their views inside.
    """
    if os.path.isdir(path):
        return
    above = os.path.dirname(path)
    if above:
        os.makedirs(above, exist_ok=True)
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, _DIR_MODE)
    finally:
        os.close(fd)


def _fsync_directory(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all_at_once(fd: int, data: bytes) -> None:
    written = os.write(fd, data)
    if written != len(data):
        # Only a full disk or a signal gets here; the reader reports the partial line as torn.
        raise OSError(errno.EIO, f"short write to ledger: {written} of {len(data)} bytes")


class Ledger:
    """An open ledger whose writer lock is held until ``close()`` (or the end of the ``with``).

    Use ``with Ledger.open(path) as ledger: ledger.append(record)`` for a batch; ``append_record``
    for one record.
    """

    def __init__(self, path: str, fd: int, lock_fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._lock_fd: int | None = lock_fd
        self._owner = os.fstat(fd).st_uid
        # Set when a write failed part-way, so the next record starts on a line of its own.
        self._torn = False

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Ledger:
        """Take the writer lock (waiting for other writers), then open the ledger for appending.

        Creates the ledger and its lock file (mode 0o600, directory 0o711) when missing; raises
        ``FileRefused`` when either is a symlink or not a regular file.
        """
        path = os.fspath(path)
        lock_fd = _open_private(lock_path_for(path), os.O_RDWR, create=True)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            fd = cls._open_for_append(path)
        except BaseException:
            os.close(lock_fd)  # closing releases the flock
            raise
        return cls(path, fd, lock_fd)

    @staticmethod
    def _open_for_append(path: str) -> int:
        flags = os.O_APPEND | os.O_WRONLY
        try:
            fd = _open_private(path, flags | os.O_EXCL, create=True)
        except FileExistsError:
            fd = _open_private(path, flags, create=False)
        else:
            _fsync_directory(path)  # the new ledger's name must survive a crash too
            return fd
        try:
            _terminate_torn_line(path, fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def append(self, record: LedgerRecord) -> None:
        """Append one record with a single write, then fsync it; then copy it to the view of the
        file's owner (``sweeper.ledger_views``), which never fails the append."""
        if self._fd is None:
            raise ValueError(f"ledger {self.path} is closed")
        line = encode_record(record)
        try:
            if self._torn:
                _write_all_at_once(self._fd, b"\n")
                self._torn = False
            _write_all_at_once(self._fd, line)
        except OSError:
            self._torn = True
            raise
        os.fsync(self._fd)
        append_to_view(self.path, record.uid, line, ledger_owner=self._owner)

    def close(self) -> None:
        """Close the ledger and release the writer lock; safe to call twice."""
        fd, lock_fd = self._fd, self._lock_fd
        self._fd = self._lock_fd = None
        try:
            if fd is not None:
                os.close(fd)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _terminate_torn_line(path: str, append_fd: int) -> None:
    """End a line left torn by a crash, so the next record does not fuse with it.

    The torn fragment then reads as one corrupt line (reported, skipped) instead of taking a good
    record down with it.  Called with the writer lock held.
    """
    size = os.fstat(append_fd).st_size
    if size == 0:
        return
    read_fd = _open_private(path, os.O_RDONLY, create=False)
    try:
        if not os.path.samestat(os.fstat(read_fd), os.fstat(append_fd)):
            raise FileRefused(path, "was replaced while being opened")
        last = os.pread(read_fd, 1, size - 1)
    finally:
        os.close(read_fd)
    if last != b"\n":
        logger.warning("ledger %s: last line was torn (crash mid-append?); ending it", path)
        _write_all_at_once(append_fd, b"\n")
        os.fsync(append_fd)


_LEDGER_ROOM_BYTES = 1024 * 1024


def check_writable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`LedgerUnavailable` unless the ledger at ``path`` can be opened for appending
    as a writer would (made if missing): checked before a sweep acts, so that a ledger that is a
    symlink, a FIFO, unwritable or on a read-only filesystem stops every action up front."""
    try:
        with Ledger.open(path):
            free = os.statvfs(os.path.dirname(os.fspath(path)) or ".")
    except FileRefused as error:
        raise LedgerUnavailable(path, error.reason) from None
    except OSError as error:
        raise LedgerUnavailable(path, error.strerror or str(error)) from None
    room = free.f_bavail * free.f_frsize
    if room < _LEDGER_ROOM_BYTES:  # a full disk opens fine, then fails the first record
        raise LedgerUnavailable(path, f"no room for records ({room} bytes free)")


def append_record(path: str | os.PathLike[str], record: LedgerRecord) -> None:
    """Append one record under the writer lock (single write, fsynced)."""
    with Ledger.open(path) as ledger:
        ledger.append(record)


class RecordSink(Protocol):
    """Where an executor writes its records: an open ``Ledger`` or ``AppendEach``."""

    def append(self, record: LedgerRecord) -> None: ...


@dataclass(frozen=True)
class AppendEach:
    """Appends each record under the writer lock taken for that record alone (the daemon's way:
    it never holds the writer lock while it works)."""

    path: str

    def append(self, record: LedgerRecord) -> None:
        append_record(self.path, record)


def action_lock_path_for(ledger_path: str | os.PathLike[str]) -> str:
    """The lock that keeps actors sharing a ledger from acting on the same tree at once."""
    return os.fspath(ledger_path) + ACTION_LOCK_SUFFIX


@contextlib.contextmanager
def action_lock(
    ledger_path: str | os.PathLike[str],
    *,
    exclusive: bool,
    should_stop: Callable[[], bool] = lambda: False,
    poll_seconds: float = 0.2,
) -> Iterator[bool]:
    """Hold the action lock: exclusive for a whole sweep, shared for one daemon work item.

    flock locks belong to open file descriptions, so the daemon's own work items (shared) and its
    full rescans (exclusive) coordinate exactly like separate processes do.  Waits without
    blocking signals: yields False (lock not taken) if ``should_stop`` turns true first.
    """
    fd = _open_private(action_lock_path_for(ledger_path), os.O_RDWR, create=True)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if should_stop():
                    yield False
                    return
                time.sleep(poll_seconds)
        yield True
    finally:
        os.close(fd)


class InstanceLock:
    """Proof that this process is the only sweeper daemon on a state directory; see
    ``acquire_instance_lock``."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Release the lock; safe to call twice.  The file stays (unlinking it would race)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> InstanceLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def acquire_instance_lock(ledger_path: str | os.PathLike[str]) -> InstanceLock:
    """Take the non-blocking one-instance lock ``<ledger>.pid`` and write our pid into it.

    Raises ``AlreadyRunning`` naming the lock file (and the holder's pid when readable) if another
    process holds it.  Independent of the writer lock, so one-shot sweeps still run alongside.
    """
    path = instance_lock_path_for(ledger_path)
    fd = _open_private(path, os.O_RDWR, create=True)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f" by pid {holder}" if holder.isdigit() else ""
            raise AlreadyRunning(
                f"another sweeper is already running on this state directory: "
                f"{_clean_text(path)} is locked{who}"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:  # a full disk: the pid is only a hint for the message above
            pass
    except BaseException:
        os.close(fd)
        raise
    return InstanceLock(path, fd)


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerRead:
    """The records that parsed, in file order, and one warning per line that did not."""

    records: tuple[LedgerRecord, ...]
    warnings: tuple[str, ...]


@contextlib.contextmanager
def _shared_lock_if_free(ledger_path: str) -> Iterator[bool]:
    """Hold the writer lock shared while reading if no writer holds it; yield whether one does.

    Never waits: a sweep may keep the ledger open for as long as its batch runs, and a reader in
    the same process as an open ``Ledger`` would otherwise wait for itself.  A reader that may not
    open the lock file (another user's private state) reads without it.
    """
    try:
        fd = _open_private(lock_path_for(ledger_path), os.O_RDONLY, create=False)
    except (FileNotFoundError, PermissionError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield True
        else:
            yield False
    finally:
        os.close(fd)


def read_ledger(path: str | os.PathLike[str]) -> LedgerRead:
    """Read every record; a missing ledger is empty, bad lines become warnings and are skipped.

    A torn last line (crash mid-append) and corrupt lines elsewhere are reported by file and line
    number.  Never waits for writers.  Raises ``FileRefused`` when the ledger is a symlink or not a
    regular file.  Holds every record: :func:`iter_ledger` reads in bounded memory.
    """
    warnings: list[str] = []
    records = tuple(iter_ledger(path, warnings.append))
    return LedgerRead(records=records, warnings=tuple(warnings))


def iter_ledger(
    path: str | os.PathLike[str], warn: Callable[[str], None], *, start: int = 0
) -> Iterator[LedgerRecord]:
    """The records of the ledger at ``path``, one line at a time (memory does not grow with the
    ledger), as :func:`read_ledger` reads them; each bad line is passed to ``warn``.  ``start``
    is a byte offset at a line boundary (the ledger's length at some earlier moment)."""
    path = os.fspath(path)
    shown = _clean_text(path)
    # The lock is held only while the ledger is opened and its length noted: the parse, which
    # may take a while, must not keep writers (the daemon) waiting.  Lines appended since are
    # left for the next reader.
    with _shared_lock_if_free(path) as writer_active:
        try:
            fd = _open_private(path, os.O_RDONLY, create=False)
        except FileNotFoundError:
            return
        length = os.fstat(fd).st_size
    with os.fdopen(fd, "rb") as file:
        start = min(start, length)
        file.seek(start)
        remaining = length - start
        for count, whole in enumerate(file, start=1):
            number = f"{count}" if start == 0 else f"{count} after byte {start}"
            if remaining <= 0:
                break
            line = whole[:remaining]
            remaining -= len(line)
            terminated = line.endswith(b"\n")
            if not line.strip():
                continue  # the newline a writer adds after a torn line, or blank lines
            try:
                record = decode_record(line.rstrip(b"\n"))
            except (ValueError, TypeError) as error:
                if terminated:
                    warn(f"{shown}: line {number}: corrupt record skipped ({error})")
                else:
                    cause = "a writer was appending" if writer_active else "crash mid-append?"
                    warn(f"{shown}: line {number}: torn last line skipped ({cause})")
                continue
            if not terminated:
                warn(f"{shown}: line {number}: last line has no newline (kept)")
            yield record


# --- totals ---------------------------------------------------------------------------------------

GroupBy = Literal["root", "owner", "day"]


@dataclass(frozen=True)
class SummaryRow:
    """Totals over the outcome records sharing ``key``; bytes are raw ints.

    ``key`` is the root path, the owner's user name, the UTC day as ``YYYY-MM-DD``, or ``"total"``
    when not grouping.  Root paths are as in memory (surrogateescape), so the presenter must make
    them printable.
    """

    key: str
    count: int
    reclaimed_bytes: int
    bytes_deleted: int
    bytes_written: int


def _group_key(record: LedgerRecord, by: GroupBy | None) -> str:
    if by is None:
        return "total"
    if by == "root":
        return record.root
    if by == "owner":
        return record.owner
    return record.time.date().isoformat()  # record times are UTC


def summarise(
    records: Iterable[LedgerRecord],
    since: datetime | None = None,
    by: GroupBy | None = None,
) -> tuple[SummaryRow, ...]:
    """Totals of the outcome records (``reclaimed_bytes`` not None) at or after ``since``.

    One row per key, sorted by key (days sort chronologically); without ``by``, a single
    ``"total"`` row, present even when nothing counted.  Intent records never count.
    """
    if since is not None and since.utcoffset() is None:
        raise ValueError(f"since must be timezone-aware, got {since!r}")
    if by not in (None, "root", "owner", "day"):
        raise ValueError(f"cannot group ledger totals by {by!r}")
    totals: dict[str, tuple[int, int, int, int]] = {}
    if by is None:
        totals["total"] = (0, 0, 0, 0)
    for record in records:
        if record.reclaimed_bytes is None:
            continue
        if since is not None and record.time < since:
            continue
        key = _group_key(record, by)
        count, reclaimed, deleted, written = totals.get(key, (0, 0, 0, 0))
        totals[key] = (
            count + (1 if record.records is None else record.records),
            reclaimed + record.reclaimed_bytes,
            deleted + record.bytes_deleted,
            written + record.bytes_written,
        )
    return tuple(
        SummaryRow(key, count, reclaimed, deleted, written)
        for key, (count, reclaimed, deleted, written) in sorted(totals.items())
    )
