"""Keeping the ledger bounded: compaction into carry records, old files kept as segments.

The ledger only grows; on a busy server it would pass a gigabyte.  When it passes
``ledger_max_bytes``, :func:`compact_if_due` starts it again from one ``carry`` record per (UTC
day, root, owner, host) holding the totals of that group's outcome records (and how many records
they stand for) -- per month instead, or per root and owner alone, when a record per day would
not bring the ledger under half its limit (and not at all when even that would not: compacting
again on every run would only push the detailed records out).  Every total ``sweeper ledger``
shows -- overall, by root, by owner, by day, and ``--since`` to the day -- is the same before
and after.  The file as it was is kept, record by
record, as ``<ledger>.1``; older segments shift to ``.2`` ... and the oldest past
``ledger_segments`` is deleted (its totals live on in the carry records).

Order, so that no crash loses a total: the compacted file is written beside the ledger and
fsynced; the old ledger is hard-linked as ``.1``; the compacted file is renamed over the ledger;
the folder is fsynced.  The ledger's name always holds a complete ledger.  All of it happens under
the writer lock (no record is appended meanwhile) and only when no run has intents open (the
journal's marker is absent), since reconciliation looks for them in the ledger itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sweeper.errors import FileRefused
from sweeper.journal import markers_of, reconcile
from sweeper.ledger import (
    Action,
    LedgerRecord,
    RecordSink,
    _fsync_directory,
    _open_private,
    encode_record,
    iter_ledger,
    lock_path_for,
    new_record,
    utc_now,
)

log = logging.getLogger(__name__)

COMPACT_SUFFIX = ".compact"


@dataclass(frozen=True)
class Compacted:
    """A compaction done: records read, carry records written, the segment the old file became."""

    records: int
    carries: int
    segment: str | None


def segment_path(ledger_path: str, number: int) -> str:
    return f"{ledger_path}.{number}"


def compact_if_due(
    ledger_path: str,
    *,
    max_bytes: int,
    segments: int,
    clock: Callable[[], datetime],
    warn: Callable[[str], None] = log.warning,
) -> Compacted | None:
    """Compact the ledger if it has passed ``max_bytes`` (see the module docstring); None when
    it has not, when a run's intents are open, or when another writer holds the ledger now (the
    next run tries again).  Raises OSError / FileRefused; nothing is lost when it does."""
    try:
        size = os.stat(ledger_path, follow_symlinks=False).st_size
    except FileNotFoundError:
        return None
    if size < max_bytes or markers_of(ledger_path):
        return None
    lock_fd = _open_private(lock_path_for(ledger_path), os.O_RDWR, create=True)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        return _compact(ledger_path, segments, clock(), warn, max_bytes)
    finally:
        os.close(lock_fd)  # releases the lock


def before_acting(
    ledger_path: str,
    sink: RecordSink,
    *,
    run_id: str,
    max_bytes: int,
    segments: int,
    clock: Callable[[], datetime] = utc_now,
) -> None:
    """What a run holding the action lock exclusively does before it acts: close what dead runs
    left open (``journal.reconcile``; raises LedgerUnavailable, and nothing may be done), then
    compact the ledger if it is due (a failure is only a warning)."""
    reconcile(ledger_path, sink, run_id=run_id, clock=clock)
    compact_quietly(ledger_path, max_bytes=max_bytes, segments=segments, clock=clock)


def compact_quietly(
    ledger_path: str, *, max_bytes: int, segments: int, clock: Callable[[], datetime]
) -> None:
    """Housekeeping before a run acts: :func:`compact_if_due`, a failure only a warning (the
    ledger is left as it was, and compaction is tried again next run)."""
    try:
        compact_if_due(ledger_path, max_bytes=max_bytes, segments=segments, clock=clock)
    except (OSError, FileRefused) as error:
        log.warning("ledger %s not compacted: %s", ledger_path, error)


_Key = tuple[str, str, str, int, str]  # UTC day, root, owner, uid, host


# How finely carry records keep time: by UTC day, then (when a day per group is still too much
# for the limit) by month, then not at all.  ``--since`` is exact to that grain.
_GRAINS: tuple[tuple[str, Callable[[LedgerRecord], str]], ...] = (
    ("day", lambda record: record.time.date().isoformat()),
    ("month", lambda record: record.time.strftime("%Y-%m")),
    ("all time", lambda record: ""),
)


def _carries(
    ledger_path: str, grain: Callable[[LedgerRecord], str], warn: Callable[[str], None]
) -> tuple[int, dict[_Key, list[int]], dict[_Key, LedgerRecord]]:
    totals: dict[_Key, list[int]] = {}  # records, reclaimed, deleted, written
    latest: dict[_Key, LedgerRecord] = {}
    read = 0
    for record in iter_ledger(ledger_path, warn):
        read += 1
        if record.reclaimed_bytes is None:
            continue  # intents (all closed: no marker) and failures hold no totals
        key = (grain(record), record.root, record.owner, record.uid, record.host)
        counts = totals.setdefault(key, [0, 0, 0, 0])
        counts[0] += 1 if record.records is None else record.records
        counts[1] += record.reclaimed_bytes
        counts[2] += record.bytes_deleted
        counts[3] += record.bytes_written
        if key not in latest or record.time >= latest[key].time:
            latest[key] = record
    return read, totals, latest


def _compact(
    ledger_path: str,
    segments: int,
    now: datetime,
    warn: Callable[[str], None],
    max_bytes: int,
) -> Compacted | None:
    segment = segment_path(ledger_path, 1) if segments else None
    for grain_name, grain in _GRAINS:
        read, totals, latest = _carries(ledger_path, grain, warn)
        lines = [
            encode_record(
                new_record(
                    now=latest[key].time,  # the group's last record: --since exact to the grain
                    action=Action.CARRY,
                    path=key[1],
                    owner=key[2],
                    uid=key[3],
                    reason=f"totals of {records} records (by {grain_name}) compacted on "
                    f"{now.date().isoformat()}"
                    + (f"; the records are in {os.path.basename(segment)}" if segment else ""),
                    run_id="compacted",
                    root=key[1],
                    bytes_deleted=deleted,
                    bytes_written=written,
                    reclaimed_bytes=reclaimed,
                    host=key[4],
                    records=records,
                )
            )
            for key, (records, reclaimed, deleted, written) in sorted(totals.items())
        ]
        if sum(map(len, lines)) <= max_bytes // 2:
            break
    else:
        # Even one carry per root and owner is too much for the limit: compacting again on
        # every run would only push the detailed records out.  Say so; leave it.
        warn(
            f"{ledger_path}: not compacted: its totals alone (one record per root and owner) "
            f"would take more than half of ledger_max_bytes ({max_bytes}); raise it"
        )
        return None
    temp = ledger_path + COMPACT_SUFFIX
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)  # a compaction cut short
    fd = _open_private(temp, os.O_WRONLY | os.O_EXCL, create=True)
    try:
        try:
            data = memoryview(b"".join(lines))
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if segments:
            _shift_segments(ledger_path, segments)
            os.link(ledger_path, segment_path(ledger_path, 1))
        os.rename(temp, ledger_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(ledger_path)
    log.info(
        "ledger %s compacted: %d records into %d carry records%s",
        ledger_path,
        read,
        len(lines),
        f"; the old file is {segment}" if segment else "",
    )
    return Compacted(read, len(lines), segment)


def _shift_segments(ledger_path: str, segments: int) -> None:
    """``.N`` -> ``.N+1``, the last one dropped, so that ``.1`` is free."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(segment_path(ledger_path, segments))
    for number in range(segments - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.rename(segment_path(ledger_path, number), segment_path(ledger_path, number + 1))
