"""``sweeper ledger``: totals of reclaimed space, as a real process over real ledger files.

The ledger files are written with sweeper's own writer (records with chosen times, roots and
owners), and once by a real sweep.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import CliRun, run_cli
from trees import days_ago, ledger_lines, outcome_total, save_full, write_history

from sweeper.ledger import Action, Ledger, new_record

GiB = 1 << 30
MiB = 1 << 20
UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


# (time, owner, root, action, written, deleted); reclaimed = deleted - written for outcomes.
RECORDS = [
    (at("2026-03-01T10:00:00+00:00"), "alice", "/data/a", Action.EXTRACT, 100, 0),
    (at("2026-03-01T10:00:01+00:00"), "alice", "/data/a", Action.DELETE_INTENT, 0, 0),
    (at("2026-03-01T10:00:02+00:00"), "alice", "/data/a", Action.DELETE, 0, 5 * GiB),
    (at("2026-03-02T23:59:59+00:00"), "bob", "/data/b", Action.EXTRACT, 200, 0),
    (at("2026-03-02T23:59:59+00:00"), "bob", "/data/b", Action.DELETE_INTENT, 0, 0),
    (at("2026-03-03T00:00:00+00:00"), "bob", "/data/b", Action.DELETE, 0, 3 * MiB),
    # 00:30 at UTC+02:00 is still 2 March in UTC, which is what days are counted in.
    (at("2026-03-03T00:30:00+02:00"), "carol", "/data/a", Action.FAIL, 0, 0),
    # A crash between intent and outcome: the intent never counts.
    (at("2026-03-04T08:00:00+00:00"), "carol", "/data/a", Action.DELETE_INTENT, 0, 0),
]


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "ledger.jsonl"
    with Ledger.open(path) as writer:
        for when, owner, root, action, written, deleted in RECORDS:
            outcome = action != Action.DELETE_INTENT
            writer.append(
                new_record(
                    now=when,
                    action=action,
                    path=f"{root}/run/ckpt.pt",
                    owner=owner,
                    uid=1000,
                    reason="test",
                    run_id="r1",
                    root=root,
                    bytes_written=written,
                    bytes_deleted=deleted,
                    reclaimed_bytes=deleted - written if outcome else None,
                )
            )
    return path


@pytest.fixture
def ledger_cli(run_sweeper: Callable[..., CliRun]) -> Callable[..., CliRun]:
    def run(path: Path, *args: str) -> CliRun:
        done: CliRun = run_sweeper("ledger", "--ledger", path, *args)
        return done

    return run


def rows(done: CliRun) -> dict[str, tuple[int, int]]:
    """key -> (count, reclaimed_bytes) from ``--json`` output, checking the bytes are ints."""
    assert done.returncode == 0, done.stderr
    result = done.json()
    table = {}
    for row in result["rows"]:
        for field in ("reclaimed_bytes", "bytes_deleted", "bytes_written", "count"):
            assert type(row[field]) is int, row
        assert row["reclaimed_bytes"] == row["bytes_deleted"] - row["bytes_written"]
        table[row["key"]] = (row["count"], row["reclaimed_bytes"])
    assert result["reclaimed_bytes"] == sum(r for _, r in table.values())
    return table


ALL = 5 * GiB - 100 + 3 * MiB - 200


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        (None, {"total": (5, ALL)}),
        ("root", {"/data/a": (3, 5 * GiB - 100), "/data/b": (2, 3 * MiB - 200)}),
        ("owner", {"alice": (2, 5 * GiB - 100), "bob": (2, 3 * MiB - 200), "carol": (1, 0)}),
        (
            "day",
            {"2026-03-01": (2, 5 * GiB - 100), "2026-03-02": (2, -200), "2026-03-03": (1, 3 * MiB)},
        ),
    ],
)
def test_totals_json_in_raw_bytes(
    ledger_cli: Callable[..., CliRun],
    ledger: Path,
    by: str | None,
    expected: dict[str, tuple[int, int]],
) -> None:
    args = ["--json"] if by is None else ["--json", "--by", by]
    done = ledger_cli(ledger, *args)
    assert rows(done) == expected
    assert done.json()["by"] == by
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        ("2026-03-01", {"total": (5, ALL)}),
        ("2026-03-02", {"total": (3, 3 * MiB - 200)}),
        # At or after: a record at exactly --since counts.
        ("2026-03-02T23:59:59+00:00", {"total": (2, 3 * MiB - 200)}),
        ("2026-03-03T00:30:00+02:00", {"total": (3, 3 * MiB - 200)}),
        # The offset is honoured: this is midnight UTC, after bob's extract.
        ("2026-03-03T02:00:00+02:00", {"total": (1, 3 * MiB)}),
        ("2026-03-04", {"total": (0, 0)}),
    ],
)
def test_since(
    ledger_cli: Callable[..., CliRun],
    ledger: Path,
    since: str,
    expected: dict[str, tuple[int, int]],
) -> None:
    assert rows(ledger_cli(ledger, "--json", "--since", since)) == expected


def test_since_combines_with_by(ledger_cli: Callable[..., CliRun], ledger: Path) -> None:
    done = ledger_cli(ledger, "--json", "--by", "owner", "--since", "2026-03-02")
    assert rows(done) == {"bob": (2, 3 * MiB - 200), "carol": (1, 0)}


def test_table_uses_labelled_binary_units(ledger_cli: Callable[..., CliRun], ledger: Path) -> None:
    done = ledger_cli(ledger, "--by", "owner")
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split() == ["OWNER", "ACTIONS", "RECLAIMED", "DELETED", "WRITTEN"]
    by_owner = {line.split()[0]: line for line in lines}
    assert set(by_owner) == {"alice", "bob", "carol"}
    assert "5.0 GiB" in by_owner["alice"]
    assert "3.0 MiB" in by_owner["bob"]
    assert by_owner["bob"].endswith(" 200 B")  # the WRITTEN column
    total = ledger_cli(ledger)
    assert total.returncode == 0
    assert "5.0 GiB" in total.stdout
    assert str(ALL) not in total.stdout  # people get units, programs get --json


def test_bad_since_is_a_usage_error(ledger_cli: Callable[..., CliRun], ledger: Path) -> None:
    done = ledger_cli(ledger, "--since", "last tuesday")
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr_lines) == 1 and "'--since'" in done.stderr


def test_empty_ledger(ledger_cli: Callable[..., CliRun], tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.jsonl"
    path.parent.mkdir()
    path.touch()

    assert rows(ledger_cli(path, "--json")) == {"total": (0, 0)}
    assert rows(ledger_cli(path, "--json", "--by", "root")) == {}
    by_root = ledger_cli(path, "--by", "root")
    assert by_root.returncode == 0 and by_root.stdout.strip() == "ledger is empty"
    total = ledger_cli(path)
    assert total.returncode == 0 and "0 B" in total.stdout
    assert total.stderr == ""


def test_a_missing_ledger_is_a_usage_error_naming_it(
    ledger_cli: Callable[..., CliRun], tmp_path: Path
) -> None:
    """A typo in the path must not read as "nothing reclaimed"."""
    path = tmp_path / "state" / "ledger.jsonl"
    for args in ((), ("--json",), ("--by", "day")):
        done = ledger_cli(path, *args)
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert len(done.stderr_lines) == 1 and str(path) in done.stderr
    assert not path.parent.exists()  # reading never creates it


def test_torn_last_line_is_reported_and_skipped(
    ledger_cli: Callable[..., CliRun], ledger: Path
) -> None:
    with ledger.open("ab") as file:
        file.write(b'{"v":1,"time":"2026-03-05T00:00:00Z","action":"dele')

    done = ledger_cli(ledger, "--json")

    assert rows(done) == {"total": (5, ALL)}
    assert "torn" in done.stderr and str(ledger) in done.stderr
    assert f"line {len(RECORDS) + 1}" in done.stderr


def test_totals_of_a_real_sweep(
    run_sweeper: Callable[..., CliRun], ledger_cli: Callable[..., CliRun], tmp_path: Path
) -> None:
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    for epoch in (1, 2, 3):
        save_full(run / f"e{epoch}.pt", epoch=epoch, mtime_ns=days_ago(1) + epoch)
    ledger = tmp_path / "ledger.jsonl"
    swept = run_sweeper("sweep", tmp_path / "root", "--json", "--ledger", ledger)
    assert swept.returncode == 0, swept.stderr
    reclaimed = swept.json()["reclaimed_bytes"]
    assert reclaimed > 0

    by_root = rows(ledger_cli(ledger, "--json", "--by", "root"))
    today = datetime.now(UTC).date()
    by_day = rows(ledger_cli(ledger, "--json", "--by", "day"))

    assert by_root == {str(tmp_path / "root"): (4, reclaimed)}
    # Extracts of e2, e3, e1 and the delete of e1; the intent record does not count.
    assert set(by_day) <= {today.isoformat(), (today - timedelta(days=1)).isoformat()}
    assert sum(r for _, r in by_day.values()) == reclaimed
    assert outcome_total(ledger_lines(ledger)) == reclaimed


def test_a_large_ledger_is_read_in_memory_that_does_not_grow_with_it(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """A 40 MB ledger (100,000 deletions and their intents): the totals are right and the
    command's own peak memory stays far below the ledger's size (every record held at once
    took 4x the ledger's size)."""
    gnu_time = "/usr/bin/time"
    if not os.access(gnu_time, os.X_OK):
        pytest.skip("needs GNU time to read the command's own peak memory")
    ledger = tmp_path / "ledger.jsonl"
    write_history(ledger, 100_000)
    assert ledger.stat().st_size > 40 * 10**6
    usage = tmp_path / "usage"

    done = run_sweeper(
        "ledger", "--ledger", ledger, "--json", prefix=[gnu_time, "-f", "%M", "-o", usage]
    )

    assert done.returncode == 0, done.stderr
    (total,) = done.json()["rows"]
    assert total["count"] == 100_000
    assert total["reclaimed_bytes"] == sum(1000 + n for n in range(100_000))
    peak_kib = int(usage.read_text().split()[-1])
    assert peak_kib < 64 * 1024, f"{peak_kib} KiB"


def _bar_cells(line: str) -> float:
    """How many cells of a chart line the bar fills (a partial block is eighths)."""
    eighths = " ▏▎▍▌▋▊▉"
    return sum(1 if c == "█" else eighths.index(c) / 8 for c in line if c == "█" or c in "▏▎▍▌▋▊▉")


def test_a_chart_draws_the_trend_by_day(
    ledger_cli: Callable[..., CliRun], ledger: Path, tmp_path: Path
) -> None:
    # Three more days with a gap: 9 GiB on 6 March, 1 GiB on 8 March.
    with Ledger.open(ledger) as writer:
        for day, size in ((6, 9 * GiB), (8, GiB)):
            writer.append(
                new_record(
                    now=datetime(2026, 3, day, 12, tzinfo=UTC),
                    action=Action.DELETE,
                    path="/data/a/run/x.pt",
                    owner="alice",
                    uid=1000,
                    reason="test",
                    run_id="r2",
                    root="/data/a",
                    bytes_deleted=size,
                    reclaimed_bytes=size,
                )
            )
    done = run_cli("ledger", "--ledger", ledger, "--by", "day", "--chart", env={"COLUMNS": "60"})

    assert done.returncode == 0, done.stderr
    header, *lines, total = done.stdout.splitlines()
    assert header.split() == ["DAY", "RECLAIMED"]
    assert all(len(line) <= 60 for line in done.stdout.splitlines())
    days = [line.split()[0] for line in lines]
    assert days == [f"2026-03-0{d}" for d in range(1, 9)]  # days without records too
    bars = dict(zip(days, (_bar_cells(line) for line in lines), strict=True))
    assert bars["2026-03-06"] == max(bars.values()) > 30  # the biggest day fills the width
    assert bars["2026-03-01"] == pytest.approx(bars["2026-03-06"] * 5 / 9, abs=0.2)
    assert bars["2026-03-08"] == pytest.approx(bars["2026-03-06"] / 9, abs=0.2)
    assert 0 < bars["2026-03-03"] < 0.2  # 3 MiB shows, as the thinnest bar
    assert bars["2026-03-02"] == bars["2026-03-05"] == 0  # a net loss or nothing: no bar
    assert lines[3].rstrip().endswith(" 0 B")
    assert total.startswith("total: 15.0 GiB reclaimed")
    # --json stays the data: the chart is refused beside it, and needs --by
    assert ledger_cli(ledger, "--by", "day", "--chart", "--json").returncode == 2
    assert ledger_cli(ledger, "--chart").returncode == 2


def test_a_chart_by_owner_puts_who_got_most_back_first(
    ledger_cli: Callable[..., CliRun], ledger: Path
) -> None:
    done = ledger_cli(ledger, "--by", "owner", "--chart")
    assert done.returncode == 0, done.stderr
    owners = [line.split()[0] for line in done.stdout.splitlines()[1:-1]]
    assert owners == ["alice", "bob", "carol"]
    assert _bar_cells(done.stdout.splitlines()[1]) > _bar_cells(done.stdout.splitlines()[2])
