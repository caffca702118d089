"""The ledger as a recoverable journal: what an interrupted run did is found out and recorded.

Every action that changes the tree is preceded by an intent record (``extract-intent``,
``delete-intent``) and followed by its outcome (``extract``/``refresh``/``delete``) or a ``fail``.
A run killed between the two leaves an intent open: the bytes it freed or wrote are not in the
totals.  Before its first intent a run leaves a small marker beside the ledger
(``<ledger>.open.<run id>``, the ledger's length at that moment) and removes it once every intent
it wrote is closed; so a marker found by a run that holds the action lock exclusively means the
ledger's tail after that offset may hold a dead run's open intents.

:func:`reconcile` reads that tail, asks the tree what became of each open intent and appends the
outcome: ``delete`` when the checkpoint is gone (the run stopped after the unlink, before
recording it), ``extract``/``refresh`` when the copy it was writing is in place (its durability
is confirmed first: the copy and its folder are fsynced), ``abandon`` (no bytes) when the tree
shows nothing happened.  The undo window's intents (:mod:`sweeper.trash`) close the same way:
``purge-intent`` as ``purge`` (its bytes counted) once the trash no longer holds its file, else
``abandon`` (the next sweep purges it again); ``trash-intent`` as ``trash`` when the trash holds
the file, else ``abandon`` -- neither with bytes, since a move frees nothing.  After any crash
the ledger's totals then equal the bytes actually freed.  Reconciliation only reads, fsyncs
and appends: it never removes or renames a file.
Callers hold the action lock, so no other sweeper is half-way through an action.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sweeper.errors import FileRefused, LedgerUnavailable
from sweeper.extract import Located, confirm_on_disk, is_copy_of, open_regular
from sweeper.inventory import FolderRef, open_folder, split_root
from sweeper.ledger import (
    CLOSES,
    INTENTS,
    Action,
    LedgerRecord,
    RecordSink,
    _fsync_directory,
    _open_private,
    iter_ledger,
    new_record,
)
from sweeper.torchzip import Mode
from sweeper.trash import open_trash

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".open."


def marker_path_for(ledger_path: str | os.PathLike[str], run_id: str) -> str:
    return os.fspath(ledger_path) + MARKER_SUFFIX + run_id


def markers_of(ledger_path: str | os.PathLike[str]) -> list[str]:
    """The markers runs left beside the ledger (live runs' own, or dead runs')."""
    folder, base = os.path.split(os.fspath(ledger_path))
    prefix = base + MARKER_SUFFIX
    try:
        names = os.listdir(folder or ".")
    except FileNotFoundError:
        return []
    return sorted(
        os.path.join(folder, name)
        for name in names
        if name.startswith(prefix) and not name.endswith(".tmp")
    )


@dataclass
class Journal:
    """One run's marker (``<ledger>.open.<run id>``): :meth:`begin` before its first intent,
    :meth:`end` once all its intents are closed.  Runs under a shared action lock (the
    daemon's folder sweeps, several at once) each have their own."""

    ledger_path: str
    run_id: str
    begun: bool = False

    def begin(self) -> None:
        """Leave the marker, durably and atomically: the ledger's length now."""
        if self.begun:
            return
        try:
            info = os.stat(self.ledger_path, follow_symlinks=False)
            offset, identity = info.st_size, [info.st_dev, info.st_ino]
        except FileNotFoundError:
            offset, identity = 0, None
        body = json.dumps({"offset": offset, "ledger": identity, "pid": os.getpid()})
        _write_atomically(marker_path_for(self.ledger_path, self.run_id), body.encode() + b"\n")
        self.begun = True

    def end(self) -> None:
        """Every intent this run wrote is closed: nothing of it is left to reconcile."""
        if self.begun:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker_path_for(self.ledger_path, self.run_id))
            self.begun = False


def _write_atomically(path: str, data: bytes) -> None:
    """A small private file beside the ledger: temp -> fsync -> rename -> fsync the folder."""
    temp = path + ".tmp"
    fd = _open_private(temp, os.O_WRONLY | os.O_TRUNC, create=True)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, path)
    _fsync_directory(path)


def _read_marker(ledger_path: str, marker: str) -> int:
    """The offset from which the open intents of the run that left ``marker`` are looked for."""
    try:
        fd, _ = open_regular(marker, None, marker)
    except FileRefused:
        return 0  # gone, or not a marker: look through the whole ledger
    try:
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        body = json.loads(raw)
        offset = int(body["offset"])
        identity = body.get("ledger")
    except (ValueError, KeyError, TypeError, RecursionError):
        return 0  # unreadable (torn by a crash): look through the whole ledger
    try:
        info = os.stat(ledger_path, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if identity != [info.st_dev, info.st_ino] or offset > info.st_size:
        return 0  # the ledger was replaced or truncated since: look through all of it
    return offset


def reconcile(
    ledger_path: str,
    sink: RecordSink,
    *,
    run_id: str,
    clock: Callable[[], datetime],
    warn: Callable[[str], None] = log.warning,
) -> None:
    """Close every intent an interrupted run left open, as the tree shows it ended (see the
    module docstring); then remove the markers.  Raises LedgerUnavailable when a record cannot
    be appended: the markers stay, and the next run tries again.  Callers hold the action lock
    exclusively: every marker found is a dead run's."""
    markers = markers_of(ledger_path)
    if not markers:
        return
    offset = min(_read_marker(ledger_path, marker) for marker in markers)
    pending: dict[tuple[str, str, str], LedgerRecord] = {}
    for record in iter_ledger(ledger_path, warn, start=offset):
        if record.action in INTENTS:
            pending[(record.run_id, record.path, record.action)] = record
            continue
        for kind, closing in CLOSES.items():
            if record.action in closing:
                pending.pop((record.run_id, record.path, kind), None)
    for intent in pending.values():
        try:
            outcome = _resolve(intent, run_id, clock())
        except Exception as error:  # one user's file must not stop every run: not counted
            log.warning("%s: cannot reconcile: %s: %s", intent.path, type(error).__name__, error)
            outcome = _abandoned(intent, run_id, clock(), f"cannot tell ({type(error).__name__})")
        try:
            sink.append(outcome)
        except FileRefused as error:
            raise LedgerUnavailable(error.path, error.reason) from None
        except OSError as error:
            raise LedgerUnavailable(ledger_path, error.strerror or str(error)) from None
        log.warning("%s: %s", outcome.path, outcome.reason)
    for marker in markers:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)


def _closing(
    intent: LedgerRecord,
    run_id: str,
    now: datetime,
    action: str,
    reason: str,
    *,
    written: int = 0,
    deleted: int = 0,
) -> LedgerRecord:
    """The record that closes ``intent``: under its run's id, counted unless abandoned."""
    counts = action != Action.ABANDON
    return new_record(
        now=now,
        action=action,
        path=intent.path,
        owner=intent.owner,
        uid=intent.uid,
        reason=f"reconciled by run {run_id}: {reason}",
        run_id=intent.run_id,  # closes that run's intent
        root=intent.root,
        epoch=intent.epoch,
        metric=intent.metric,
        output=intent.output,
        bytes_deleted=deleted if counts else 0,
        bytes_written=written if counts else 0,
        reclaimed_bytes=deleted - written if counts else None,
        file_id=intent.file_id,
        folder_id=intent.folder_id,
    )


def _abandoned(intent: LedgerRecord, run_id: str, now: datetime, why: str) -> LedgerRecord:
    return _closing(intent, run_id, now, Action.ABANDON, f"run {intent.run_id}: {why}; not counted")


def _resolve(intent: LedgerRecord, run_id: str, now: datetime) -> LedgerRecord:
    interrupted = f"run {intent.run_id} was interrupted"
    outcome = functools.partial(_closing, intent, run_id, now)
    if intent.action == Action.PURGE_INTENT:
        return _resolve_purge(intent, interrupted, outcome)
    if intent.action == Action.TRASH_INTENT:
        return _resolve_trash(intent, interrupted, outcome)
    try:
        dir_fd = _open_record_folder(intent)
    except (OSError, FileRefused):
        return outcome(Action.ABANDON, f"{interrupted}; its folder is gone or changed: not counted")
    try:
        name = os.path.basename(intent.path)
        if intent.action == Action.DELETE_INTENT:
            return _resolve_delete(intent, dir_fd, name, interrupted, outcome)
        return _resolve_extract(intent, dir_fd, name, interrupted, outcome)
    finally:
        os.close(dir_fd)


def _resolve_delete(
    intent: LedgerRecord,
    dir_fd: int,
    name: str,
    interrupted: str,
    outcome: Callable[..., LedgerRecord],
) -> LedgerRecord:
    size = intent.file_id[2] if intent.file_id is not None else intent.bytes_deleted
    try:
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        now = None
    if now is not None and (
        intent.file_id is None or (now.st_dev, now.st_ino) == intent.file_id[:2]
    ):
        return outcome(Action.ABANDON, f"{interrupted} before deleting it; it is still there")
    if intent.file_id is None:
        return outcome(Action.ABANDON, f"{interrupted}; its file is gone, by whom unknown")
    elsewhere = _name_of_inode(dir_fd, intent.file_id[0], intent.file_id[1])
    if elsewhere is not None:  # renamed, not deleted: nothing was freed
        return outcome(Action.ABANDON, f"{interrupted} before deleting it; it is now {elsewhere}")
    # Gone from its folder (or the name holds another file): the intent's unlink happened.
    return outcome(Action.DELETE, f"{interrupted} after deleting it", deleted=size)


def _open_trash_of(record: LedgerRecord) -> int:
    """The trash folder a trash or purge record names (its ``output``'s folder), reopened below
    its root's trusted prefix without following a symlink, and checked as before any use."""
    if record.output is None:
        raise FileRefused(record.path, "the record names no file in the trash")
    top = os.path.dirname(os.path.dirname(record.output))
    prefix, _ = split_root(record.root)
    relative = os.path.relpath(top, prefix)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise FileRefused(record.path, "outside its root")
    fd = os.open(prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in (p for p in relative.split(os.sep) if p not in ("", os.curdir)):
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        trash_fd = open_trash(fd, top, create=False)
    finally:
        os.close(fd)
    if trash_fd is None:
        raise FileRefused(record.path, "its trash folder is gone")
    return trash_fd


def _in_trash(record: LedgerRecord) -> bool:
    """Whether the trash still holds the very file ``record`` names."""
    assert record.output is not None and record.file_id is not None
    trash_fd = _open_trash_of(record)
    try:
        info = os.stat(os.path.basename(record.output), dir_fd=trash_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    finally:
        os.close(trash_fd)
    return (info.st_dev, info.st_ino) == record.file_id[:2]


def _resolve_purge(
    intent: LedgerRecord, interrupted: str, outcome: Callable[..., LedgerRecord]
) -> LedgerRecord:
    """A purge is counted once its file is gone from the trash; while the trash still holds it,
    nothing was freed (the next sweep purges it again, under an intent of its own)."""
    if intent.file_id is None or intent.output is None:
        return outcome(Action.ABANDON, f"{interrupted}; the intent names no file")
    if _in_trash(intent):
        return outcome(Action.ABANDON, f"{interrupted} before purging it; it is still held")
    return outcome(Action.PURGE, f"{interrupted} after purging it", deleted=intent.file_id[2])


def _resolve_trash(
    intent: LedgerRecord, interrupted: str, outcome: Callable[..., LedgerRecord]
) -> LedgerRecord:
    """A move into the trash frees nothing, so it is never counted: the record only says where
    the file is.  Its manifest entry, if the move never happened, is tidied by the next run."""
    if intent.file_id is not None and intent.output is not None and _in_trash(intent):
        return outcome(Action.TRASH, f"{interrupted} after moving it into the trash")
    return outcome(Action.ABANDON, f"{interrupted} before moving it into the trash")


def _resolve_extract(
    intent: LedgerRecord,
    dir_fd: int,
    name: str,
    interrupted: str,
    outcome: Callable[..., LedgerRecord],
) -> LedgerRecord:
    if intent.output is None:
        return outcome(Action.ABANDON, f"{interrupted}; no copy named")
    copy_name = os.path.basename(intent.output)
    copy = Located(dir_fd, copy_name, intent.output)
    identity = is_copy_of(copy, Located(dir_fd, name, intent.path), Mode.INFERENCE)
    if identity is None:
        return outcome(Action.ABANDON, f"{interrupted} before its copy was in place")
    if intent.file_id is not None and (identity.dev, identity.ino) == intent.file_id[:2]:
        return outcome(Action.ABANDON, f"{interrupted}; the stale copy is still in place")
    if intent.bytes_written and identity.size != intent.bytes_written:
        # Not the copy that run was writing (its size was planned): someone else's file.
        return outcome(Action.ABANDON, f"{interrupted}; the file in its copy's place is not it")
    # The copy is in place but the run never confirmed it is on disk: confirm it now.  Its
    # bytes are counted either way (they take space); it is trusted for a deletion only after
    # the next run verifies it in full and fsyncs it again.
    confirmed = "its copy is in place"
    try:
        confirm_on_disk(copy)
    except (OSError, FileRefused) as error:
        why = error.reason if isinstance(error, FileRefused) else error.strerror
        confirmed += f" (not confirmed on disk: {why})"
    action = Action.REFRESH if intent.file_id is not None else Action.EXTRACT
    return outcome(
        action,
        f"{interrupted} after writing it; {confirmed}",
        written=identity.size,
        deleted=intent.bytes_deleted,
    )


def _name_of_inode(dir_fd: int, dev: int, ino: int) -> str | None:
    """The name under which the folder holds the file (dev, ino), if it still does."""
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.inode() == ino:
                info = entry.stat(follow_symlinks=False)
                if (info.st_dev, info.st_ino) == (dev, ino):
                    return entry.name
    return None


def _open_record_folder(record: LedgerRecord) -> int:
    """The very folder the run worked in (the intent names its device and inode), reopened
    below its root's trusted prefix without following a symlink, as a scan reopens one."""
    if record.folder_id is None:
        raise FileRefused(record.path, "the intent does not name its folder")
    prefix, _ = split_root(record.root)
    relative = os.path.relpath(os.path.dirname(record.path), prefix)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise FileRefused(record.path, "outside its root")
    parts = tuple(part for part in relative.split(os.sep) if part not in ("", os.curdir))
    dev, ino = record.folder_id
    return open_folder(FolderRef(prefix, parts, dev, ino, os.path.dirname(record.path)))
