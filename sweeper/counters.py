"""What the ledger adds up to, as running counters: the figures ``sweeper status`` and the
Prometheus metrics report.

Counted from the ledger's own records, so that they survive restarts: seeded by reading the
ledger once (:func:`seeded_from`), then kept current by every record sweeper appends
(:class:`CountingSink` passes each on to the ledger, then counts it).  Only outcome records
count, as in ``sweeper ledger``; compaction's ``carry`` records keep every byte total, but not
which action their files were, so their files count as ``compacted``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sweeper.errors import SweeperError
from sweeper.ledger import Action, LedgerRecord, RecordSink, iter_ledger

__all__ = ["Counters", "CountingSink", "Totals", "seeded_from"]

# Outcome actions, as ``sweeper_files_total`` labels them: (action, result).
_OK = {
    Action.EXTRACT: ("extract", "ok"),
    Action.REFRESH: ("refresh", "ok"),
    Action.DELETE: ("delete", "ok"),
    Action.REMOVE_TEMP: ("remove-temp", "ok"),
    Action.CARRY: ("compacted", "ok"),
    Action.TRASH: ("trash", "ok"),
    Action.RESTORE: ("restore", "ok"),
    Action.PURGE: ("purge", "ok"),
}
_INTENDED = {
    Action.EXTRACT_INTENT: "extract",
    Action.DELETE_INTENT: "delete",
    Action.TRASH_INTENT: "trash",
    Action.PURGE_INTENT: "purge",
}


@dataclass(frozen=True)
class Totals:
    """The counters at one moment: bytes are raw ints, days are UTC (``YYYY-MM-DD``)."""

    reclaimed_by_root: Mapping[str, int] = field(default_factory=dict)
    written_bytes: int = 0
    deleted_bytes: int = 0
    files: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (action, result) -> n
    by_day: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # day -> (files, bytes)
    failures: int = 0

    @property
    def reclaimed_bytes(self) -> int:
        return sum(self.reclaimed_by_root.values())

    @property
    def acted_on(self) -> int:
        return sum(n for (_, result), n in self.files.items() if result == "ok")

    def day(self, when: datetime) -> tuple[int, int]:
        """(files, bytes reclaimed) on the UTC day of ``when``."""
        return self.by_day.get(_day(when), (0, 0))


def _day(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d")


class Counters:
    """Running totals of ledger records; safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reclaimed: dict[str, int] = {}
        self._written = 0
        self._deleted = 0
        self._files: dict[tuple[str, str], int] = {}
        self._days: dict[str, tuple[int, int]] = {}
        self._failures = 0
        self._intents: dict[tuple[str, str], str] = {}  # (run id, path) -> what it meant to do

    def add(self, record: LedgerRecord) -> None:
        with self._lock:
            intended = _INTENDED.get(record.action)
            if intended is not None:
                if len(self._intents) > 100_000:  # intents are closed at once; never grow
                    self._intents.clear()
                self._intents[(record.run_id, record.path)] = intended
                return
            if record.reclaimed_bytes is None:
                return
            meant = self._intents.pop((record.run_id, record.path), None)
            if record.action == Action.FAIL:
                label = (meant or "other", "failed")
                self._failures += 1
            elif record.action in _OK:
                label = _OK[record.action]
            else:  # an abandoned intent, or an action a newer sweeper wrote
                label = (record.action, "other")
            files = 1 if record.records is None else record.records
            self._files[label] = self._files.get(label, 0) + files
            self._reclaimed[record.root] = (
                self._reclaimed.get(record.root, 0) + record.reclaimed_bytes
            )
            self._written += record.bytes_written
            self._deleted += record.bytes_deleted
            key = _day(record.time)
            day_files, day_bytes = self._days.get(key, (0, 0))
            counted = files if label[1] == "ok" else 0
            self._days[key] = (day_files + counted, day_bytes + record.reclaimed_bytes)
            if len(self._days) > 64:  # only recent days are asked for
                del self._days[min(self._days)]

    def totals(self) -> Totals:
        with self._lock:
            return Totals(
                dict(self._reclaimed),
                self._written,
                self._deleted,
                dict(self._files),
                dict(self._days),
                self._failures,
            )


def seeded_from(ledger: str, warn: Callable[[str], None]) -> Counters:
    """Counters holding every record of the ledger at ``ledger`` (none when it does not exist
    yet); read streaming, in memory that does not grow with it.  A ledger that cannot be read
    (the daemon stays up when it is a FIFO or unreadable) is said through ``warn``, and the
    counters start from what could be read."""
    counters = Counters()
    try:
        _add_all(counters, iter_ledger(ledger, warn))
    except (OSError, SweeperError) as error:
        warn(f"cannot read the totals in the ledger: {error}; counting from what was read")
    return counters


def _add_all(counters: Counters, records: Iterable[LedgerRecord]) -> None:
    for record in records:
        counters.add(record)


@dataclass(frozen=True)
class CountingSink:
    """A :class:`~sweeper.ledger.RecordSink` that counts each record once it is appended."""

    sink: RecordSink
    counters: Counters

    def append(self, record: LedgerRecord) -> None:
        self.sink.append(record)
        self.counters.add(record)
