"""Tests for sweeper.ledger: real files in tmp_path, real processes for the locks."""

from __future__ import annotations

import base64
import json
import math
import os
import stat
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sweeper.errors import AlreadyRunning, FileRefused
from sweeper.ledger import (
    Action,
    Ledger,
    LedgerRecord,
    Metric,
    SummaryRow,
    acquire_instance_lock,
    append_record,
    instance_lock_path_for,
    lock_path_for,
    new_record,
    read_ledger,
    summarise,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2024, 5, 17, 13, 45, 12, 345678, tzinfo=timezone.utc)


def make_record(**overrides: Any) -> LedgerRecord:
    fields: dict[str, Any] = {
        "now": NOW,
        "host": "gpu-01",
        "action": Action.DELETE,
        "path": "/data/alice/run1/ckpt_epoch3.pt",
        "owner": "alice",
        "uid": 1001,
        "epoch": 3,
        "metric": Metric("val_loss", 0.25),
        "reason": "older than the 2 newest full checkpoints",
        "output": "/data/alice/run1/ckpt_epoch3.inference.pt",
        "bytes_deleted": 3000,
        "bytes_written": 1000,
        "reclaimed_bytes": 2000,
        "run_id": "run-a",
        "root": "/data",
    }
    fields.update(overrides)
    return new_record(**fields)


def strict_json(line: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --- writing and reading ------------------------------------------------------------------------


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    ledger_path = tmp_path / "state" / "ledger.jsonl"
    records = [
        make_record(),
        make_record(
            action=Action.DELETE_INTENT,
            reclaimed_bytes=None,
            bytes_deleted=0,
            bytes_written=0,
            metric=None,
            epoch=None,
            output=None,
        ),
        make_record(action=Action.EXTRACT, bytes_deleted=0, reclaimed_bytes=-1000),
        make_record(action=Action.FAIL, reason="corrupt zip: bad CRC", reclaimed_bytes=None),
    ]
    with Ledger.open(ledger_path) as ledger:
        for record in records[:2]:
            ledger.append(record)
    for record in records[2:]:
        append_record(ledger_path, record)

    result = read_ledger(ledger_path)

    assert result.warnings == ()
    assert result.records == tuple(records)
    assert result.records[0].time == NOW
    assert result.records[0].time.tzinfo is timezone.utc


def test_new_record_converts_time_to_utc_and_fills_host() -> None:
    local = datetime(2024, 5, 17, 15, 45, tzinfo=timezone(timedelta(hours=2)))
    record = make_record(now=local, host=None)
    assert record.time == datetime(2024, 5, 17, 13, 45, tzinfo=timezone.utc)
    assert record.time.tzinfo is timezone.utc
    assert isinstance(record.host, str) and record.host


def test_naive_time_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_record(now=datetime(2024, 5, 17, 13, 45))


def test_negative_byte_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="bytes_deleted"):
        make_record(bytes_deleted=-1)


def test_lines_are_strict_ascii_json_with_utc_time(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    for epoch in range(5):
        append_record(ledger_path, make_record(epoch=epoch, path="/data/ünïcode/é.pt"))

    data = ledger_path.read_bytes()

    assert data.endswith(b"\n")
    lines = data.decode("ascii").split("\n")[:-1]
    assert len(lines) == 5
    for epoch, line in enumerate(lines):
        obj = strict_json(line)
        assert obj["epoch"] == epoch
        assert obj["time"] == "2024-05-17T13:45:12.345678Z"
        assert obj["path"] == "/data/ünïcode/é.pt"
        assert "path_b64" not in obj


def test_each_record_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    append_record(ledger_path, make_record())  # create the files before counting
    ledger_inode = ledger_path.stat().st_ino
    real_write = os.write
    writes: list[bytes] = []

    def counting_write(fd: int, data: Any) -> int:
        if os.fstat(fd).st_ino == ledger_inode:  # not the copy in the owner's view
            writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    with Ledger.open(ledger_path) as ledger:
        for epoch in range(3):
            ledger.append(make_record(epoch=epoch, path=os.fsdecode(b"/d/x\n\xff.pt")))
    monkeypatch.undo()

    assert len(writes) == 3
    for write in writes:
        assert write.endswith(b"\n")
        assert write.count(b"\n") == 1
    assert ledger_path.read_bytes().count(b"\n") == 4


def test_metric_nan_and_infinity_stay_strict_json(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    append_record(ledger_path, make_record(metric=Metric("loss", math.nan)))
    append_record(ledger_path, make_record(metric=Metric("loss", -math.inf)))

    for line in ledger_path.read_text().splitlines():
        strict_json(line)
    first, second = read_ledger(ledger_path).records
    assert first.metric is not None and math.isnan(first.metric.value)
    assert second.metric == Metric("loss", -math.inf)


def test_missing_ledger_reads_empty_and_creates_nothing(tmp_path: Path) -> None:
    result = read_ledger(tmp_path / "absent" / "ledger.jsonl")
    assert result.records == ()
    assert result.warnings == ()
    assert list(tmp_path.iterdir()) == []


# --- damaged ledgers ----------------------------------------------------------------------------


def test_torn_last_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    append_record(ledger_path, make_record(epoch=1))
    append_record(ledger_path, make_record(epoch=2))
    whole = ledger_path.read_bytes().split(b"\n")[0]
    with ledger_path.open("ab") as file:
        file.write(whole[: len(whole) // 2])  # a crash halfway through the third append

    result = read_ledger(ledger_path)

    assert [record.epoch for record in result.records] == [1, 2]
    assert len(result.warnings) == 1
    assert str(ledger_path) in result.warnings[0]
    assert "line 3" in result.warnings[0]
    assert "torn" in result.warnings[0]


def test_append_after_torn_line_does_not_fuse_with_it(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    append_record(ledger_path, make_record(epoch=1))
    with ledger_path.open("ab") as file:
        file.write(b'{"v":1,"time":"2024-')

    append_record(ledger_path, make_record(epoch=2))
    result = read_ledger(ledger_path)

    assert [record.epoch for record in result.records] == [1, 2]
    assert len(result.warnings) == 1
    assert "line 2" in result.warnings[0]
    assert "corrupt" in result.warnings[0]


def test_complete_last_line_without_newline_is_kept_with_a_warning(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    append_record(ledger_path, make_record(epoch=1))
    append_record(ledger_path, make_record(epoch=2))
    ledger_path.write_bytes(ledger_path.read_bytes()[:-1])

    result = read_ledger(ledger_path)

    assert [record.epoch for record in result.records] == [1, 2]
    assert len(result.warnings) == 1
    assert "line 2" in result.warnings[0]


def test_corrupt_lines_in_the_middle_are_reported_and_skipped(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    append_record(ledger_path, make_record(epoch=1))
    with ledger_path.open("ab") as file:
        file.write(b"not json at all\n")
        file.write(b'{"v":1,"time":"2024-05-17T00:00:00Z"}\n')  # JSON, but not a record
        file.write(b"\xff\xfe garbage\n")
    append_record(ledger_path, make_record(epoch=5))

    result = read_ledger(ledger_path)

    assert [record.epoch for record in result.records] == [1, 5]
    assert len(result.warnings) == 3
    for number, warning in zip((2, 3, 4), result.warnings, strict=True):
        assert f"line {number}:" in warning
        assert str(ledger_path) in warning


# --- awkward file names -------------------------------------------------------------------------


def test_non_utf8_and_newline_names_round_trip(tmp_path: Path) -> None:
    raw_name = b"bad\xff\nname.pt"
    (tmp_path / os.fsdecode(raw_name)).write_bytes(b"checkpoint")
    (tmp_path / "ok\nname-\u00e9.pt").write_bytes(b"checkpoint")
    on_disk = sorted(os.listdir(tmp_path))
    assert os.fsdecode(raw_name) in on_disk
    ledger_path = tmp_path / "state" / "ledger.jsonl"
    for name in on_disk:
        path = os.path.join(os.fsdecode(tmp_path), name)
        append_record(ledger_path, make_record(path=path, output=path + ".inference"))

    lines = ledger_path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    objs = [strict_json(line.decode("ascii")) for line in lines[:-1]]
    assert len(objs) == 2
    by_name = {os.path.basename(obj["path"]): obj for obj in objs}
    bad = by_name["bad\\xff\nname.pt"]
    assert base64.b64decode(bad["path_b64"]) == os.fsencode(tmp_path) + b"/" + raw_name
    assert "output_b64" in bad
    assert "path_b64" not in by_name["ok\nname-\u00e9.pt"]

    result = read_ledger(ledger_path)

    assert result.warnings == ()
    for record in result.records:
        assert os.path.basename(record.path) in on_disk
        assert Path(record.path).read_bytes() == b"checkpoint"
        assert record.output == record.path + ".inference"


# --- file safety --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])  # 0o077: the systemd units' UMask=
def test_files_are_private(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "new" / "state"
    ledger_path = state / "ledger.jsonl"
    old_umask = os.umask(umask)
    try:
        append_record(ledger_path, make_record())
        acquire_instance_lock(ledger_path).release()
    finally:
        os.umask(old_umask)

    # Traversable but not listable: users open their own views inside (test_ledger_views.py).
    assert stat.S_IMODE(state.stat().st_mode) == 0o711
    assert stat.S_IMODE(ledger_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(lock_path_for(ledger_path)).stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(instance_lock_path_for(ledger_path)).stat().st_mode) == 0o600


def test_symlinked_ledger_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    ledger_path = tmp_path / "ledger.jsonl"
    ledger_path.symlink_to(target)

    with pytest.raises(FileRefused, match="symlink"):
        append_record(ledger_path, make_record())
    with pytest.raises(FileRefused, match="symlink"):
        read_ledger(ledger_path)
    assert target.read_text() == "precious\n"


def test_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    ledger_path = tmp_path / "ledger.jsonl"
    Path(lock_path_for(ledger_path)).symlink_to(target)

    with pytest.raises(FileRefused, match="symlink"):
        Ledger.open(ledger_path)
    assert not ledger_path.exists()
    assert target.read_text() == "precious\n"


def test_fifo_in_place_of_ledger_is_refused(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    os.mkfifo(ledger_path)
    with pytest.raises(FileRefused, match="not a regular file"):
        append_record(ledger_path, make_record())
    with pytest.raises(FileRefused, match="not a regular file"):
        read_ledger(ledger_path)


# --- locks across processes ---------------------------------------------------------------------

CONCURRENT_WRITER = """
    import os, sys, time
    from datetime import datetime, timezone
    from sweeper.ledger import Ledger, append_record, new_record

    ledger_path, start_flag, run_id, mode = sys.argv[1:]
    while not os.path.exists(start_flag):
        time.sleep(0.001)
    now = datetime.now(timezone.utc)

    def record(i):
        return new_record(
            now=now, action="delete", path=f"/data/{run_id}/ckpt_{i}.pt" + "x" * 3000,
            owner="bob", uid=1002, reason="old", run_id=run_id, root="/data",
            epoch=i, bytes_deleted=10, reclaimed_bytes=10,
        )

    if mode == "single":
        for i in range(200):
            append_record(ledger_path, record(i))
    else:
        for batch in range(20):
            with Ledger.open(ledger_path) as ledger:
                for i in range(batch * 10, batch * 10 + 10):
                    ledger.append(record(i))
"""


def test_two_processes_appending_at_once_never_interleave(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    start_flag = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    code = textwrap.dedent(CONCURRENT_WRITER)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(ledger_path), str(start_flag), run_id, mode],
            env=env,
        )
        for run_id, mode in (("writer-a", "single"), ("writer-b", "batch"))
    ]
    start_flag.touch()
    for writer in writers:
        assert writer.wait(timeout=120) == 0

    data = ledger_path.read_bytes()
    lines = data.split(b"\n")
    assert lines[-1] == b""
    objs = [strict_json(line.decode("ascii")) for line in lines[:-1]]
    assert len(objs) == 400
    for run_id in ("writer-a", "writer-b"):
        assert [obj["epoch"] for obj in objs if obj["run_id"] == run_id] == list(range(200))
    result = read_ledger(ledger_path)
    assert result.warnings == ()
    assert len(result.records) == 400


FLOCK_PROBE = """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(3)
"""


def test_open_ledger_holds_the_writer_lock_until_closed(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    lock_path = lock_path_for(ledger_path)

    with Ledger.open(ledger_path) as ledger:
        ledger.append(make_record())
        assert run_python(FLOCK_PROBE, lock_path).returncode == 3

    assert run_python(FLOCK_PROBE, lock_path).returncode == 0


INSTANCE_PROBE = """
    import sys
    from sweeper.errors import AlreadyRunning
    from sweeper.ledger import acquire_instance_lock
    try:
        lock = acquire_instance_lock(sys.argv[1])
    except AlreadyRunning as error:
        print(error)
        sys.exit(3)
    lock.release()
"""


def test_second_instance_in_another_process_is_refused_until_release(tmp_path: Path) -> None:
    ledger_path = tmp_path / "state" / "ledger.jsonl"
    pid_path = instance_lock_path_for(ledger_path)

    lock = acquire_instance_lock(ledger_path)
    try:
        assert Path(pid_path).read_text() == f"{os.getpid()}\n"
        refused = run_python(INSTANCE_PROBE, str(ledger_path))
        assert refused.returncode == 3, refused.stderr
        assert pid_path in refused.stdout
        assert str(os.getpid()) in refused.stdout
        # Sweeps still write while the daemon holds its instance lock.
        append_record(ledger_path, make_record())
    finally:
        lock.release()

    accepted = run_python(INSTANCE_PROBE, str(ledger_path))
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr


def test_instance_lock_refuses_a_second_holder_in_the_same_process(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    with (
        acquire_instance_lock(ledger_path),
        pytest.raises(AlreadyRunning, match=r"ledger\.jsonl\.pid"),
    ):
        acquire_instance_lock(ledger_path)
    acquire_instance_lock(ledger_path).release()


# --- totals -------------------------------------------------------------------------------------


def summary_records() -> list[LedgerRecord]:
    day1 = datetime(2024, 5, 1, 23, 30, tzinfo=timezone.utc)
    day2 = datetime(2024, 5, 2, 0, 30, tzinfo=timezone.utc)
    intent = {"action": Action.DELETE_INTENT, "reclaimed_bytes": None}
    return [
        make_record(now=day1, root="/data", owner="alice", bytes_deleted=100, bytes_written=0,
                    reclaimed_bytes=100),
        make_record(now=day1, root="/data", owner="alice", bytes_deleted=999, **intent),
        make_record(now=day1, root="/scratch", owner="bob", action=Action.EXTRACT,
                    bytes_deleted=0, bytes_written=30, reclaimed_bytes=-30),
        make_record(now=day2, root="/scratch", owner="alice", bytes_deleted=500,
                    bytes_written=50, reclaimed_bytes=450),
        make_record(now=day2, root="/data", owner="bob", bytes_deleted=7, **intent),
        make_record(now=day2, root="/data", owner="carol", action=Action.FAIL, bytes_deleted=0,
                    bytes_written=0, reclaimed_bytes=None),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        (None, [SummaryRow("total", 3, 520, 600, 80)]),
        (
            "root",
            [SummaryRow("/data", 1, 100, 100, 0), SummaryRow("/scratch", 2, 420, 500, 80)],
        ),
        (
            "owner",
            [SummaryRow("alice", 2, 550, 600, 50), SummaryRow("bob", 1, -30, 0, 30)],
        ),
        (
            "day",
            [SummaryRow("2024-05-01", 2, 70, 100, 30), SummaryRow("2024-05-02", 1, 450, 500, 50)],
        ),
    ],
)
def test_summarise_groups_outcome_records_only(by: Any, expected: list[SummaryRow]) -> None:
    assert summarise(summary_records(), since=None, by=by) == tuple(expected)


def test_summarise_since_filters_by_record_time() -> None:
    since = datetime(2024, 5, 2, 0, 0, tzinfo=timezone.utc)
    assert summarise(summary_records(), since=since, by="root") == (
        SummaryRow("/scratch", 1, 450, 500, 50),
    )
    # An offset-carrying `since` means the same instant.
    since_local = datetime(2024, 5, 2, 2, 30, tzinfo=timezone(timedelta(hours=2)))
    assert summarise(summary_records(), since=since_local, by=None) == (
        SummaryRow("total", 1, 450, 500, 50),
    )


def test_summarise_of_nothing() -> None:
    assert summarise([], since=None, by=None) == (SummaryRow("total", 0, 0, 0, 0),)
    assert summarise([], since=None, by="owner") == ()


def test_summarise_rejects_naive_since_and_unknown_grouping() -> None:
    with pytest.raises(ValueError, match="since"):
        summarise(summary_records(), since=datetime(2024, 5, 2), by=None)
    with pytest.raises(ValueError, match="group"):
        summarise(summary_records(), since=None, by="host")  # type: ignore[arg-type]


def test_summarise_reads_back_what_was_written(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    with Ledger.open(ledger_path) as ledger:
        for record in summary_records():
            ledger.append(record)
    records = read_ledger(ledger_path).records
    assert summarise(records, since=None, by="owner") == summarise(
        summary_records(), since=None, by="owner"
    )


def test_directory_in_place_of_ledger_is_refused(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    ledger_path.mkdir()
    with pytest.raises(FileRefused, match="not a regular file"):
        append_record(ledger_path, make_record())
    with pytest.raises(FileRefused, match="not a regular file"):
        read_ledger(ledger_path)


def test_reading_while_this_process_holds_the_ledger_open_does_not_wait(tmp_path: Path) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    with Ledger.open(ledger_path) as ledger:
        ledger.append(make_record(epoch=1))
        result = read_ledger(ledger_path)
    assert [record.epoch for record in result.records] == [1]
    assert result.warnings == ()


def test_a_short_write_does_not_fuse_the_next_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger_path = tmp_path / "ledger.jsonl"
    real_write = os.write

    def disk_full_once(fd: int, data: Any) -> int:
        monkeypatch.setattr(os, "write", real_write)
        return real_write(fd, bytes(data)[:25])

    with Ledger.open(ledger_path) as ledger:
        ledger.append(make_record(epoch=1))
        monkeypatch.setattr(os, "write", disk_full_once)
        with pytest.raises(OSError, match="short write"):
            ledger.append(make_record(epoch=2))
        ledger.append(make_record(epoch=3))

    result = read_ledger(ledger_path)
    assert [record.epoch for record in result.records] == [1, 3]
    assert len(result.warnings) == 1
    assert "line 2" in result.warnings[0]
