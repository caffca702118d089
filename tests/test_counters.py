"""What the ledger's records add up to, for ``sweeper status`` and the metrics: a table of real
records, counted as the daemon counts them, and the textfile read back by the official
``prometheus_client`` parser."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sweeper.counters import Counters
from sweeper.ledger import Action, LedgerRecord, new_record
from sweeper.metrics import Snapshot, render

DAY1 = datetime(2026, 3, 1, 23, 30, tzinfo=timezone.utc)
DAY2 = datetime(2026, 3, 2, 0, 30, tzinfo=timezone.utc)


def record(
    action: str,
    *,
    path: str = "/d/run/e.pt",
    run_id: str = "r1",
    root: str = "/d",
    when: datetime = DAY1,
    written: int = 0,
    deleted: int = 0,
    outcome: bool = True,
    records: int | None = None,
) -> LedgerRecord:
    return new_record(
        now=when,
        action=action,
        path=path,
        owner="alice",
        uid=1000,
        reason="test",
        run_id=run_id,
        root=root,
        bytes_written=written,
        bytes_deleted=deleted,
        reclaimed_bytes=deleted - written if outcome else None,
        records=records,
    )


# (records, the (action, result) counts they make)
CASES = [
    pytest.param(
        [record(Action.EXTRACT_INTENT, outcome=False), record(Action.EXTRACT, written=10)],
        {("extract", "ok"): 1},
        id="an extraction",
    ),
    pytest.param(
        [record(Action.DELETE_INTENT, outcome=False), record(Action.FAIL)],
        {("delete", "failed"): 1},
        id="a failed deletion is labelled by its intent",
    ),
    pytest.param(
        [
            record(Action.EXTRACT_INTENT, outcome=False, path="/d/a.pt"),
            record(Action.DELETE_INTENT, outcome=False, path="/d/b.pt", run_id="r2"),
            record(Action.FAIL, path="/d/b.pt", run_id="r2"),
            record(Action.FAIL, path="/d/a.pt"),
        ],
        {("delete", "failed"): 1, ("extract", "failed"): 1},
        id="intents are matched by run and path",
    ),
    pytest.param([record(Action.FAIL)], {("other", "failed"): 1}, id="a failure without intent"),
    pytest.param(
        [record(Action.CARRY, deleted=500, written=100, records=7)],
        {("compacted", "ok"): 7},
        id="compacted records keep their count",
    ),
    pytest.param(
        [record(Action.ABANDON)], {("abandon", "other"): 1}, id="an abandoned intent counts apart"
    ),
    pytest.param(
        [record(Action.REMOVE_TEMP, deleted=3), record(Action.REFRESH, written=5, deleted=4)],
        {("remove-temp", "ok"): 1, ("refresh", "ok"): 1},
        id="temporaries and refreshes",
    ),
]


@pytest.mark.parametrize(("records", "files"), CASES)
def test_files_by_action_and_result(
    records: list[LedgerRecord], files: dict[tuple[str, str], int]
) -> None:
    counters = Counters()
    for each in records:
        counters.add(each)
    totals = counters.totals()
    assert dict(totals.files) == files
    assert totals.failures == sum(n for (_, result), n in files.items() if result == "failed")


def test_bytes_by_root_and_by_utc_day() -> None:
    counters = Counters()
    for each in [
        record(Action.EXTRACT, written=100, when=DAY1),
        record(Action.DELETE, deleted=1000, when=DAY2, root="/e"),
        record(Action.DELETE_INTENT, outcome=False, when=DAY2),  # intents never count
        record(Action.DELETE, deleted=50, when=DAY2),
    ]:
        counters.add(each)
    totals = counters.totals()
    assert dict(totals.reclaimed_by_root) == {"/d": -50, "/e": 1000}
    assert (totals.written_bytes, totals.deleted_bytes) == (100, 1050)
    assert totals.reclaimed_bytes == 950
    assert totals.day(DAY1) == (1, -100)
    # 00:30 at UTC-01:00 is still 2 March in UTC, the day the ledger counts in
    assert totals.day(datetime.fromisoformat("2026-03-01T23:59:00-01:00")) == (2, 1050)
    assert totals.acted_on == 3


def test_the_textfile_parses_and_escapes_label_values() -> None:
    counters = Counters()
    counters.add(record(Action.DELETE, deleted=7, root='/d/"quoted"\\back\nslash'))
    text = render(
        Snapshot(
            totals=counters.totals(),
            version="1.2.3",
            reclaimable={'/d/"quoted"\\back\nslash': 42},
            last_sweep=1.5,
            last_sweep_seconds=0.25,
            queue_length=3,
            errors={"scan": 2},
        )
    )
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {name: family.type for name, family in families.items()} == {
        "sweeper_reclaimed_bytes_total": "gauge",
        "sweeper_written_bytes": "counter",
        "sweeper_deleted_bytes": "counter",
        "sweeper_files": "counter",
        "sweeper_errors": "counter",
        "sweeper_reclaimable_bytes": "gauge",
        "sweeper_last_sweep_timestamp_seconds": "gauge",
        "sweeper_last_sweep_duration_seconds": "gauge",
        "sweeper_queue_length": "gauge",
        "sweeper_build_info": "gauge",
    }
    (reclaimable,) = families["sweeper_reclaimable_bytes"].samples
    assert reclaimable.labels == {"root": '/d/"quoted"\\back\nslash'} and reclaimable.value == 42
    errors = {s.labels["kind"]: s.value for s in families["sweeper_errors"].samples}
    assert errors == {"action": 0, "scan": 2}
    assert families["sweeper_build_info"].samples[0].labels == {"version": "1.2.3"}
