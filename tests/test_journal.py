"""Runs' markers beside the ledger: each run has its own, so concurrent runs (the daemon's
folder sweeps under a shared lock) never remove each other's, and compaction waits for all."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from trees import write_history

from sweeper.journal import Journal, markers_of
from sweeper.ledger_segments import compact_if_due


def _now() -> datetime:
    return datetime.now(timezone.utc)


def test_each_run_ends_only_its_own_marker(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    write_history(ledger, 10)
    first, second = Journal(str(ledger), "run-a"), Journal(str(ledger), "run-b")

    first.begin()
    second.begin()
    assert [Path(m).name for m in markers_of(ledger)] == [
        "ledger.jsonl.open.run-a",
        "ledger.jsonl.open.run-b",
    ]
    first.end()

    assert [Path(m).name for m in markers_of(ledger)] == ["ledger.jsonl.open.run-b"]
    second.end()
    assert markers_of(ledger) == []


def test_compaction_waits_while_any_run_has_intents_open(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    write_history(ledger, 3000)
    size = ledger.stat().st_size
    running = Journal(str(ledger), "run-a")
    running.begin()

    assert compact_if_due(str(ledger), max_bytes=2**20, segments=1, clock=_now) is None
    assert ledger.stat().st_size == size

    running.end()
    done = compact_if_due(str(ledger), max_bytes=2**20, segments=1, clock=_now)
    assert done is not None and done.records == 6000
    assert ledger.stat().st_size < size
