"""The persistent scan cache: a second sweep of an unchanged tree reads no file's contents (not
even the CRCs of the kept ones), any change is read again, and nothing in the cache, forged,
cut short or carried from another host, can make sweeper delete what it would not delete
without it."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import CliRun
from test_sweep import Sweeper
from trees import save_full, snapshot

from sweeper.scan_cache import path_for

BASE = 1_700_000_000 * 1_000_000_000
HOUR = 3_600_000_000_000
KEEP_TWO = "keep_full=2"


def _tree(root: Path) -> None:
    run = root / "run"
    run.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, 5):
        save_full(run / f"epoch{epoch}.pt", epoch=epoch, seed=epoch, mtime_ns=BASE + epoch * HOUR)


def _atimes(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_atime_ns for p in sorted(root.rglob("*.pt"))}


def _cache(sweeper: Sweeper) -> Path:
    return Path(path_for(sweeper.ledger))


def _rows(sweeper: Sweeper) -> list[tuple[Any, ...]]:
    with sqlite3.connect(_cache(sweeper)) as db:
        return db.execute("SELECT ino, verified, kind FROM files ORDER BY ino").fetchall()


def _plan(sweeper: Sweeper, *args: str) -> dict[str, str]:
    done = sweeper("--dry-run", "--json", KEEP_TWO, *args)
    assert done.returncode == 0, done.stderr
    return {Path(e["path"]).name: f"{e['action']}: {e['reason']}" for e in done.json()["entries"]}


@pytest.fixture
def sweeper(tmp_path: Path, run_sweeper: Callable[..., CliRun]) -> Sweeper:
    made = Sweeper(tmp_path, run_sweeper)
    made.ledger.parent.mkdir()
    return made


def test_a_second_sweep_reads_no_unchanged_file(
    sweeper: Sweeper, mount_tmpfs: Callable[..., Path]
) -> None:
    """On a filesystem that stamps every read (strictatime), the second dry run leaves every
    checkpoint's atime alone: each was found in the cache with a stat, and the two kept ones
    were not read again for their CRCs.  Both plans are the same; the cache file is private."""
    mount_tmpfs(64 << 20, at=sweeper.root, options="strictatime")
    _tree(sweeper.root)
    first = _plan(sweeper)
    read_once = _atimes(sweeper.root)
    assert [row[1] for row in _rows(sweeper)].count(1) == 2  # the two kept: CRCs read
    assert stat.S_IMODE(_cache(sweeper).stat().st_mode) == 0o600

    assert _plan(sweeper) == first
    assert _atimes(sweeper.root) == read_once
    assert _plan(sweeper, "--no-cache") == first
    assert _atimes(sweeper.root) != read_once  # (the check can fail: --no-cache reads)


def test_a_changed_file_is_read_again(sweeper: Sweeper) -> None:
    """Rewritten in place with its old mtime (same inode): its ctime tells, and it is read."""
    _tree(sweeper.root)
    _plan(sweeper)
    run = sweeper.root / "run"
    save_full(run / "epoch4.pt", epoch=0, seed=9, mtime_ns=BASE + 4 * HOUR)  # same mtime
    assert "(epoch 0)" in _plan(sweeper)["epoch4.pt"]


def _forge(
    sweeper: Sweeper,
    name: str,
    kind: str,
    epoch: int,
    output: int | None = None,
    rest: str | None = None,
    verified: int | None = None,
) -> None:
    ino = (sweeper.root / "run" / name).stat().st_ino
    with sqlite3.connect(_cache(sweeper)) as db:
        db.execute(
            "UPDATE files SET kind = ?, epoch = ?, output = ?, rest = ? WHERE ino = ?",
            (kind, epoch, output, rest, ino),
        )
        if verified is not None:
            db.execute("UPDATE files SET verified = ? WHERE ino = ?", (verified, ino))


def test_a_forged_entry_cannot_make_sweeper_delete_a_checkpoint(sweeper: Sweeper) -> None:
    """The newest full checkpoint forged as an inference copy is merely skipped (never
    deleted); an old one forged as having its copy already in place is planned for deletion,
    and the deletion fails its execute-time check (the copy is not there): nothing is lost."""
    _tree(sweeper.root)
    _plan(sweeper)
    _forge(sweeper, "epoch4.pt", "I", 4)
    _forge(sweeper, "epoch1.pt", "F", 1, 3887, '{"c":"c"}')
    plan = _plan(sweeper)
    assert plan["epoch4.pt"].startswith("skip")
    assert plan["epoch1.pt"].startswith("delete")

    done = sweeper("--json", KEEP_TWO)

    assert done.returncode == 1
    outcomes = {Path(o["path"]).name: o for o in done.json()["outcomes"]}
    assert not outcomes["epoch1.pt"]["ok"]
    assert (sweeper.root / "run" / "epoch1.pt").exists()
    assert (sweeper.root / "run" / "epoch4.pt").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "another host", "bad row"])
def test_a_damaged_or_foreign_cache_is_replaced_and_the_plan_is_the_same(
    sweeper: Sweeper, damage: str
) -> None:
    _tree(sweeper.root)
    first = _plan(sweeper)
    cache = _cache(sweeper)
    if damage == "truncated":
        os.truncate(cache, cache.stat().st_size // 3)
        for suffix in ("-wal", "-shm"):
            Path(f"{cache}{suffix}").unlink(missing_ok=True)
    elif damage == "garbage":
        cache.write_bytes(b"not a database" * 100)
    elif damage == "another host":
        with sqlite3.connect(cache) as db:
            db.execute("UPDATE meta SET value = 'elsewhere' WHERE key = 'host'")
        _forge(sweeper, "epoch1.pt", "I", 1)
    else:
        _forge(sweeper, "epoch1.pt", "Z", 1, None, '{"nonsense":[')
    before = snapshot(sweeper.root)
    assert _plan(sweeper) == first
    assert snapshot(sweeper.root) == before
    assert len(_rows(sweeper)) == 4


def test_no_cache_in_a_folder_others_can_write(sweeper: Sweeper, tmp_path: Path) -> None:
    """sqlite follows symlinks: with the ledger in a folder anyone can write, a planted
    symlink at the cache's name would make root write a database over its target.  There is
    no cache there at all; the target is untouched and the plan the same."""
    _tree(sweeper.root)
    first = _plan(sweeper)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{_cache(sweeper)}{suffix}").unlink(missing_ok=True)
    os.chmod(sweeper.ledger.parent, 0o1777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    _cache(sweeper).symlink_to(victim)
    assert _plan(sweeper) == first
    assert victim.read_bytes() == b""


def test_a_file_dated_centuries_ahead_is_read_each_time_and_harms_no_other(
    sweeper: Sweeper,
) -> None:
    """sqlite holds 64-bit integers; a user's `touch -d 2400-01-01` puts an mtime past them.
    That file is not cached (read every time); the other files' rows are kept, no file is
    called unreadable, and the cache goes on working for the next run."""
    _tree(sweeper.root)
    future = sweeper.root / "run" / "epoch9.pt"
    save_full(future, epoch=9, seed=9, mtime_ns=BASE)
    os.utime(future, ns=(13_250_000_000 * 10**9, 13_250_000_000 * 10**9))  # the year 2389
    assert future.stat().st_mtime_ns >= 2**63

    first = _plan(sweeper)
    assert not any("unreadable" in why for why in first.values()), first
    assert len(_rows(sweeper)) == 4  # every file but the one from the future
    assert first.pop("epoch9.pt").startswith("skip: skipped: changed -")  # (N s ago: it moves)
    again = _plan(sweeper)
    assert again.pop("epoch9.pt").startswith("skip: skipped: changed -")
    assert again == first
    assert len(_rows(sweeper)) == 4
