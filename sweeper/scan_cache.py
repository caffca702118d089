"""The persistent scan cache: what reading each checkpoint found, kept between runs.

A checkpoint is read once: its kind, epoch, step, metrics, its inference copy's exact size and
state, and whether every record's CRC was checked, are stored under the file's identity
(device, inode, size, mtime_ns, ctime_ns, and its copy's identity).  The next sweep, hourly
timer or daemon rescan finds it with one ``stat``; any change of identity is a miss.

The store is the standard library's ``sqlite3`` in WAL mode, beside the ledger
(``<ledger>.scan-cache``): one row per file, read and written a row at a time (never the whole
cache in memory), safe for the forked classifiers of a sweep and the daemon to share.  Values
are JSON, never pickle: a forged file can lie about what a checkpoint holds, never run code.

The cache only saves reading.  Every action re-checks its file at execute time (identity, and a
copy is verified in full before a deletion counts on it), so a stale, forged or corrupt cache can
cost time, never a wrong deletion: a full checkpoint the cache calls an inference copy is merely
skipped, and a demotion the cache wrongly allows fails its execute-time checks.  A cache that
cannot be opened or read, was written by another host or another version of sweeper, is
replaced by an empty one; a read error is a miss.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sweeper.formats.family import Kind
from sweeper.formats.unpickler import MEMORY_REFUSAL
from sweeper.policy import CopyStatus

log = logging.getLogger(__name__)

SUFFIX = ".scan-cache"
_SCHEMA = 2
# Rows no scan has met for this long are dropped (a file deleted, or a root removed).
FORGET_SECONDS = 30 * 86_400
# Results that say more about this run than about the file: never stored.
_TRANSIENT = ("not read:", "refused: reading it failed", "unreadable:", MEMORY_REFUSAL)
_BATCH = 256  # rows written per transaction
_INHERITED: list[sqlite3.Connection] = []  # a forked child's copies of its parent's connection


def _unsafe_place(path: str) -> str | None:
    """Why the cache may not live at ``path``, or None: its folder must be this user's and
    writable by no one else, and the database and its WAL and shared-memory files, where they
    exist, this user's regular files (sqlite opens them following symlinks)."""
    folder = os.path.dirname(path) or "."
    try:
        info = os.stat(folder)
    except OSError as error:
        return f"its folder: {error.strerror}"
    me = os.geteuid()
    if info.st_uid != me or info.st_mode & 0o022:
        return f"its folder {folder} is writable by others than uid {me}"
    for suffix in ("", "-wal", "-shm"):
        try:
            held = os.lstat(path + suffix)
        except FileNotFoundError:
            continue
        except OSError as error:
            return f"{path + suffix}: {error.strerror}"
        if not stat.S_ISREG(held.st_mode) or held.st_uid != me:
            return f"{path + suffix} is not a regular file of uid {me}"
    return None


def _today() -> int:
    return int(time.time()) // 86_400


def path_for(ledger: str | os.PathLike[str]) -> str:
    return os.fspath(ledger) + SUFFIX


def open_beside(ledger: str | os.PathLike[str]) -> PersistentCache | None:
    """The cache beside ``ledger``, when its folder exists and this user may write there (a
    dry run by someone who cannot write the state folder simply reads every file)."""
    folder = os.path.dirname(os.fspath(ledger)) or "."
    if not os.access(folder, os.W_OK | os.X_OK):
        log.debug("%s: not writable; no scan cache this run", folder)
        return None
    return PersistentCache(path_for(ledger))


_T = TypeVar("_T")
_P = ParamSpec("_P")


def _locked(
    method: Callable[Concatenate[PersistentCache, _P], _T],
) -> Callable[Concatenate[PersistentCache, _P], _T]:
    """Run under the cache's lock: the daemon's threads share one connection."""

    def locked(self: PersistentCache, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with self._lock:
            return method(self, *args, **kwargs)

    locked.__doc__ = method.__doc__
    return locked


class PersistentCache:
    """The cache at ``path``; each process (a forked classifier too) opens its own connection
    on first use.  Duck-types :class:`sweeper.inventory.ScanCache` (``get``, ``put``,
    ``prune``), plus the CRC verification record (``verified``, ``mark_verified``)."""

    def __init__(self, path: str, *, host: str | None = None) -> None:
        self.path = path
        self.host = host if host is not None else socket.gethostname()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.RLock()  # the daemon's threads share one connection
        self._pending: list[tuple[Any, ...]] = []
        self._broken = False
        self._pruned = 0  # the day stale rows were last dropped

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection | None:
        if self._broken:
            return None
        if self._db is not None and self._pid == os.getpid():
            return self._db
        if self._db is not None:  # a fork: never use, nor close, the parent's connection
            _INHERITED.append(self._db)
        self._db, self._pending, self._pid = None, [], os.getpid()
        unsafe = _unsafe_place(self.path)
        if unsafe is not None:  # sqlite follows symlinks: never in a folder others can write
            log.warning("%s: no scan cache: %s", self.path, unsafe)
            self._broken = True
            return None
        try:
            self._db = self._open()
        except (sqlite3.Error, OSError) as error:
            log.warning("%s: scan cache unusable (%s); starting a new one", self.path, error)
            self._discard()
            try:
                self._db = self._open()
            except (sqlite3.Error, OSError) as again:
                log.warning("%s: no scan cache this run: %s", self.path, again)
                self._broken = True
                return None
        return self._db

    def _open(self) -> sqlite3.Connection:
        old = os.umask(0o077)
        try:
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
        finally:
            os.umask(old)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # a lost row is a miss, never a wrong answer
            db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID"
            )
            identity = {"schema": str(_SCHEMA), "code": _code_version(), "host": self.host}
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if stored != identity:
                if stored:
                    log.info("%s: scan cache from another host or version; emptied", self.path)
                db.execute("BEGIN IMMEDIATE")
                db.execute("DROP TABLE IF EXISTS files")
                db.execute("DELETE FROM meta")
                db.executemany("INSERT INTO meta VALUES (?, ?)", identity.items())
                db.execute("COMMIT")
            # One row per file, ~80 bytes on disk: ctime is stored as its distance from mtime
            # (0, so no bytes at all, for a file last changed by a write), the copy's identity
            # as a hash (NULL: no copy), and what reading found as a kind letter, three numbers
            # and compact JSON for the rest (NULL when there is none).
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (dev INTEGER, ino INTEGER, size INTEGER, "
                "mtime INTEGER, ctime INTEGER, copy INTEGER, kind TEXT, epoch INTEGER, "
                "step INTEGER, output INTEGER, rest TEXT, verified INTEGER, seen INTEGER, "
                "PRIMARY KEY (dev, ino)) WITHOUT ROWID"
            )
        except BaseException:
            db.close()
            raise
        return db

    def _discard(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)

    def _failed(self, error: sqlite3.Error) -> None:
        log.warning("%s: scan cache error (%s); going on without it", self.path, error)
        self._broken = True

    # -- what ScanCache does -------------------------------------------------------------------

    def get(self, key: tuple[object, ...]) -> dict[str, Any] | None:
        return self.get_many([key])[0]

    @_locked
    def get_many(self, keys: list[tuple[object, ...]]) -> list[dict[str, Any] | None]:
        """What each key's file was found to hold, or None (a miss): one query for the files
        of a folder."""
        found: list[dict[str, Any] | None] = [None] * len(keys)
        columns = [_columns(key) for key in keys]
        rows = self._rows(columns)
        for index, key in enumerate(keys):
            row = rows.get(columns[index])
            if row is None:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
                found[index] = _decode(row, str(key[0]))  # (forged or damaged: a miss)
        return found

    @_locked
    def put(self, key: tuple[object, ...], found: dict[str, Any]) -> None:
        problem = found.get("problem")
        if isinstance(problem, str) and problem.startswith(_TRANSIENT):
            return
        try:
            encoded = _encode(found)
        except (TypeError, ValueError):
            return
        dev, ino, size, mtime, ctime, copy = _columns(key)
        if not _storable(dev, ino, size, mtime, ctime - mtime):
            return  # (an mtime set centuries ahead: such a file is read every time)
        with self._lock:
            self._pending.append((dev, ino, size, mtime, ctime - mtime, copy, *encoded, _today()))
            full = len(self._pending) >= _BATCH
        if full:
            self.flush()

    @_locked
    def prune(self) -> None:
        """Write what is pending, and (once a day: it reads the whole table, and the daemon
        calls this after every folder it sweeps) drop rows no scan has met for FORGET_SECONDS."""
        self.flush()
        today = int(time.time()) // 86_400
        if self._pruned == today:
            return
        db = self._connect()
        if db is None:
            return
        try:
            db.execute("DELETE FROM files WHERE seen < ?", (today - FORGET_SECONDS // 86_400,))
            self._pruned = today
        except sqlite3.Error as error:
            self._failed(error)

    # -- CRC verification ------------------------------------------------------------------------

    @_locked
    def verified(self, dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> bool:
        """Whether every record of this very file was read and its CRC found right (by
        identity as the scan that just classified it saw it: its row is written first)."""
        self.flush()
        db = self._connect()
        if db is None or not _storable(dev, ino, size, mtime_ns, ctime_ns - mtime_ns):
            return False
        try:
            row = db.execute(
                "SELECT verified FROM files "
                "WHERE dev = ? AND ino = ? AND size = ? AND mtime = ? AND ctime = ?",
                (dev, ino, size, mtime_ns, ctime_ns - mtime_ns),
            ).fetchone()
        except sqlite3.Error as error:
            self._failed(error)
            return False
        return row is not None and row[0] == 1

    @_locked
    def mark_verified(self, dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> None:
        self.flush()
        db = self._connect()
        if db is None or not _storable(dev, ino, size, mtime_ns, ctime_ns - mtime_ns):
            return
        try:
            db.execute(
                "UPDATE files SET verified = 1 "
                "WHERE dev = ? AND ino = ? AND size = ? AND mtime = ? AND ctime = ?",
                (dev, ino, size, mtime_ns, ctime_ns - mtime_ns),
            )
        except sqlite3.Error as error:
            self._failed(error)

    # -- rows -----------------------------------------------------------------------------------

    def _rows(
        self, columns: list[tuple[int, int, int, int, int, int | None]]
    ) -> dict[tuple[Any, ...], tuple[Any, ...]]:
        """The stored rows of these files (``_columns`` of their keys) whose identity still
        matches, by their columns."""
        wanted = [c for c in columns if _storable(*c[:4], c[4] - c[3])]
        db = self._connect()
        if db is None or not wanted:
            return {}
        today = _today()
        matched: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        stale: list[tuple[int, int, int]] = []
        try:
            for dev in {columns[0] for columns in wanted}:
                inodes = [columns[1] for columns in wanted if columns[0] == dev]
                for start in range(0, len(inodes), _BATCH):
                    some = inodes[start : start + _BATCH]
                    query = (
                        "SELECT ino, size, mtime, mtime + ctime, copy, kind, epoch, step, "
                        "output, rest, verified, seen FROM files WHERE dev = ? AND ino IN "
                        f"({', '.join('?' * len(some))})"
                    )
                    for ino, size, mtime, ctime, copy, *found, seen in db.execute(
                        query, (dev, *some)
                    ):
                        matched[(dev, ino, size, mtime, ctime, copy)] = tuple(found)
                        if not isinstance(seen, int) or seen < today:  # (or damaged)
                            stale.append((today, dev, ino))
            if stale:  # met again: kept another FORGET_SECONDS
                db.executemany("UPDATE files SET seen = ? WHERE dev = ? AND ino = ?", stale)
        except sqlite3.Error as error:
            self._failed(error)
            return {}
        return matched

    @_locked
    def flush(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, []
        if not rows:
            return
        db = self._connect()
        if db is None:
            return
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?) "
                "ON CONFLICT (dev, ino) DO UPDATE SET size = excluded.size, "
                "mtime = excluded.mtime, ctime = excluded.ctime, copy = excluded.copy, "
                "kind = excluded.kind, epoch = excluded.epoch, step = excluded.step, "
                "output = excluded.output, rest = excluded.rest, seen = excluded.seen, "
                "verified = CASE WHEN files.size = excluded.size AND files.mtime = excluded.mtime "
                "AND files.ctime = excluded.ctime THEN files.verified ELSE 0 END",
                rows,
            )
            db.execute("COMMIT")
        except (OverflowError, ValueError) as error:  # a value sqlite cannot hold: not kept
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            log.debug("%s: %d rows not kept: %s", self.path, len(rows), error)
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._failed(error)

    @_locked
    def close(self) -> None:
        self.flush()
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """A digest of the code that decides what a file holds: a cache written by any other
    version of it is emptied, so a fix in the readers is never hidden by an old answer."""
    top = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*top.glob("formats/**/*.py"), top / "inventory.py", top / "extract.py"]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _storable(*values: int) -> bool:
    """Whether sqlite can hold these (64-bit signed integers): an inode number past 2**63, an
    mtime set centuries ahead, are not cached (a miss, every time), never an error."""
    return all(-(2**63) <= value < 2**63 for value in values)


def _columns(key: tuple[object, ...]) -> tuple[int, int, int, int, int, int | None]:
    """(dev, ino, size, mtime, ctime, copy) of a ``_Probes.cache_key``: (name, identity of
    the file, identity of its copy or None)."""
    _, identity, copy = key
    assert isinstance(identity, tuple)
    dev, ino, size, mtime, ctime = (int(v) for v in identity)
    return dev, ino, size, mtime, ctime, None if copy is None else hash(copy)


# -- values: a kind letter, three numbers and compact JSON ------------------------------------
#
# The usual full checkpoint is ("F", 3, None, 3887, '{"m":[["val_loss",0.2]]}'): its copy (not
# made yet) and the headline metric are not stored, as both follow from what is.

_KINDS = {kind: kind.name[0] for kind in Kind}
_KIND_OF = {letter: kind for kind, letter in _KINDS.items()}
_NUMBERS = ("epoch", "step", "output_bytes")
_SHORT = {"problem": "p", "source_name": "n"}
_LONG = {short: key for key, short in _SHORT.items()}
_FLAGS = {"own_output": "w", "symlink": "l", "writing": "r", "in_use": "u", "pinned": "q"}
_FLAG_OF = {short: key for key, short in _FLAGS.items()}
_Encoded = tuple[str | None, int | None, int | None, int | None, str | None]


def _encode(found: dict[str, Any]) -> _Encoded:
    kind = found.get("kind")
    epoch, step, output = (found.get(key) for key in _NUMBERS)
    out: dict[str, Any] = {}
    for key, value in found.items():
        if value is None or value is False or value == () or key in _NUMBERS or key == "kind":
            continue
        if key == "metric":
            continue  # the headline of metrics
        elif key == "metrics":
            out["m"] = [list(pair) for pair in value]
        elif key == "copy":
            copy = value
            status = copy.status.value[0]
            if (copy.problem, copy.size, copy.identity, copy.aside) == (
                None,
                0,
                None,
                None,
            ) and not (copy.made_here or copy.pinned):
                if copy.status is not CopyStatus.NONE or output is None:
                    out["c"] = status  # its name alone ("none" goes without saying)
            else:
                identity = list(copy.identity) if copy.identity is not None else None
                details = [copy.problem, copy.size, identity, copy.made_here, copy.aside]
                out["c"] = [status, *details, copy.pinned]
        elif key in _SHORT:
            out[_SHORT[key]] = value
        elif key in _FLAGS:
            out[_FLAGS[key]] = value if key == "pinned" else 1
        else:
            raise ValueError(key)  # something this cache does not know how to keep
    rest = json.dumps(out, separators=(",", ":"), allow_nan=True) if out else None
    numbers = [int(n) for n in (epoch, step, output) if n is not None]
    if not _storable(*numbers):  # (an epoch of 2**70 in a user's file)
        raise ValueError("a number past 64 bits")
    return (
        None if kind is None else _KINDS[kind],
        None if epoch is None else int(epoch),
        None if step is None else int(step),
        None if output is None else int(output),
        rest,
    )


_STATUS = {status.value[0]: status for status in CopyStatus}


def _decode(row: tuple[Any, ...], name: str) -> dict[str, Any]:
    """What a row says, as the reader found it; ``verified``: its CRCs were all read (for
    this very identity: the row matched it)."""
    inventory = sys.modules["sweeper.inventory"]  # (which imports this module)
    kind, epoch, step, output, rest, verified = row
    found: dict[str, Any] = {}
    if kind is not None:
        found["kind"] = _KIND_OF[kind]
    for key, value in zip(_NUMBERS, (epoch, step, output), strict=True):
        if value is not None:
            if not isinstance(value, int):
                raise TypeError(key)
            found[key] = value
    raw = _parsed(rest) if rest is not None else {}
    copy_name = inventory.output_name(name, inventory.Mode.INFERENCE)
    if output is not None and "c" not in raw:
        found["copy"] = inventory.CopyState(copy_name, CopyStatus.NONE)
    if verified == 1:
        found["verified"] = True
    for key, value in raw.items():
        if key == "m":
            found["metrics"] = value
            found["metric"] = inventory.headline_metric(value)
        elif key == "c":
            if isinstance(value, str):
                found["copy"] = inventory.CopyState(copy_name, _STATUS[value])
                continue
            status, problem, size, identity, made_here, aside, pinned = value
            found["copy"] = inventory.CopyState(
                copy_name,
                _STATUS[status],
                None if problem is None else str(problem),
                int(size),
                None if identity is None else _four(identity),
                bool(made_here),
                None if aside is None else str(aside),
                bool(pinned),
            )
        elif key in _LONG:
            found[_LONG[key]] = str(value)
        elif key in _FLAG_OF:
            found[_FLAG_OF[key]] = str(value) if key == "q" else bool(value)
        else:
            raise KeyError(key)
    return found


@functools.lru_cache(maxsize=1024)
def _parsed(rest: str) -> dict[str, Any]:
    """The JSON of a row's rest, metrics made a tuple (many files share the same text: their
    metric names, a flag; each is parsed once)."""
    raw = json.loads(rest)
    if not isinstance(raw, dict):
        raise ValueError("not an object")
    if "m" in raw:
        raw["m"] = tuple((str(k), float(v)) for k, v in raw["m"])
    return raw


def _four(values: list[object]) -> tuple[int, int, int, int]:
    a, b, c, d = (int(v) for v in values)  # type: ignore[call-overload]
    return a, b, c, d
