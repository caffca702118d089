"""Execution: the only step of a sweep that changes disk.

For every entry: extract -> verify -> ledger -> delete, in that order (with an undo window,
"delete" is a move into the trash, and the trash's due files are purged first).  A failure on one
file is logged, recorded in the ledger, and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby

from sweeper import trash
from sweeper.errors import FileRefused, LedgerUnavailable, NotConfirmed
from sweeper.extract import (
    FileIdentity,
    Located,
    confirm_on_disk,
    delete_if_same,
    extract,
    move_aside,
    open_regular,
    output_name,
    remove_stale_temps,
    trash_if_same,
    verify_existing_copy,
)
from sweeper.formats import layouts
from sweeper.inventory import FolderRef, open_folder, split_root
from sweeper.journal import Journal
from sweeper.ledger import (
    CLOSES,
    INTENTS,
    LedgerRecord,
    Metric,
    RecordSink,
    new_record,
    user_name,
    utc_now,
)
from sweeper.ledger import Action as LedgerAction
from sweeper.plan import Need, PlanEntry, Purge, SweepPlan
from sweeper.policy import Action
from sweeper.torchzip import Interrupted, Mode

log = logging.getLogger(__name__)

STALE_TEMP_SECONDS = 3600


@dataclass(frozen=True)
class Outcome:
    entry: PlanEntry
    ok: bool
    detail: str
    bytes_written: int
    bytes_deleted: int

    @property
    def reclaimed_bytes(self) -> int:
        return self.bytes_deleted - self.bytes_written


@dataclass(frozen=True)
class Purged:
    """What became of one planned purge."""

    purge: Purge
    ok: bool
    detail: str

    @property
    def reclaimed_bytes(self) -> int:
        return self.purge.item.size if self.ok else 0


@dataclass(frozen=True)
class SweepReport:
    outcomes: tuple[Outcome, ...]
    interrupted: bool
    ledger_error: str | None = None  # the ledger stopped taking records: the run stopped there
    purged: tuple[Purged, ...] = ()

    @property
    def reclaimed_bytes(self) -> int:
        purged = sum(done.reclaimed_bytes for done in self.purged)
        return purged + sum(outcome.reclaimed_bytes for outcome in self.outcomes)

    @property
    def failures(self) -> int:
        failed = sum(1 for outcome in self.outcomes if not outcome.ok)
        failed += sum(1 for done in self.purged if not done.ok)
        return failed + (1 if self.ledger_error is not None else 0)


_WORK = (Action.EXTRACT, Action.REFRESH, Action.DELETE)


@dataclass
class _Context:
    ledger: RecordSink
    run_id: str
    clock: Callable[[], datetime]
    should_stop: Callable[[], bool]
    journal: Journal | None = None
    open_intents: set[tuple[str, str]] = field(default_factory=set)
    synced_needs: set[Need] = field(default_factory=set)  # fsynced this run (_require_needs)

    def record(
        self,
        entry: PlanEntry,
        action: str,
        reason: str,
        *,
        written: int = 0,
        deleted: int = 0,
        outcome: bool = True,
        file_id: tuple[int, int, int, int] | None = None,
        shared: int = 0,
    ) -> None:
        """Append one record; an intent first leaves the journal's marker, so that a crash
        before its outcome is reconciled at the next start (sweeper.journal)."""
        metric = Metric(*entry.metric) if entry.metric else None
        self.append(
            new_record(
                now=self.clock(),
                action=action,
                path=entry.path,
                owner=user_name(entry.uid),
                uid=entry.uid,
                reason=reason,
                run_id=self.run_id,
                root=entry.root,
                epoch=entry.epoch,
                metric=metric,
                output=entry.output,
                bytes_deleted=deleted,
                bytes_written=written,
                reclaimed_bytes=deleted - written if outcome else None,
                file_id=file_id,
                folder_id=(entry.folder.dev, entry.folder.ino) if action in INTENTS else None,
                bytes_shared=shared,
            )
        )

    def append(self, record: LedgerRecord) -> None:
        """Append ``record`` (see :meth:`record`): raises LedgerUnavailable."""
        action = record.action
        if action in INTENTS and self.journal is not None:
            try:
                self.journal.begin()
            except OSError as error:
                raise LedgerUnavailable(
                    self.journal.ledger_path, f"cannot leave its journal marker: {error.strerror}"
                ) from None
        try:
            self.ledger.append(record)
        except FileRefused as error:
            raise LedgerUnavailable(error.path, error.reason) from None
        except OSError as error:  # a full disk, an I/O error
            raise LedgerUnavailable(
                getattr(self.ledger, "path", "?"), error.strerror or str(error)
            ) from None
        if action in INTENTS:
            self.open_intents.add((record.path, action))
        else:
            for kind, closing in CLOSES.items():
                if action in closing:
                    self.open_intents.discard((record.path, kind))


def execute_plan(
    plan: SweepPlan,
    ledger: RecordSink,
    *,
    run_id: str,
    clock: Callable[[], datetime] = utc_now,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] | None = None,
    journal: Journal | None = None,
) -> SweepReport:
    """Carry out the plan's extract, refresh and delete entries; keep and skip entries are left
    alone.

    Per file, in this order: ledger intent to write -> extract the inference copy (or, if it
    already exists, re-verify it in full and fsync it and its folder again: a copy whose
    durability was never confirmed is not counted on; a stale copy is replaced only once the
    new one is verified) -> ledger record of the copy -> re-check that the files justifying the
    deletion are still there, unchanged -> ledger intent to delete -> delete (only if the name
    still refers to the scanned file and no process holds it open) -> ledger outcome.  With a
    ``journal``, an intent left open by a crash is closed by ``journal.reconcile`` at the next
    start, from what the tree shows.  A full checkpoint is deleted without a copy
    only when ``keep_inference`` says its copy is not wanted.  Callers hold the action lock
    (``ledger.action_lock``) from before the scan, so no other actor works on the same files.
    """
    context = _Context(ledger, run_id, clock, should_stop, journal)
    work = [e for e in plan.entries if e.action in _WORK]
    outcomes: list[Outcome] = []
    purged: list[Purged] = []
    interrupted = False
    try:
        # The trash first: under disk pressure its oldest files go before any demotion.
        for top, purges in groupby(plan.purges, key=lambda p: p.top):
            if should_stop():
                interrupted = True
                break
            purged.extend(_purge_in(top, list(purges), context))
        for folder, group in groupby(work if not interrupted else [], key=lambda e: e.folder):
            if should_stop():
                interrupted = True
                break
            for outcome in _execute_folder(folder, list(group), context):
                outcomes.append(outcome)
                if progress is not None:
                    progress(len(outcomes), len(work))
            if should_stop():
                interrupted = True
                break
    except LedgerUnavailable as error:
        # Nothing more is done that could not be recorded; the file in hand is reported failed.
        # Its intent stays open (and the journal's marker with it) for the next start.
        log.error("%s", error)
        return SweepReport(tuple(outcomes), interrupted, str(error), tuple(purged))
    if journal is not None and not context.open_intents:
        journal.end()
    if not interrupted:
        worked = {entry.folder for entry in work}
        clean_orphaned_temps(
            (f for f in plan.temp_folders if f not in worked), ledger, run_id=run_id
        )
    return SweepReport(tuple(outcomes), interrupted, purged=tuple(purged))


def _purge_in(top: FolderRef, purges: list[Purge], context: _Context) -> Iterator[Purged]:
    """Purge these files from the trash of the root folder ``top``: for each, ledger intent ->
    unlink if the trash still holds that very file -> its manifest entry removed -> ledger
    outcome, which counts its bytes.  A trash folder that fails its check purges nothing."""
    try:
        top_fd = open_folder(top)
    except (OSError, FileRefused) as error:
        reason = error.reason if isinstance(error, FileRefused) else str(error.strerror)
        for purge in purges:
            yield _purge_failed(purge, context, f"cannot open its root folder safely: {reason}")
        return
    try:
        try:
            trash_fd = trash.open_trash(top_fd, top.display, create=False)
            if trash_fd is None:
                raise FileRefused(os.path.join(top.display, trash.TRASH_NAME), "is gone")
        except (OSError, FileRefused) as error:
            reason = error.reason if isinstance(error, FileRefused) else str(error.strerror)
            for purge in purges:
                yield _purge_failed(purge, context, reason)
            return
        try:
            for purge in purges:
                if context.should_stop():
                    return
                yield _purge_one(purge, trash_fd, context)
        finally:
            os.close(trash_fd)
    finally:
        os.close(top_fd)


def _trash_record(
    context: _Context, item: trash.TrashItem, action: str, reason: str, *, deleted: int = 0,
    outcome: bool = True,
) -> LedgerRecord:  # fmt: skip
    return new_record(
        now=context.clock(),
        action=action,
        path=item.path,
        owner=user_name(item.uid),
        uid=item.uid,
        reason=reason,
        run_id=context.run_id,
        root=item.root,
        output=item.trash_path,
        bytes_deleted=deleted,
        reclaimed_bytes=deleted if outcome else None,
        file_id=item.identity,
    )


def _purge_one(purge: Purge, trash_fd: int, context: _Context) -> Purged:
    item = purge.item
    context.append(
        _trash_record(
            context,
            item,
            LedgerAction.PURGE_INTENT,
            purge.reason,
            deleted=item.size,
            outcome=False,
        )
    )
    try:
        trash.purge_item(trash_fd, item)
    except (OSError, FileRefused) as error:
        return _purge_failed(purge, context, _why(error))
    context.append(
        _trash_record(context, item, LedgerAction.PURGE, purge.reason, deleted=item.size)
    )
    log.info("%s: purged from the trash (%d bytes)", item.path, item.size)
    return Purged(purge, True, "purged")


def _purge_failed(purge: Purge, context: _Context, reason: str) -> Purged:
    log.error("%s: not purged: %s", purge.item.path, reason)
    context.append(_trash_record(context, purge.item, LedgerAction.FAIL, reason))
    return Purged(purge, False, reason)


def _why(error: OSError | FileRefused) -> str:
    return error.reason if isinstance(error, FileRefused) else f"{error.strerror or error}"


def _move_to_trash(
    entry: PlanEntry, source: Located, identity: FileIdentity, context: _Context
) -> None:
    """Demote by moving into the trash of its root folder (created if need be, checked before
    use): ledger intent -> manifest entry -> rename if the name still holds the very file
    planned, one link, open nowhere -> ledger outcome (no bytes: they count at the purge)."""
    top_fd, top = trash.open_root_folder(entry.folder, entry.root)
    try:
        trash_fd = trash.open_trash(top_fd, top, create=True)
        if trash_fd is None:
            raise FileRefused(os.path.join(top, trash.TRASH_NAME), "vanished as it was made")
        try:
            if os.fstat(trash_fd).st_dev != entry.dev:
                raise FileRefused(entry.path, "not moved: the trash is on another filesystem")
            now_ns = time.time_ns()
            _, rest = split_root(entry.root)
            item = trash.TrashItem(
                key=trash.new_key(identity, now_ns),
                top=top,
                root=entry.root,
                path=entry.path,
                folder=entry.folder.components[len(rest) :],
                folder_id=(entry.folder.dev, entry.folder.ino),
                name=entry.name,
                uid=entry.uid,
                identity=(identity.dev, identity.ino, identity.size, identity.mtime_ns),
                trashed=now_ns / 1e9,
                purge_after=now_ns / 1e9 + entry.undo_seconds,
                run_id=context.run_id,
            )
            context.append(
                _trash_record(context, item, LedgerAction.TRASH_INTENT, entry.reason, outcome=False)
            )
            # Shared lock on the trash while its entry exists without its file: a sweep of
            # another ledger over the same root tidies only a trash nobody is moving into.
            fcntl.flock(trash_fd, fcntl.LOCK_SH)
            trash.put_manifest(trash_fd, item)
            try:
                trash_if_same(source, identity, trash_fd, item.key)
            except BaseException:
                if not trash.holds(trash_fd, item.key):  # not moved: its entry goes too
                    trash.drop_manifest(trash_fd, item.key)
                raise
            context.append(_trash_record(context, item, LedgerAction.TRASH, entry.reason))
        finally:
            os.close(trash_fd)
    finally:
        os.close(top_fd)


@dataclass(frozen=True)
class Restored:
    item: trash.TrashItem
    ok: bool
    detail: str


def restore_held(
    held: Iterable[tuple[FolderRef, trash.TrashItem]], ledger: RecordSink, *, run_id: str
) -> list[Restored]:
    """Move each item back where it was (:func:`sweeper.trash.restore_item`: refused when its
    folder is gone or its name taken) and record a ``restore`` (no bytes: none were counted
    when it was moved in).  Callers hold the action lock exclusively, the journal reconciled."""
    context = _Context(ledger, run_id, utc_now, lambda: False)
    done = []
    for top, item in held:
        try:
            top_fd = open_folder(top)
            try:
                trash_fd = trash.open_trash(top_fd, top.display, create=False)
                if trash_fd is None:
                    raise FileRefused(item.path, "its trash folder is gone")
                try:
                    trash.restore_item(top_fd, trash_fd, item)
                finally:
                    os.close(trash_fd)
            finally:
                os.close(top_fd)
        except (OSError, FileRefused) as error:
            log.error("%s: %s", item.path, _why(error))
            done.append(Restored(item, False, _why(error)))
            continue
        reason = f"restored from the trash (moved there by run {item.run_id})"
        context.append(_trash_record(context, item, LedgerAction.RESTORE, reason))
        log.info("%s: restored from the trash", item.path)
        done.append(Restored(item, True, "restored"))
    return done


def _execute_folder(
    folder: FolderRef, entries: list[PlanEntry], context: _Context
) -> Iterator[Outcome]:
    try:
        dir_fd = open_folder(folder)
    except (OSError, FileRefused) as error:
        reason = error.reason if isinstance(error, FileRefused) else str(error.strerror)
        for entry in entries:
            yield _failed(entry, context, f"cannot open its folder safely: {reason}")
        return
    try:
        _clean_temps(folder, dir_fd, context)
        # Copies are written before any deletion that keeps no copy: dropping a copy (or a
        # checkpoint without one) counts on the copies this run writes, so it waits for them,
        # and does not happen at all once anything in the folder has failed.
        failed = False
        for entry in sorted(entries, key=_counts_on_copies):
            if context.should_stop():
                return
            if failed and _counts_on_copies(entry):
                yield _failed(entry, context, "not deleted: an earlier action in its folder failed")
                continue
            outcome = _execute_entry(entry, dir_fd, context)
            failed = failed or not outcome.ok
            yield outcome
    finally:
        os.close(dir_fd)


def _counts_on_copies(entry: PlanEntry) -> bool:
    """A deletion that keeps no copy of its own (it counts on those written this run)."""
    return entry.action is Action.DELETE and not entry.output and entry.layout is None


def _clean_temps(folder: FolderRef, dir_fd: int, context: _Context) -> None:
    """Remove the temporary files an interrupted extraction left here (provably sweeper's, an
    hour old), and record each in the ledger (bytes it never counted as written: no total)."""
    for name, size in remove_stale_temps(dir_fd, STALE_TEMP_SECONDS, time.time()):
        path = os.path.join(folder.display, name)
        log.info("%s: removed stale temporary file (%d bytes)", path, size)
        context.ledger.append(
            new_record(
                now=context.clock(),
                action=LedgerAction.REMOVE_TEMP,
                path=path,
                owner=user_name(os.geteuid()),
                uid=os.geteuid(),
                reason="temporary file of an interrupted extraction",
                run_id=context.run_id,
                root=folder.prefix,
                bytes_deleted=size,
            )
        )


def clean_orphaned_temps(folders: Iterable[FolderRef], ledger: RecordSink, *, run_id: str) -> None:
    """Clean up stale temporaries in folders that have no other work this run (a crash left
    them: they hold the space of a whole copy, fallocated), so they do not wait for their
    folder's next checkpoint."""
    context = _Context(ledger, run_id, utc_now, lambda: False)
    for folder in folders:
        try:
            dir_fd = open_folder(folder)
        except (OSError, FileRefused):
            continue
        try:
            _clean_temps(folder, dir_fd, context)
        except (OSError, LedgerUnavailable) as error:
            log.warning("%s: stale temporary files left: %s", folder.display, error)
        finally:
            os.close(dir_fd)


def _execute_entry(entry: PlanEntry, dir_fd: int, context: _Context) -> Outcome:
    if entry.layout is not None and entry.action is Action.DELETE:
        return _demote_folder(entry, entry.layout, dir_fd, context)
    source = Located(dir_fd, entry.name, entry.path)
    identity = FileIdentity(entry.dev, entry.ino, entry.size, entry.mtime_ns)
    written = replaced = 0
    try:
        if entry.output is not None:
            copy = Located(dir_fd, os.path.basename(entry.output), entry.output)
            if entry.action is not Action.DELETE or entry.extract_first:
                written, replaced = _write_copy(entry, source, copy, identity, context)
            else:
                verify_existing_copy(source, copy, identity)
                confirm_on_disk(copy)
        if entry.action is Action.DELETE:
            _require_needs(entry, dir_fd, context.synced_needs)
            if entry.extract_first:
                _require_owned_copy(entry, dir_fd)
            if entry.output is None and entry.keep_as is not None and entry.replaces is not None:
                # demoted with no copy of its own: another version's stale copy stays, aside
                stale = Located(dir_fd, output_name(entry.name, Mode.INFERENCE), entry.path)
                move_aside(stale, entry.keep_as, FileIdentity(*entry.replaces))
                log.info("%s: stale inference copy kept as %s", entry.path, entry.keep_as)
            if entry.trash:
                _move_to_trash(entry, source, identity, context)
                log.info(
                    "%s: moved into the trash (%d bytes) for %d s; inference copy verified",
                    entry.path,
                    entry.size,
                    entry.undo_seconds,
                )
                return Outcome(entry, True, "moved into the trash", written, replaced)
            context.record(
                entry,
                LedgerAction.DELETE_INTENT,
                entry.reason,
                deleted=entry.size,
                outcome=False,
                file_id=(entry.dev, entry.ino, entry.size, entry.mtime_ns),
            )
            delete_if_same(source, identity)
            context.record(entry, LedgerAction.DELETE, entry.reason, deleted=entry.size)
            how = "inference copy verified" if entry.output else "no inference copy kept"
            log.info("%s: deleted (%d bytes); %s", entry.path, entry.size, how)
            return Outcome(entry, True, "deleted", written, entry.size + replaced)
        detail = "refreshed" if entry.action is Action.REFRESH else "extracted"
        return Outcome(entry, True, detail, written, replaced)
    except Interrupted:
        if (entry.path, LedgerAction.EXTRACT_INTENT) in context.open_intents:
            # extract() left nothing behind: the intent is closed here, not at the next start.
            why = "interrupted before its copy was in place"
            context.record(entry, LedgerAction.ABANDON, why, outcome=False)
        return Outcome(entry, False, "interrupted", written, 0)
    except LedgerUnavailable:
        raise  # stops the whole run: see execute_plan
    except NotConfirmed as error:
        # The copy is in place, unconfirmed, and could not be taken back: its intent stays
        # open, so the next start counts it and confirms it (sweeper.journal).
        log.error("%s: %s", error.path, error.reason)
        return Outcome(entry, False, error.reason, 0, 0)
    except FileRefused as error:
        return _failed(entry, context, error.reason, written)
    except OSError as error:
        return _failed(entry, context, f"{error.strerror or error}", written)
    except Exception as error:  # one file's unforeseen failure is recorded, the sweep goes on
        log.exception("%s: unexpected error", entry.path)
        return _failed(entry, context, f"unexpected error: {type(error).__name__}", written)


def _demote_folder(
    entry: PlanEntry, layout: layouts.FolderCheckpoint, dir_fd: int, context: _Context
) -> Outcome:
    """Demote a checkpoint folder: its weights (its inference copy, kept in place) are read in
    full and verified (safetensors by the format's rules, torch zips by every CRC) and fsynced,
    the files that justify the demotion are re-checked, and only then is each training-state
    file deleted: ledger intent -> unlink if it is still the very file planned (one link, not
    held open) -> ledger outcome.  Training subfolders it emptied (DeepSpeed's
    ``global_stepN/``) are removed last.  The weights are never rewritten or deleted."""
    deleted = 0
    try:
        fd = open_folder(_child(entry.folder, entry.name, entry.dev, entry.ino))
    except (OSError, FileRefused) as error:
        reason = error.reason if isinstance(error, FileRefused) else str(error.strerror)
        return _failed(entry, context, f"cannot open it safely: {reason}")
    try:
        layouts.verify_parts(fd, layout.weights, entry.path)
        os.fsync(fd)
        _require_needs(entry, dir_fd, context.synced_needs)
        subfolders = {sub.name: sub for sub in layout.folders}
        for part in layout.training:
            where = fd
            folder = _child(entry.folder, entry.name, entry.dev, entry.ino)
            if len(part.path) > 1:
                sub = subfolders[part.path[0]]
                folder = _child(folder, sub.name, sub.dev, sub.ino)
                where = open_folder(folder)
            try:
                deleted += _delete_part(entry, folder, part, where, context)
            finally:
                if where != fd:
                    os.close(where)
        for sub in layout.folders:
            _remove_emptied(fd, sub, entry.path)
    except LedgerUnavailable:
        raise
    except (FileRefused, OSError) as error:
        reason = error.reason if isinstance(error, FileRefused) else f"{error.strerror or error}"
        outcome = _failed(entry, context, reason)
        return dataclasses.replace(outcome, bytes_deleted=deleted)
    except Exception as error:  # one folder's unforeseen failure is recorded, the sweep goes on
        log.exception("%s: unexpected error", entry.path)
        outcome = _failed(entry, context, f"unexpected error: {type(error).__name__}")
        return dataclasses.replace(outcome, bytes_deleted=deleted)
    finally:
        os.close(fd)
    log.info(
        "%s: training state deleted (%d bytes); weights verified, kept in place",
        entry.path,
        deleted,
    )
    return Outcome(entry, True, "deleted", 0, deleted)


def _child(folder: FolderRef, name: str, dev: int, ino: int) -> FolderRef:
    return FolderRef(
        folder.prefix, (*folder.components, name), dev, ino, os.path.join(folder.display, name)
    )


def _delete_part(
    entry: PlanEntry, folder: FolderRef, part: layouts.Part, dir_fd: int, context: _Context
) -> int:
    """One training-state file of a demoted checkpoint folder, recorded as a deletion of its
    own (so reconciliation after a crash finds each one as it finds a file)."""
    path = os.path.join(folder.display, part.path[-1])
    one = dataclasses.replace(
        entry,
        folder=folder,
        name=part.path[-1],
        path=path,
        size=part.size,
        dev=part.dev,
        ino=part.ino,
        mtime_ns=part.mtime_ns,
        bytes_deleted=part.size,
        layout=None,
        needs=(),
    )
    reason = entry.reason
    identity = FileIdentity(part.dev, part.ino, part.size, part.mtime_ns)
    context.record(
        one,
        LedgerAction.DELETE_INTENT,
        reason,
        deleted=part.size,
        outcome=False,
        file_id=part.identity,
    )
    delete_if_same(Located(dir_fd, part.path[-1], path), identity)
    context.record(one, LedgerAction.DELETE, reason, deleted=part.size)
    return part.size


def _remove_emptied(fd: int, sub: layouts.SubFolder, display: str) -> None:
    """Remove a training subfolder demotion emptied, if it is still that folder; one that is
    not empty (a file came in since) stays, and says so."""
    try:
        now = os.stat(sub.name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) != (sub.dev, sub.ino):
        return
    try:
        os.rmdir(sub.name, dir_fd=fd)
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        log.warning("%s: %s/ kept: files came into it", display, sub.name)


def _write_copy(
    entry: PlanEntry, source: Located, copy: Located, identity: FileIdentity, context: _Context
) -> tuple[int, int]:
    """Write the inference copy over the planned stale copy if there is one (or with the stale
    copy kept aside under ``entry.keep_as``); ledger it.  Returns (bytes written, bytes of the
    stale copy replaced)."""
    stale = FileIdentity(*entry.replaces) if entry.replaces is not None else None
    context.record(
        entry,
        LedgerAction.EXTRACT_INTENT,
        entry.reason,
        written=entry.bytes_written,  # planned: reconciliation counts only a copy of this size
        deleted=0 if stale is None or entry.keep_as is not None else stale.size,
        outcome=False,
        file_id=entry.replaces,
    )
    result = extract(
        source,
        copy,
        Mode.INFERENCE,
        expected=identity,
        should_stop=context.should_stop,
        replace=False,
        replacing=stale,
        keep_aside=entry.keep_as,
        # root's reserve is borrowed only for a copy whose source is unlinked right after
        frees_after=entry.size if entry.action is Action.DELETE and not entry.trash else 0,
    )
    written, shared = result.bytes_out, result.bytes_shared
    if stale is None:
        context.record(entry, LedgerAction.EXTRACT, entry.reason, written=written, shared=shared)
        log.info("%s: wrote %s (%d bytes, %d shared)", entry.path, entry.output, written, shared)
        return written, 0
    replaced = 0 if entry.keep_as is not None else stale.size
    reason = entry.reason
    if entry.keep_as is not None:
        reason += f"; the stale copy is now {entry.keep_as}"
    context.record(
        entry, LedgerAction.REFRESH, reason, written=written, deleted=replaced, shared=shared
    )
    log.info("%s: refreshed stale %s (%d bytes)", entry.path, entry.output, written)
    return written, replaced


def _require_owned_copy(entry: PlanEntry, dir_fd: int) -> None:
    """A copy sweeper could not give the checkpoint's owner (not root, someone else's file)
    proves nothing to that owner: the checkpoint stays."""
    assert entry.output is not None
    info = os.stat(os.path.basename(entry.output), dir_fd=dir_fd, follow_symlinks=False)
    if info.st_uid != entry.uid:
        raise FileRefused(
            entry.path, "not deleted: its copy could not be given the checkpoint's owner"
        )


def _require_needs(entry: PlanEntry, dir_fd: int, synced: set[Need]) -> None:
    """The files whose presence justified this deletion must still be there, unchanged (so
    still the verified files the plan counted on), and on disk: each is fsynced, and the
    folder, before the deletion counts on them (a checkpoint saved seconds ago may still be
    only in the page cache) -- once per run (``synced``), however many deletions count on it.
    Otherwise the deletion is not done."""
    fresh = False
    for need in entry.needs:
        if need.parts:
            fresh = _require_folder_need(entry, need, dir_fd, synced) or fresh
            continue
        try:
            fd, now = open_regular(need.name, dir_fd, os.path.join(entry.folder.display, need.name))
        except FileRefused as error:
            gone = error.reason.endswith("No such file or directory")
            raise FileRefused(
                entry.path,
                f"not deleted: {need.name}, which justified it, "
                + ("is gone" if gone else f"changed since it was scanned ({error.reason})"),
            ) from None
        try:
            if FileIdentity.of(now) != FileIdentity(need.dev, need.ino, need.size, need.mtime_ns):
                raise FileRefused(
                    entry.path,
                    f"not deleted: {need.name}, which justified it, changed since it was scanned",
                )
            if need not in synced:
                os.fsync(fd)
                synced.add(need)
                fresh = True
        finally:
            os.close(fd)
    if fresh:
        os.fsync(dir_fd)


def _require_folder_need(entry: PlanEntry, need: Need, dir_fd: int, synced: set[Need]) -> bool:
    """:func:`_require_needs` for a checkpoint folder: the very folder, each file that makes
    it resumable unchanged and, once per run, fsynced.  True when it fsynced them."""
    display = os.path.join(entry.folder.display, need.name)
    try:
        fd = os.open(need.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as error:
        raise FileRefused(
            entry.path, f"not deleted: {need.name}, which justified it, is gone ({error.strerror})"
        ) from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (need.dev, need.ino):
            raise FileRefused(entry.path, f"not deleted: {need.name}, which justified it, changed")
        for part in need.parts:
            try:
                opened = layouts.open_part(fd, part, display)
            except FileRefused as error:
                raise FileRefused(
                    entry.path,
                    f"not deleted: {need.name}, which justified it, changed ({error.reason})",
                ) from None
            try:
                if need not in synced:
                    os.fsync(opened)
            finally:
                os.close(opened)
        if need in synced:
            return False
        os.fsync(fd)
        synced.add(need)
        return True
    finally:
        os.close(fd)


def _failed(entry: PlanEntry, context: _Context, reason: str, written: int = 0) -> Outcome:
    log.error("%s: %s", entry.path, reason)
    context.record(entry, LedgerAction.FAIL, reason)
    return Outcome(entry, False, reason, written, 0)
