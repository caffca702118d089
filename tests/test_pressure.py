"""Disk pressure: the watermarks, their hysteresis, and sweeps that act harder on a filling disk.

The end-to-end tests fill a real tmpfs with real checkpoints and a filler file, then let the
real CLI (and the real daemon) bring free space back; nothing about free space is faked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import full_checkpoint
from conftest import CliRun, run_cli
from daemon_harness import RESCAN_SECONDS, SETTLE_SECONDS, Daemon, NotifySocket, daemon_status
from trees import days_ago, held_by_another_process, set_mtime

from sweeper.policy import Rules
from sweeper.pressure import (
    PressureRules,
    Space,
    Watermark,
    bytes_needed,
    measure,
    parse_watermark,
    pressured_rules,
    under_pressure,
)

MiB = 2**20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10%", Watermark("10%", percent=10.0)),
        (" 12.5 % ", Watermark("12.5 %", percent=12.5)),
        ("5368709120", Watermark("5368709120", bytes=5 * 2**30)),
        ("5GiB", Watermark("5GiB", bytes=5 * 2**30)),
        ("64 MiB", Watermark("64 MiB", bytes=64 * MiB)),
        ("1B", Watermark("1B", bytes=1)),
    ],
)
def test_watermarks_parse(text: str, expected: Watermark) -> None:
    assert parse_watermark(text) == expected


@pytest.mark.parametrize("text", ["", "0%", "100%", "150%", "-1", "0", "5GB", "5 gib", "ten", "%"])
def test_bad_watermarks_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text) if text else "neither"):
        parse_watermark(text)


RULES = PressureRules(parse_watermark("10%"), parse_watermark("15%"), keep_full=1)
BYTES_RULES = PressureRules(parse_watermark("100B"), parse_watermark("150B"), keep_full=1)


@pytest.mark.parametrize(
    ("rules", "free", "active", "expected", "needed"),
    [
        (RULES, 150, False, False, 0),  # plenty free
        (RULES, 100, False, False, 50),  # at free_below is not below it
        (RULES, 99, False, True, 51),  # below: enter
        (RULES, 120, True, True, 30),  # between the lines: stay in (hysteresis)
        (RULES, 120, False, False, 30),  # between the lines: stay out
        (RULES, 150, True, False, 0),  # at free_target: leave
        (RULES, 0, True, True, 150),
        (BYTES_RULES, 99, False, True, 51),
        (BYTES_RULES, 149, True, True, 1),
        (BYTES_RULES, 150, True, False, 0),
        # a target below the start line still ends pressure only above the start line
        (PressureRules(parse_watermark("10%"), parse_watermark("100B")), 120, True, False, 0),
        (PressureRules(parse_watermark("10%"), parse_watermark("100B")), 99, True, True, 1),
    ],
)
def test_pressure_has_hysteresis(
    rules: PressureRules, free: int, active: bool, expected: bool, needed: int
) -> None:
    space = Space("/fs", 1, free_bytes=free, total_bytes=1000)
    assert under_pressure(space, rules, active=active) is expected
    assert bytes_needed(space, rules) == needed


def test_a_filesystem_without_a_size_is_never_under_pressure() -> None:
    assert not under_pressure(Space("/proc", 1, 0, 0), RULES, active=True)


@pytest.mark.parametrize(
    ("keep_full", "min_age", "settle", "expected"),
    [(3, 600, 30.0, (1, 30)), (1, 600, 0.5, (1, 1)), (2, 10, 30.0, (1, 10))],
)
def test_pressure_changes_the_pace_only(
    keep_full: int, min_age: int, settle: float, expected: tuple[int, int]
) -> None:
    rules = Rules(keep_full=keep_full, min_age_seconds=min_age, keep_best=1, keep_every=5)
    harder = pressured_rules(rules, RULES, settle)
    assert (harder.keep_full, harder.min_age_seconds) == expected
    assert (harder.keep_best, harder.keep_every, harder.rolling_names) == (
        1,
        5,
        rules.rolling_names,
    )


def test_pressure_never_keeps_no_full_checkpoint() -> None:
    with pytest.raises(ValueError, match="keep_full"):
        PressureRules(keep_full=0)


# -- on a real filesystem --------------------------------------------------------------------


def save_sized(path: Path, width: int, *, epoch: int, days: float) -> int:
    """A full checkpoint of a ``width`` x ``width`` layer with AdamW state (about three times
    its weights), written ``days`` ago; returns its size."""
    torch.manual_seed(epoch)
    model = torch.nn.Linear(width, width)
    torch.save(full_checkpoint(epoch=epoch, model=model), path)
    set_mtime(path, days_ago(days))
    return path.stat().st_size


def fill_to(disk: Path, free_bytes: int) -> Path:
    """A filler file that leaves about ``free_bytes`` free on ``disk``."""
    filler = disk / "filler.bin"
    space = measure(str(disk))
    size = space.free_bytes - free_bytes
    assert size > 0, (space, free_bytes)
    with open(filler, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, size)
    return filler


def build_runs(disk: Path) -> dict[str, list[Path]]:
    """``big``: three checkpoints of about 6 MiB and an older rolling ``last.pt``; ``small``:
    three of about 1.5 MiB."""
    runs: dict[str, list[Path]] = {}
    for name, width in (("big", 724), ("small", 362)):
        folder = disk / name
        folder.mkdir()
        runs[name] = []
        for epoch in (1, 2, 3):
            path = folder / f"epoch_{epoch}.pt"
            save_sized(path, width, epoch=epoch, days=4 - epoch)
            runs[name].append(path)
    save_sized(disk / "big" / "last.pt", 724, epoch=0, days=9)
    return runs


SETTINGS = ("keep_full=3", "min_age_seconds=0")


def sweep(run_sweeper: Callable[..., CliRun], disk: Path, tmp_path: Path, *args: str) -> CliRun:
    return run_sweeper("sweep", disk, *SETTINGS, *args, "--ledger", tmp_path / "ledger.jsonl")


def test_sweep_on_a_filling_disk_frees_only_what_is_needed_largest_first(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    disk = mount_tmpfs(64 * MiB)
    runs = build_runs(disk)
    first = sweep(run_sweeper, disk, tmp_path)  # plenty free: copies of all, nothing deleted
    assert first.returncode == 0, first.stderr
    total = measure(str(disk)).total_bytes
    fill_to(disk, total // 20)  # 5% free: below free_below (10%)
    before = measure(str(disk))
    needed = bytes_needed(before, PressureRules())

    planned = sweep(run_sweeper, disk, tmp_path, "--dry-run", "--json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    (pressure,) = plan["pressure"]
    assert pressure == {
        "filesystem": str(disk),
        "free_bytes": before.free_bytes,
        "total_bytes": total,
        "needed_bytes": needed,
        "keep_full": 1,
    }
    deleted = {
        Path(e["path"]).relative_to(disk).as_posix()
        for e in plan["entries"]
        if e["action"] == "delete"
    }
    # big alone gives back enough: small is left at the usual pace (keep_full=3)
    assert deleted == {"big/epoch_1.pt", "big/epoch_2.pt"}
    assert plan["entries"][0]["path"].startswith(str(disk / "big"))
    assert needed <= plan["expected_reclaimed_bytes"]
    reasons = {e["path"]: e["reason"] for e in plan["entries"]}
    assert "disk pressure on" in reasons[str(runs["big"][0])]
    text = sweep(run_sweeper, disk, tmp_path, "--dry-run")
    assert f"disk pressure on {disk}: " in text.stdout

    done = sweep(run_sweeper, disk, tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["reclaimed_bytes"] == plan["expected_reclaimed_bytes"]
    after = measure(str(disk))
    assert not under_pressure(after, PressureRules(), active=True)
    assert [p.exists() for p in runs["big"]] == [False, False, True]
    assert all(p.with_name(f"{p.stem}_inference.pt").exists() for p in runs["big"])
    assert (disk / "big" / "last.pt").exists()  # a rolling name stays whatever the pressure
    assert all(p.exists() for p in runs["small"])
    assert "pressure" not in json.loads(
        sweep(run_sweeper, disk, tmp_path, "--dry-run", "--json").stdout
    )


def test_sweep_without_pressure_keeps_its_usual_pace(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    disk = mount_tmpfs(64 * MiB)
    runs = build_runs(disk)
    assert sweep(run_sweeper, disk, tmp_path).returncode == 0  # copies of all, written first
    fill_to(disk, measure(str(disk)).total_bytes // 8)  # 12.5% free: above free_below
    done = sweep(run_sweeper, disk, tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert "pressure" not in result
    assert result["counts"]["delete"] == 0
    assert all(p.exists() for paths in runs.values() for p in paths)


def test_sweep_under_pressure_with_nothing_allowed_deletes_nothing(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """Pressure changes the pace, not the safety rules: a run's newest checkpoint stays."""
    disk = mount_tmpfs(32 * MiB)
    (disk / "run").mkdir()
    only = disk / "run" / "epoch_1.pt"
    save_sized(only, 724, epoch=1, days=1)
    assert sweep(run_sweeper, disk, tmp_path).returncode == 0  # its copy, written first
    fill_to(disk, MiB)
    done = sweep(run_sweeper, disk, tmp_path, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["pressure"][0]["keep_full"] == 1
    assert result["counts"]["delete"] == 0
    assert only.exists()


# -- the daemon ------------------------------------------------------------------------------


def test_the_daemon_enters_pressure_frees_space_and_leaves_it(
    mount_tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    """A writer fills the disk below free_below: the daemon says so (log, STATUS=), sweeps
    at the harder pace, largest run folder first and only as far as needed, brings free space
    back to free_target without touching a protected file, and says pressure is over."""
    disk = mount_tmpfs(64 * MiB)
    root = disk / "root"
    root.mkdir()
    runs = build_runs(root)
    ledger = tmp_path / "state" / "ledger.jsonl"
    prom = tmp_path / "sweeper.prom"
    notify = NotifySocket(tmp_path / "notify.sock")
    settings = [
        f"settle_seconds={SETTLE_SECONDS}",
        f"rescan_seconds={RESCAN_SECONDS * 30}",  # pressure, not the rescan, must do it
        "storm_rescan_seconds=60",
        f"metrics_file={prom}",
        *SETTINGS,
    ]
    daemon = Daemon(tmp_path, [*settings, str(root)], notify=notify, ledger=ledger)
    try:
        daemon.wait_ready()  # the catch-up wrote every copy; keep_full=3 deleted nothing
        assert all(p.exists() for paths in runs.values() for p in paths)
        assert "disk pressure" not in daemon.log()

        fill_to(disk, measure(str(disk)).total_bytes // 20)  # a writer leaves 5% free
        daemon.wait_for(lambda message: message.startswith("STATUS=DISK PRESSURE on "))
        daemon.wait_log(f"disk pressure over on {disk}")
        log = daemon.log()
        assert log.index(f"WARNING sweeper.daemon: disk pressure on {disk}: ") < log.index(
            f"WARNING sweeper.daemon: disk pressure over on {disk}"
        )
        after = measure(str(disk))
        assert after.free_bytes >= PressureRules().target_bytes(after.total_bytes)
        assert [p.exists() for p in runs["big"]] == [False, False, True]  # newest stays
        assert all(p.with_name(f"{p.stem}_inference.pt").exists() for p in runs["big"])
        assert (root / "big" / "last.pt").exists()  # a rolling name stays
        assert all(p.exists() for p in runs["small"])  # big alone was enough

        over = [
            {
                "filesystem": str(disk),
                "free_bytes": after.free_bytes,
                "total_bytes": after.total_bytes,
                "pressure": False,
            }
        ]
        daemon.wait_until(
            lambda: daemon_status(ledger)["filesystems"] == over, "the status file to say so"
        )
        text = run_cli("status", "--ledger", ledger).stdout
        assert f"disk: {disk}: " in text and "UNDER PRESSURE" not in text
        daemon.wait_until(
            lambda: 'sweeper_pressure_active{filesystem="' + str(disk) + '"} 0' in prom.read_text(),
            "the metrics to say pressure is over",
        )
    finally:
        daemon.stop()
        notify.close()


def test_pressure_never_touches_pinned_open_or_newest_checkpoints(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """However far below its target the disk is, what the safety rules protect stays: a pin
    (NAME.keep, a flock), a file another process has open, the newest checkpoint of a run."""
    disk = mount_tmpfs(64 * MiB)
    runs = build_runs(disk)
    assert sweep(run_sweeper, disk, tmp_path).returncode == 0  # copies of all, written first
    (disk / "big" / "epoch_1.pt.keep").touch()
    fill_to(disk, measure(str(disk)).total_bytes // 100)  # 1% free: far below the target
    with (
        held_by_another_process(runs["big"][1], "read"),
        held_by_another_process(runs["small"][0], "flock"),
    ):
        done = sweep(run_sweeper, disk, tmp_path, "--json")
        again = sweep(run_sweeper, disk, tmp_path, "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["pressure"][0]["needed_bytes"] > result["expected_reclaimed_bytes"]
    gone = {str(p.relative_to(disk)) for paths in runs.values() for p in paths if not p.exists()}
    assert gone == {"small/epoch_2.pt"}  # the only one nothing protects
    assert (disk / "big" / "last.pt").exists()
    still = json.loads(again.stdout)
    assert still["pressure"] and still["counts"]["delete"] == 0  # nothing more is allowed


def test_pressure_is_per_filesystem(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """Two roots on two filesystems, one of them filling: only that one's runs are swept at
    the harder pace."""
    full, roomy = mount_tmpfs(32 * MiB), mount_tmpfs(32 * MiB)
    for disk in (full, roomy):
        (disk / "run").mkdir()
        for epoch in (1, 2, 3):
            save_sized(disk / "run" / f"epoch_{epoch}.pt", 362, epoch=epoch, days=4 - epoch)
    ledger = tmp_path / "ledger.jsonl"
    first = run_sweeper("sweep", full, roomy, *SETTINGS, "--ledger", ledger)
    assert first.returncode == 0, first.stderr
    fill_to(full, measure(str(full)).total_bytes // 20)
    done = run_sweeper("sweep", full, roomy, *SETTINGS, "--ledger", ledger, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [p["filesystem"] for p in result["pressure"]] == [str(full)]
    assert sorted(p.name for p in (full / "run").glob("epoch_?.pt")) == ["epoch_3.pt"]
    assert len(list((roomy / "run").glob("epoch_?.pt"))) == 3
