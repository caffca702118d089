"""The ledger stays bounded: compaction keeps every total exact and the old records as segments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import CliRun
from trees import ledger_lines, save_full, write_history

MIB = 2**20
NO_AGE = "min_age_seconds=0"


def _totals(run_sweeper: Any, ledger: Path) -> dict[str, Any]:
    found = {}
    for how in ([], ["--by", "root"], ["--by", "owner"], ["--by", "day"]):
        for since in ([], ["--since", "2026-11-05"]):
            done: CliRun = run_sweeper("ledger", "--ledger", ledger, "--json", *how, *since)
            assert done.returncode == 0, done.stderr
            found[" ".join([*how, *since])] = json.loads(done.stdout)
    return found


def test_a_ledger_past_its_limit_is_compacted_with_every_total_kept(
    tmp_path: Path, run_sweeper: Any
) -> None:
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    ledger = tmp_path / "state" / "ledger.jsonl"
    write_history(ledger, 3000)
    assert ledger.stat().st_size > 1 * MIB
    before = _totals(run_sweeper, ledger)
    old = ledger.read_bytes()
    save_full(run / "epoch1.pt", epoch=1, mtime_ns=1_700_000_000 * 10**9)

    done = run_sweeper(
        "sweep", tmp_path / "root", "--ledger", ledger, NO_AGE, f"ledger_max_bytes={MIB}"
    )

    assert done.returncode == 0, done.stderr
    assert "compacted: 6000 records into" in done.stderr
    assert (tmp_path / "state" / "ledger.jsonl.1").read_bytes() == old  # the detail, kept
    records = ledger_lines(ledger)
    carries = [r for r in records if r["action"] == "carry"]
    assert len(carries) == 11 * 3 * 2  # one per UTC day (11 of them), root and owner
    assert sum(r["records"] for r in carries) == 3000
    assert [r["action"] for r in records[len(carries) :]] == ["extract-intent", "extract"]
    assert ledger.stat().st_size < 50_000
    after = _totals(run_sweeper, ledger)
    written = records[-1]["bytes_written"]
    for key, table in before.items():
        later = after[key]
        if key in ("", "--since 2026-11-05"):  # one row: the total, plus this sweep's copy
            (now,), (then,) = later["rows"], table["rows"]
            assert now["reclaimed_bytes"] == then["reclaimed_bytes"] - written
            assert now["count"] == then["count"] + 1
        else:
            extra = {r["key"] for r in later["rows"]} - {r["key"] for r in table["rows"]}
            kept = [r for r in later["rows"] if r["key"] not in extra]
            assert kept == table["rows"], key


def test_segments_shift_and_the_oldest_goes(tmp_path: Path, run_sweeper: Any) -> None:
    (tmp_path / "root").mkdir()
    ledger = tmp_path / "state" / "ledger.jsonl"
    args = ["sweep", tmp_path / "root", "--ledger", ledger, f"ledger_max_bytes={MIB}"]
    generations = []
    for _ in range(3):
        write_history(ledger, 3000)
        generations.append(ledger.read_bytes())
        done = run_sweeper(*args, "ledger_segments=2")
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "state" / "ledger.jsonl.1").read_bytes() == generations[2]
    assert (tmp_path / "state" / "ledger.jsonl.2").read_bytes() == generations[1]
    assert not (tmp_path / "state" / "ledger.jsonl.3").exists()
    (total,) = json.loads(run_sweeper("ledger", "--ledger", ledger, "--json").stdout)["rows"]
    assert total["count"] == 3 * 3000
    assert total["reclaimed_bytes"] == 3 * sum(1000 + n for n in range(3000))


def test_a_ledger_under_its_limit_is_left_alone(tmp_path: Path, run_sweeper: Any) -> None:
    (tmp_path / "root").mkdir()
    ledger = tmp_path / "state" / "ledger.jsonl"
    write_history(ledger, 3000)
    size = ledger.stat().st_size
    args = ["sweep", tmp_path / "root", "--ledger", ledger]
    assert run_sweeper(*args).returncode == 0  # the default limit is 64 MiB
    assert ledger.stat().st_size == size
    assert not (tmp_path / "state" / "ledger.jsonl.1").exists()


def test_since_at_a_time_of_day_after_compaction_says_it_counts_whole_days(
    tmp_path: Path, run_sweeper: Any
) -> None:
    (tmp_path / "root").mkdir()
    ledger = tmp_path / "state" / "ledger.jsonl"
    write_history(ledger, 3000)
    done = run_sweeper("sweep", tmp_path / "root", "--ledger", ledger, f"ledger_max_bytes={MIB}")
    assert done.returncode == 0, done.stderr

    by_day = run_sweeper("ledger", "--ledger", ledger, "--since", "2026-11-05")
    by_time = run_sweeper("ledger", "--ledger", ledger, "--since", "2026-11-05T18:00")

    assert by_day.returncode == by_time.returncode == 0
    assert "compacted totals" not in by_day.stderr
    assert "exact only to the UTC day" in by_time.stderr
