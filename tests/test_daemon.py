"""``sweeper watch`` end to end: the real daemon as a subprocess on a tree in tmp_path, with a
real AF_UNIX datagram socket standing in for systemd's ``NOTIFY_SOCKET``.

Every daemon runs with ``settle_seconds=0.5 min_age_seconds=0 rescan_seconds=2`` unless a test
says otherwise, and its ledger in tmp_path.  Negative claims ("never extracted") are checked
only after the daemon has demonstrably looked again: inotify in the test process sees it open
and examine the file twice more, and a settle plus a rescan period have passed.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import (
    TEMP_MARK,
    assert_same_tensors,
    batched_list,
    full_checkpoint,
    full_looking_pickle,
    load_without_allowlist,
    save_full_checkpoint,
    save_pickle_as_checkpoint,
    tiny_model,
)
from daemon_harness import (
    REPO_ROOT,
    RESCAN_SECONDS,
    SETTLE_SECONDS,
    TIMEOUT,
    ChunkedWriter,
    Daemon,
    DirectoryOpens,
    NotifySocket,
    Reads,
    Status,
    daemon_status,
    user_namespaces_work,
    wait_until,
)
from trees import apparent_size, ledger_lines, names, outcome_total, save_full

from sweeper.daemon import filesystem_type, wants_polling
from sweeper.journal import markers_of
from sweeper.report import human_size
from sweeper.torchzip import MEMORY_REFUSAL

QUIET_WAIT = SETTLE_SECONDS + RESCAN_SECONDS  # long enough for an event and a rescan to act


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The watched root, with one (empty) run folder."""
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    return root


@pytest.fixture
def reads(tree: Path) -> Iterator[Reads]:
    """How often each file below the tree has been opened and examined (by the daemon)."""
    counter = Reads(tree)
    yield counter
    counter.stop()


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger.jsonl"


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start_daemon(tmp_path: Path, notify: NotifySocket, ledger: Path) -> Iterator[StartDaemon]:
    """``start_daemon(*items, config=None, **Daemon_kwargs)``: ``sweeper watch [-c CONFIG]
    ITEMS`` (roots and KEY=VALUE, which win over the test settings); every daemon started is
    stopped at teardown."""
    daemons: list[Daemon] = []

    def start(*items: str, config: Path | None = None, **kwargs: Any) -> Daemon:
        kwargs.setdefault("notify", notify)
        kwargs.setdefault("ledger", ledger)
        kwargs.setdefault("name", f"daemon{len(daemons)}")
        options = ["-c", str(config)] if config is not None else []
        test_settings = [
            f"settle_seconds={SETTLE_SECONDS}",
            "min_age_seconds=0",
            f"rescan_seconds={RESCAN_SECONDS}",
        ]
        daemon = Daemon(tmp_path, [*options, *test_settings, *items], **kwargs)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()


def inference(path: Path) -> Path:
    return path.with_name(f"{path.stem}_inference{path.suffix}")


def records(ledger: Path) -> list[dict[str, Any]]:
    """The ledger's records; none before the daemon's first append has landed."""
    if not ledger.exists() or ledger.stat().st_size == 0:
        return []
    return ledger_lines(ledger)


def records_for(ledger: Path, path: Path) -> list[dict[str, Any]]:
    return [r for r in records(ledger) if r["path"] == str(path)]


def actions_for(ledger: Path, path: Path) -> list[str]:
    """What the ledger says was done to ``path``; delete intents left out."""
    return [r["action"] for r in records_for(ledger, path) if not r["action"].endswith("-intent")]


def assert_copy_matches(copy: Path, saved: dict[str, Any]) -> None:
    """The inference copy loads with the safe loader, holds the model's tensors and no
    training state."""
    loaded = load_without_allowlist(copy)
    assert not any(k.startswith(("optimizer", "scheduler", "scaler", "rng")) for k in loaded)
    assert_same_tensors(saved["model_state_dict"], loaded["model_state_dict"])
    assert loaded["epoch"] == saved["epoch"]


def temp_files_below(top: Path) -> list[str]:
    return [
        os.path.join(folder, name)
        for folder, _, files in os.walk(top)
        for name in files
        if TEMP_MARK in name
    ]


# ---------------------------------------------------------------------------------------------
# The systemd protocol and logs.


def test_ready_after_the_catch_up_sweep_then_status_and_stopping(
    tree: Path, start_daemon: StartDaemon, notify: NotifySocket, ledger: Path, reads: Reads
) -> None:
    """READY=1 only once the catch-up sweep has extracted what was already there; STATUS=
    reports the counts; SIGTERM sends STOPPING=1 and exits 0.  WATCHDOG_PID names another
    process here, so the daemon must not ping on its behalf."""
    saved = {}
    for index in range(3):
        folder = tree / f"run{index}"
        folder.mkdir()
        saved[folder / "epoch1.pt"] = save_full(folder / "epoch1.pt", epoch=1, seed=index)
    daemon = start_daemon(
        str(tree), env={"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    )

    ready = daemon.wait_ready()

    for path, checkpoint in saved.items():
        assert inference(path).exists(), daemon.details()
        assert [r["action"] for r in records_for(ledger, path)] == ["extract-intent", "extract"]
        assert_copy_matches(inference(path), checkpoint)
    # The daemon's own account right after READY: all done, nothing queued behind it.
    first = daemon.wait_for(lambda m: Status.parse(m) is not None, since=ready)
    status = Status.parse(notify.messages[first])
    assert status is not None
    assert (status.queued, status.working, status.actions, status.failed) == (0, 0, 3, 0)
    assert status.phase == "watching"
    assert daemon_status(ledger)["total_bytes"] == outcome_total(records(ledger))

    # Pings would be due every 0.5 s: give them time to show up, if they were going to.
    first_path = next(iter(saved))
    daemon.wait_for_reads(reads, first_path, reads.count(first_path), count=1, min_seconds=1.5)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    notify.mark()  # take what the kernel still holds
    assert notify.messages[-1] == "STOPPING=1"
    assert notify.count("WATCHDOG=1") == 0
    assert notify.count("READY=1") == 1
    log = daemon.log()
    assert "INFO sweeper.daemon: catch-up sweep of" in log
    assert "stopping (SIGTERM)" in log
    assert not re.search(r"^<\d>", log, re.MULTILINE)  # not the journal: no priority prefixes


def test_watchdog_pings_when_watchdog_pid_is_the_daemon(
    tree: Path, start_daemon: StartDaemon, notify: NotifySocket
) -> None:
    daemon = start_daemon(str(tree), env={"WATCHDOG_USEC": "1000000"}, as_watchdog_pid=True)

    ready = daemon.wait_ready()
    daemon.wait_until(
        lambda: notify.count("WATCHDOG=1", since=ready) >= 3, "three WATCHDOG=1 pings"
    )


def test_watchdog_keeps_pinging_while_a_worker_waits_for_another_sweep(
    tree: Path, start_daemon: StartDaemon, notify: NotifySocket, ledger: Path
) -> None:
    """A one-shot ``sweeper sweep`` holds the action lock for as long as its sweep takes; the
    daemon's worker waiting for it is healthy and must not be restarted by systemd's watchdog
    (WatchdogSec=1 s here, so the worker waits five times longer than that)."""
    daemon = start_daemon(str(tree), env={"WATCHDOG_USEC": "1000000"}, as_watchdog_pid=True)
    daemon.wait_ready()
    checkpoint = tree / "run" / "epoch1.pt"
    lock_fd = os.open(f"{ledger}.actions.lock", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # as `sweeper sweep` does for its whole run
        save_full(checkpoint, epoch=1)
        waiting = daemon.wait_for(lambda m: (s := Status.parse(m)) is not None and s.working > 0)
        # Ten pings, at least 0.5 s apart, span 4.5 s: over four times WatchdogSec.
        daemon.wait_until(
            lambda: notify.count("WATCHDOG=1", since=waiting) >= 10,
            "WATCHDOG=1 pings while the worker waits for the lock",
        )
        assert not inference(checkpoint).exists()  # the worker really was waiting
    finally:
        os.close(lock_fd)
    daemon.wait_until(inference(checkpoint).exists, "the extraction once the lock is free")


def test_log_lines_carry_priorities_when_stderr_is_the_journal(
    tree: Path, start_daemon: StartDaemon
) -> None:
    save_full(tree / "run" / "epoch1.pt", epoch=1)
    daemon = start_daemon(str(tree), journal=True)
    daemon.wait_ready()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0

    lines = daemon.log().splitlines()
    assert lines, "the daemon logged nothing"
    assert all(re.match(r"<[0-7]>", line) for line in lines), lines
    assert any(line.startswith("<6>sweeper.daemon: catch-up sweep of ") for line in lines)
    assert any(line.startswith("<6>sweeper.execute: ") and "wrote" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# Writers: only complete, closed, quiet files are touched.


def test_slow_writer_is_extracted_only_once_complete_and_closed(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon, reads: Reads, ledger: Path
) -> None:
    """Six chunks 0.7 s apart (longer than settle_seconds, so the daemon looks mid-write), then
    the complete file held open past a settle and a rescan: nothing happens until close."""
    source = tmp_path / "source.pt"
    saved = save_full(source, epoch=1)
    target = tree / "run" / "epoch1.pt"
    daemon = start_daemon(str(tree))
    daemon.wait_ready()

    writer = ChunkedWriter(target, source, chunks=6, pause=0.7)
    try:
        for index in range(6):
            assert writer.read_line() == f"chunk {index}"
            assert not inference(target).exists()
        assert writer.read_line() == "written"
        daemon.wait_for_reads(reads, target, reads.count(target), min_seconds=QUIET_WAIT)
        assert target.read_bytes() == source.read_bytes()  # complete, but still open
        assert not inference(target).exists()
        assert records_for(ledger, target) == []
        writer.close()
    finally:
        writer.cleanup()

    daemon.wait_until(lambda: actions_for(ledger, target), "the extraction once the writer closed")
    assert actions_for(ledger, target) == ["extract"]
    assert_copy_matches(inference(target), saved)


def test_writer_killed_half_way_leaves_its_file_untouched(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon, reads: Reads, ledger: Path
) -> None:
    """A killed writer's file is closed by the kernel like any other: the close proves nothing
    and the truncated file is neither extracted nor deleted."""
    source = tmp_path / "source.pt"
    save_full(source, epoch=1)
    target = tree / "run" / "epoch1.pt"
    daemon = start_daemon(str(tree))
    daemon.wait_ready()

    writer = ChunkedWriter(target, source, chunks=6, pause=0.1, stop_after=3)
    try:
        lines = [writer.read_line() for _ in range(4)]
        assert lines == ["chunk 0", "chunk 1", "chunk 2", "stopped"]
        writer.kill()
    finally:
        writer.cleanup()
    before = target.stat()  # stat, not read: reads are the daemon's to count

    daemon.wait_for_reads(reads, target, reads.count(target), min_seconds=QUIET_WAIT)
    after = target.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    size = source.stat().st_size
    assert after.st_size == 3 * -(-size // 6)  # three of six chunks
    assert target.read_bytes() == source.read_bytes()[: after.st_size]
    assert names(tree / "run") == {"epoch1.pt"}
    assert records_for(ledger, target) == []
    assert daemon.alive()


@pytest.mark.parametrize("observer", ["inotify", "polling"])
def test_temporary_name_renamed_into_place_is_extracted(
    tree: Path, start_daemon: StartDaemon, ledger: Path, observer: str
) -> None:
    """Trainers often save to a temporary name and rename; the renamed file is what counts.
    The rescan is an hour away: the rename's event alone must bring the daemon."""
    run = tree / "run"
    daemon = start_daemon(str(tree), f"observer={observer}", "rescan_seconds=3600")
    daemon.wait_ready()

    saved = {}
    for epoch, temporary in ((1, "epoch1.pt.tmp"), (2, ".tmp_epoch2")):
        saved[epoch] = full_checkpoint(epoch=epoch, model=tiny_model(epoch))
        # Through a file object, as trainers saving to a temporary name do (torch.save given
        # the path ".tmp_epoch2" refuses it: it derives the archive's name from the file's).
        with open(run / temporary, "wb") as file:
            torch.save(saved[epoch], file)
        os.rename(run / temporary, run / f"epoch{epoch}.pt")

    for epoch in saved:
        path = run / f"epoch{epoch}.pt"
        daemon.wait_until(functools.partial(actions_for, ledger, path), f"{path.name} extracted")
    assert names(run) == {"epoch1.pt", "epoch2.pt", "epoch1_inference.pt", "epoch2_inference.pt"}
    for epoch, checkpoint in saved.items():
        assert actions_for(ledger, run / f"epoch{epoch}.pt") == ["extract"]
        assert_copy_matches(run / f"epoch{epoch}_inference.pt", checkpoint)


def test_n_plus_two_epochs_leave_n_full_checkpoints_and_the_ledger_adds_up(
    tree: Path, start_daemon: StartDaemon, notify: NotifySocket, ledger: Path, reads: Reads
) -> None:
    run = tree / "run"
    daemon = start_daemon(str(tree), "keep_full=2")
    daemon.wait_ready()
    before = apparent_size(tree)

    saved, written = {}, 0
    for epoch in range(1, 5):
        saved[epoch] = save_full(run / f"epoch{epoch}.pt", epoch=epoch, seed=epoch)
        written += (run / f"epoch{epoch}.pt").stat().st_size

    expected = {"epoch3.pt", "epoch4.pt", *(f"epoch{e}_inference.pt" for e in range(1, 5))}
    expected_actions = {
        1: ["extract", "delete"],
        2: ["extract", "delete"],
        3: ["extract"],
        4: ["extract"],
    }

    def done() -> bool:
        ledgered = {e: actions_for(ledger, run / f"epoch{e}.pt") for e in range(1, 5)}
        return names(run) == expected and ledgered == expected_actions

    daemon.wait_until(done, f"exactly {sorted(expected)} and their ledger records")
    newest = run / "epoch4.pt"
    daemon.wait_for_reads(reads, newest, reads.count(newest))  # and it stays that way
    assert done()
    for epoch, checkpoint in saved.items():
        assert_copy_matches(run / f"epoch{epoch}_inference.pt", checkpoint)
    recorded = records(ledger)
    assert outcome_total(recorded) == before + written - apparent_size(tree)
    daemon.wait_until(
        lambda: daemon_status(ledger)["total_bytes"] == outcome_total(recorded),
        "`sweeper status` to report the ledger's total",
    )
    assert notify.statuses()[-1].total == human_size(outcome_total(recorded))


# ---------------------------------------------------------------------------------------------
# What events miss, the rescan finds.


def test_rescan_finds_a_run_folder_no_watch_covers(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon
) -> None:
    """With a glob root only the folders matching at start are watched, and nothing watches the
    folder above them: a run folder moved in later raises no event the daemon can see.  Only
    the periodic rescan can find it."""
    outside = tmp_path / "outside" / "run2"
    outside.mkdir(parents=True)
    saved = save_full(outside / "epoch1.pt", epoch=1)
    daemon = start_daemon(str(tree / "run*"))
    daemon.wait_ready()
    daemon.wait_log("watching 1 folder")

    os.rename(outside, tree / "run2")

    copy = tree / "run2" / "epoch1_inference.pt"
    daemon.wait_until(copy.exists, "the rescan to extract the hidden checkpoint")
    assert_copy_matches(copy, saved)
    # The rescan also starts watching the new folder: a later checkpoint there is processed.
    later = save_full(tree / "run2" / "epoch2.pt", epoch=2)
    daemon.wait_until((tree / "run2" / "epoch2_inference.pt").exists, "the later checkpoint")
    assert_copy_matches(tree / "run2" / "epoch2_inference.pt", later)


def test_run_folder_moved_into_a_watched_root_is_seen_without_a_rescan(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon
) -> None:
    """inotify reports only the folder's move, not the files inside it; watchdog adds events
    for its contents, and the daemon must act on them (the rescan is an hour away here)."""
    outside = tmp_path / "outside" / "run2"
    (outside / "nested").mkdir(parents=True)
    saved = save_full(outside / "nested" / "epoch1.pt", epoch=1)
    daemon = start_daemon(str(tree), "rescan_seconds=3600")
    daemon.wait_ready()

    os.rename(outside, tree / "run2")

    copy = tree / "run2" / "nested" / "epoch1_inference.pt"
    daemon.wait_until(copy.exists, "the moved-in checkpoint's extraction")
    assert_copy_matches(copy, saved)


def test_a_watched_folder_deleted_and_made_again_is_watched_again(
    tree: Path, start_daemon: StartDaemon, notify: NotifySocket
) -> None:
    """``rm -rf run; mkdir run`` under a glob root: the watch died with the old folder.  The
    next rescan must watch the new one, or its checkpoints wait for a rescan for the rest of
    the daemon's life.  A path "settling" in STATUS= proves an event arrived: the rescan never
    puts one there."""
    daemon = start_daemon(str(tree / "run*"), "settle_seconds=2", "rescan_seconds=1")
    daemon.wait_ready()
    shutil.rmtree(tree / "run")
    (tree / "run").mkdir()
    daemon.wait_log(f"{tree / 'run'}: its watch ended")  # a rescan has watched it again

    since = notify.mark()
    saved = save_full(tree / "run" / "epoch1.pt", epoch=1)

    daemon.wait_for(lambda m: (s := Status.parse(m)) is not None and s.settling > 0, since=since)
    daemon.wait_until(inference(tree / "run" / "epoch1.pt").exists, "the extraction")
    assert_copy_matches(inference(tree / "run" / "epoch1.pt"), saved)


# ---------------------------------------------------------------------------------------------
# Files sweeper must leave alone.


def test_files_that_are_not_checkpoints_are_left_alone(
    tree: Path, start_daemon: StartDaemon, reads: Reads, ledger: Path
) -> None:
    run = tree / "run"
    daemon = start_daemon(str(tree))
    daemon.wait_ready()
    garbage = {
        run / "x.pt": b"not a checkpoint\n" * 1000,
        run / "empty.pt": b"",
        run / "fake.pth": b"PK\x05\x06" + bytes(18),  # an empty zip: no pickle at all
    }
    for path, data in garbage.items():
        path.write_bytes(data)
    saved = save_full(run / "epoch1.pt", epoch=1)

    daemon.wait_until(inference(run / "epoch1.pt").exists, "the real checkpoint's extraction")
    seen = {path: reads.count(path) for path in garbage}
    for path in garbage:
        daemon.wait_for_reads(reads, path, seen[path], min_seconds=QUIET_WAIT)
    assert_copy_matches(inference(run / "epoch1.pt"), saved)
    for path, data in garbage.items():
        assert path.read_bytes() == data
        assert records_for(ledger, path) == []
    assert names(run) == {*(p.name for p in garbage), "epoch1.pt", "epoch1_inference.pt"}
    assert daemon.alive()


# ---------------------------------------------------------------------------------------------
# Signals and instances.


def test_sigterm_during_an_extraction_exits_0_and_leaves_no_temporary_file(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon, notify: NotifySocket, ledger: Path
) -> None:
    """A 300 MB checkpoint takes long enough to extract that the test sees the temporary output
    and sends SIGTERM while it exists.  The daemon finishes or aborts that file, never leaves
    half of it, and a restart completes the job."""
    run = tree / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    weight = torch.ones(75_000_000)  # 300 MB of float32
    torch.save(full_checkpoint(model_state={"weight": weight}), outside / "big.pt")
    del weight
    big = run / "big.pt"
    copy = inference(big)
    try:
        daemon = start_daemon(str(tree))
        daemon.wait_ready()
        os.rename(outside / "big.pt", big)
        identity = big.stat()

        def extraction() -> str | None:
            if any(TEMP_MARK in name for name in os.listdir(run)):
                return "in progress"
            return "finished" if copy.exists() else None

        def recorded(count: int) -> bool:
            return len(actions_for(ledger, big)) == count

        missed = 0  # extractions that finished before the test could look
        while wait_until(extraction, "an extraction", interval=0.001) == "finished":
            missed += 1
            if missed == 3:  # a machine too busy to catch it once gets two more tries
                pytest.fail(f"never saw the extraction in progress\n{daemon.details()}")
            daemon.wait_until(functools.partial(recorded, missed), "its ledger record")
            copy.unlink()  # the next rescan extracts it again
        daemon.signal(signal.SIGTERM)

        assert daemon.wait_exit() == 0, daemon.details()
        notify.mark()  # take what the kernel still holds
        assert "STOPPING=1" in notify.messages
        assert temp_files_below(tree) == []
        after = big.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            identity.st_ino,
            identity.st_size,
            identity.st_mtime_ns,
        )
        assert [r for r in records_for(ledger, big) if r["action"] == "fail"] == []
        # Finished (copy and its ledger record) or aborted (neither): nothing in between.
        finished = copy.exists()
        done = actions_for(ledger, big)
        # An abort closes its intent itself (nothing was written): no marker is left behind.
        assert done == ["extract"] * (missed + finished) + ([] if finished else ["abandon"])
        assert markers_of(ledger) == []
        if finished:
            assert_big_copy(copy)

        # A new daemon (the lock was released) completes what was interrupted, before READY.
        again = start_daemon(str(tree), name="restarted")
        again.wait_ready()
        assert copy.exists(), again.details()
        assert_big_copy(copy)
        assert temp_files_below(tree) == []
    finally:
        for path in (outside / "big.pt", big, copy):
            path.unlink(missing_ok=True)


def assert_big_copy(copy: Path) -> None:
    loaded = torch.load(copy, weights_only=True, mmap=True)
    weight = loaded["model_state_dict"]["weight"]
    assert weight.shape == (75_000_000,)
    assert bool((weight == 1).all())
    assert "optimizer_state_dict" not in loaded


def test_sighup_reloads_the_config_between_reloading_and_ready(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon, notify: NotifySocket
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("keep_full: 2\n")
    daemon = start_daemon(str(tree), config=config)
    ready = daemon.wait_ready()

    config.write_text("keep_full: 1\n")
    sent_after = time.monotonic_ns() // 1000
    daemon.signal(signal.SIGHUP)

    reloading = daemon.wait_for(lambda m: m.startswith("RELOADING=1\n"), since=ready)
    received_before = time.monotonic_ns() // 1000
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", notify.messages[reloading])
    assert match is not None, notify.messages[reloading]
    assert sent_after <= int(match.group(1)) <= received_before
    daemon.wait_for("READY=1", since=reloading)
    daemon.wait_log("configuration reloaded")

    # keep_full=1 is in force: the older of two epochs goes.
    run = tree / "run"
    save_full(run / "epoch1.pt", epoch=1, seed=1)
    save_full(run / "epoch2.pt", epoch=2, seed=2)
    expected = {"epoch2.pt", "epoch1_inference.pt", "epoch2_inference.pt"}
    daemon.wait_until(lambda: names(run) == expected, f"exactly {sorted(expected)}")


def test_sighup_with_a_broken_config_keeps_the_running_one(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon, notify: NotifySocket
) -> None:
    """keep_full: 1 is running (not the default 2); two broken reloads are refused, naming the
    key, and keep_full=1 still decides afterwards."""
    config = tmp_path / "config.yaml"
    config.write_text("keep_full: 1\n")
    daemon = start_daemon(str(tree), config=config)
    ready = daemon.wait_ready()

    config.write_text("keep_full: 0\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("reload refused")
    config.write_text("keep_full: [1\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_until(lambda: daemon.log().count("reload refused") == 2, "the second refusal")

    refusals = [line for line in daemon.log().splitlines() if "reload refused" in line]
    assert refusals[0].startswith("ERROR ")
    assert "'keep_full'" in refusals[0] and "below the minimum of 1" in refusals[0]
    assert "not valid YAML" in refusals[1] and str(config) in refusals[1]
    assert notify.find(lambda m: m.startswith("RELOADING=1"), since=ready) is None
    assert notify.count("READY=1") == 1

    run = tree / "run"
    save_full(run / "epoch1.pt", epoch=1, seed=1)
    save_full(run / "epoch2.pt", epoch=2, seed=2)
    expected = {"epoch2.pt", "epoch1_inference.pt", "epoch2_inference.pt"}
    daemon.wait_until(lambda: names(run) == expected, f"exactly {sorted(expected)}")


def test_second_instance_on_the_same_ledger_is_refused(
    tree: Path, start_daemon: StartDaemon, ledger: Path
) -> None:
    save_full(tree / "run" / "epoch1.pt", epoch=1)
    daemon = start_daemon(str(tree))
    daemon.wait_ready()

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for inherited in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        env.pop(inherited, None)
    second = subprocess.run(
        [sys.executable, "-m", "sweeper", "watch", str(tree), "--ledger", str(ledger)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )

    lock = Path(f"{ledger}.pid")
    assert second.returncode == 2, second.stderr
    assert f"{lock} is locked by pid {daemon.pid}" in second.stderr
    assert "already running" in second.stderr
    assert lock.read_text() == f"{daemon.pid}\n"
    for private in (lock, ledger):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert daemon.alive()
    # A one-shot sweep shares the ledger (and waits for the action lock) without being refused.
    sweep = subprocess.run(
        [sys.executable, "-m", "sweeper", "sweep", str(tree), "--ledger", str(ledger)],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert sweep.returncode == 0, sweep.stderr


# ---------------------------------------------------------------------------------------------
# Choosing the observer.


@pytest.mark.parametrize(
    ("fstype", "polling"),
    [
        ("ext4", False),
        ("xfs", False),
        ("tmpfs", False),
        ("nfs4", True),
        ("cifs", True),
        ("lustre", True),
        ("fuse.sshfs", True),
        ("fuseblk", True),
        (None, False),
    ],
)
def test_network_and_fuse_filesystems_are_polled(fstype: str | None, polling: bool) -> None:
    assert wants_polling(fstype) is polling


def test_filesystem_type_takes_the_longest_mount_point(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:40 / /data rw,relatime shared:2 - nfs4 server:/data rw\n"
        "41 40 0:41 / /data/fast rw,relatime shared:3 - xfs /dev/nvme0n1 rw\n"
        "42 22 0:42 / /mnt/with\\040space rw - fuse.sshfs host: rw\n"
    )

    def kind(path: str) -> str | None:
        return filesystem_type(path, str(mountinfo))

    assert kind("/data/alice/run") == "nfs4"
    assert kind("/data") == "nfs4"
    assert kind("/data/fast/run") == "xfs"
    assert kind("/datax") == "ext4"  # a prefix of the name is not a mount point above it
    assert kind("/mnt/with space/run") == "fuse.sshfs"
    assert filesystem_type("/", str(tmp_path / "missing")) is None


# ---------------------------------------------------------------------------------------------
# Rolling names and the copies that follow them.


def test_a_rolling_name_rewritten_in_place_gets_its_copy_refreshed(
    tree: Path, start_daemon: StartDaemon
) -> None:
    """The trainer overwrites best_model.pt with a better epoch: the daemon replaces the stale
    best_model_inference.pt with a copy of the new weights and records the refresh; best_model.pt
    itself is never deleted and never takes one of keep_full's slots."""
    run = tree / "run"
    run.mkdir(exist_ok=True)
    first = save_full(run / "best_model.pt", epoch=1, seed=1)
    daemon = start_daemon(str(tree), "keep_full=1", "rescan_seconds=3600")
    daemon.wait_ready()
    copy = run / "best_model_inference.pt"
    daemon.wait_until(copy.exists, "the first copy of best_model.pt")
    assert_copy_matches(copy, first)
    first_copy = copy.stat()

    better = save_full(run / "best_model.pt", epoch=5, seed=5)
    for epoch in (6, 7):
        save_full(run / f"epoch{epoch}.pt", epoch=epoch, seed=epoch)

    def refreshed() -> bool:
        now = copy.stat()
        return (now.st_ino, now.st_mtime_ns) != (first_copy.st_ino, first_copy.st_mtime_ns)

    daemon.wait_until(refreshed, "the stale copy to be refreshed")
    assert_copy_matches(copy, better)
    daemon.wait_until((run / "epoch7_inference.pt").exists, "epoch 7's copy")
    daemon.wait_until(lambda: not (run / "epoch6.pt").exists(), "epoch 6 to be demoted")
    assert (run / "best_model.pt").exists() and (run / "epoch7.pt").exists()
    records = ledger_lines(daemon.ledger)
    assert [r["action"] for r in records if r["path"].endswith("best_model.pt")] == [
        "extract-intent",
        "extract",
        "extract-intent",
        "refresh",
    ]


def test_an_event_storm_drops_per_file_state_and_rescans(
    tree: Path, start_daemon: StartDaemon
) -> None:
    """A user floods a watched folder with checkpoint-named files (a rename loop does the same):
    past ``queue_size`` changed paths the daemon forgets them all, says so, and rescans once —
    its memory does not grow with the storm, and a real checkpoint is still handled."""
    run = tree / "run"
    run.mkdir(exist_ok=True)
    daemon = start_daemon(str(tree), "queue_size=20", "rescan_seconds=3600")
    daemon.wait_ready()

    for number in range(200):
        (run / f"junk{number}.pt").write_bytes(b"not a checkpoint")
    daemon.wait_log("event storm: more than 20 changed files at once; rescanning every root")
    saved = save_full(run / "epoch1.pt", epoch=1)

    copy = run / "epoch1_inference.pt"
    daemon.wait_until(copy.exists, "the real checkpoint after the storm")
    assert_copy_matches(copy, saved)


# ---------------------------------------------------------------------------------------------
# A ledger that takes no records.


def test_a_ledger_that_takes_no_records_stops_actions_not_the_daemon(
    tree: Path, start_daemon: StartDaemon, ledger: Path
) -> None:
    """The ledger path is a FIFO (a user's doing, or a broken state directory): the daemon stays
    up, acts on nothing it could not record, and says why in its log and its STATUS=; once the
    ledger can take records again, it acts again."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(ledger)
    run = tree / "run"
    run.mkdir(exist_ok=True)
    save_full(run / "epoch1.pt", epoch=1)
    daemon = start_daemon(str(tree), "rescan_seconds=1")
    daemon.wait_ready()

    daemon.wait_log("is not a regular file; no action taken; retrying at every scan")
    daemon.wait_for(lambda message: message.startswith("STATUS=NOT ACTING: ledger"))
    assert daemon.alive()
    assert not (run / "epoch1_inference.pt").exists()

    ledger.unlink()
    daemon.wait_until((run / "epoch1_inference.pt").exists, "acting once the ledger is back")
    daemon.wait_log("the ledger takes records again; acting again")
    assert [r["action"] for r in records(ledger)] == ["extract-intent", "extract"]


def test_a_full_disk_under_the_state_directory_stops_actions_not_the_daemon(
    mount_tmpfs: Callable[..., Path], tree: Path, start_daemon: StartDaemon, ledger: Path
) -> None:
    """The state directory's filesystem is full before the daemon starts (no room for its
    instance lock's pid, its ledger, or a journal marker): the daemon starts, stays up, acts on
    nothing, and says why; once there is room it acts."""
    state = mount_tmpfs(2 * 2**20, at=ledger.parent)
    filler = state / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\1" * 4096):
            pass
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    run = tree / "run"
    run.mkdir(exist_ok=True)
    save_full(run / "epoch1.pt", epoch=1)
    daemon = start_daemon(str(tree), "rescan_seconds=1")
    daemon.wait_ready()

    daemon.wait_for(lambda message: message.startswith("STATUS=NOT ACTING: ledger"))
    assert daemon.alive()
    assert not (run / "epoch1_inference.pt").exists()

    filler.unlink()
    daemon.wait_until(
        lambda: [r["action"] for r in records(ledger)] == ["extract-intent", "extract"],
        "acting once there is room",
    )
    assert (run / "epoch1_inference.pt").exists()


# ---------------------------------------------------------------------------------------------
# Watching that fails says so and falls back; walks stay bounded; storms are rate-limited.

needs_user_namespaces = pytest.mark.skipif(
    not user_namespaces_work(), reason="no user namespaces: cannot set a private inotify limit"
)


@needs_user_namespaces
def test_an_exhausted_watch_limit_is_said_and_that_root_polled(
    tmp_path: Path, start_daemon: StartDaemon, ledger: Path
) -> None:
    """With 20 inotify watches allowed (a user namespace's own limit, the host's untouched),
    root a (5 folders) is watched and root b (30) cannot be: b is named in a warning, its
    watches are given back, and b is polled — a checkpoint in a folder past the limit is
    extracted although the rescan is an hour away.  Root a keeps its inotify watches."""
    roots = {}
    for name, count in (("a", 4), ("b", 29)):
        roots[name] = tmp_path / name
        for index in range(count):
            (roots[name] / f"run{index}").mkdir(parents=True)
    daemon = start_daemon(
        str(roots["a"]),
        str(roots["b"]),
        "rescan_seconds=3600",
        user_limits={"max_inotify_watches": 20},
    )
    daemon.wait_ready()
    daemon.wait_log(f"{roots['b']}: the inotify watch limit is reached")
    daemon.wait_log("watching 2 folders: 1 by inotify (5 watches), 1 by polling")

    saved = {name: save_full(root / "run3" / "epoch1.pt", epoch=1) for name, root in roots.items()}
    saved["b28"] = save_full(roots["b"] / "run28" / "epoch1.pt", epoch=1)
    for name, path in (
        ("a", roots["a"] / "run3"),
        ("b", roots["b"] / "run3"),
        ("b28", roots["b"] / "run28"),
    ):
        copy = path / "epoch1_inference.pt"
        daemon.wait_until(copy.exists, f"the extraction in {path}")
        assert_copy_matches(copy, saved[name])
    warning = next(line for line in daemon.log().splitlines() if "watch limit" in line)
    assert warning.startswith("WARNING ") and "polling it instead" in warning
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert "Traceback" not in daemon.log()


def make_chain(top: Path, depth: int) -> None:
    """``top/d/d/.../d``, ``depth`` folders deep: made one level at a time relative to the
    last, since the whole path is far longer than PATH_MAX."""
    top.mkdir(parents=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = below
    finally:
        os.close(fd)


@pytest.fixture
def chains() -> Iterator[list[Path]]:
    """Chains made by the test, removed with rm -r (shutil.rmtree recurses, and would fail)."""
    made: list[Path] = []
    yield made
    for top in made:
        subprocess.run(["rm", "-rf", str(top)], check=True, timeout=TIMEOUT)


def test_a_5000_deep_chain_is_cut_at_max_depth_and_the_root_stays_watched(
    tree: Path, start_daemon: StartDaemon, chains: list[Path]
) -> None:
    """A user's chain of 5,000 nested folders: the walks stop at max_depth (said once, naming
    the first folder left out), and the rest of the root is watched — a checkpoint written after
    start is extracted by its events alone, the rescan being an hour away."""
    deep = tree / "deep"
    chains.append(deep)
    make_chain(deep, 5000)
    shallow = deep / "/".join(["d"] * 10)
    saved_deep = save_full(shallow / "epoch1.pt", epoch=1)
    daemon = start_daemon(str(tree), "rescan_seconds=3600")  # max_depth: 64
    daemon.wait_ready()
    assert_copy_matches(shallow / "epoch1_inference.pt", saved_deep)

    saved = save_full(tree / "run" / "epoch1.pt", epoch=1)
    copy = tree / "run" / "epoch1_inference.pt"
    daemon.wait_until(copy.exists, "the extraction of a checkpoint written after start")
    assert_copy_matches(copy, saved)
    cut = [line for line in daemon.log().splitlines() if "(max_depth)" in line]
    assert len(cut) == 1, daemon.log()
    assert cut[0].startswith(f"WARNING sweeper.daemon: {tree}/deep/d/d/")
    assert cut[0].split(": ")[1] == f"{deep}{'/d' * 64}"  # 65 below the root
    assert f"more than 64 folders below {tree}" in cut[0]


def test_a_scan_opens_each_folder_once_however_deep(
    tree: Path, start_daemon: StartDaemon, chains: list[Path]
) -> None:
    """The walk opens each folder relative to its parent, so its cost is linear in the tree:
    the top of a 60-deep chain is opened once per scan (the catch-up sweep here), where
    reopening every folder from the root opened it 60 times (a 10,000-deep chain took 138 s
    per scan)."""
    chain = tree / "chain"
    chains.append(chain)
    make_chain(chain, 60)
    top, bottom = chain / "d", chain / "/".join(["d"] * 60)
    opens = DirectoryOpens([top, bottom])
    try:
        daemon = start_daemon(str(tree), "rescan_seconds=3600")
        daemon.wait_ready()
        assert opens.count(top) == 1, daemon.details()
        assert opens.count(bottom) == 1, daemon.details()
    finally:
        opens.close()


def test_watchdog_pings_go_on_through_long_rescans(
    tmp_path: Path, start_daemon: StartDaemon, notify: NotifySocket
) -> None:
    """WatchdogSec=0.1 s: pings are due every 50 ms, and each rescan of 20,000 folders lasts
    far longer.  The walk's progress is the heartbeat, so the pings go on while it runs (at
    least one per 0.2 s here); before, they stopped 0.1 s into a scan, and systemd would have
    killed a healthy daemon in the middle of every long rescan."""
    root = tmp_path / "big"
    for group in range(200):
        for index in range(100):
            (root / f"g{group}" / f"f{index}").mkdir(parents=True)
    daemon = start_daemon(
        str(root), "rescan_seconds=1", env={"WATCHDOG_USEC": "100000"}, as_watchdog_pid=True
    )
    since = daemon.wait_ready()

    def working(message: str) -> bool:
        status = Status.parse(message)
        return status is not None and status.working > 0

    def idle(message: str) -> bool:
        status = Status.parse(message)
        return status is not None and status.working == 0

    pings, seconds = 0, 0.0
    for _ in range(3):
        start = daemon.wait_for(working, since=since)
        began = time.monotonic()
        since = daemon.wait_for(idle, since=start)
        seconds += time.monotonic() - began
        pings += notify.count("WATCHDOG=1", since=start) - notify.count("WATCHDOG=1", since=since)
    assert seconds > 0.6, f"three rescans took only {seconds:.2f} s: make the tree bigger"
    assert pings >= seconds / 0.2, f"{pings} pings in {seconds:.2f} s\n{daemon.details()}"


def test_an_inotify_queue_overflow_rescans_at_once_and_events_keep_coming(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon, ledger: Path
) -> None:
    """A user's rename loop overflows the kernel's event queue (16,384 events; the daemon is
    stopped meanwhile, so the overflow is certain).  Bob's checkpoint, written after the
    overflow, raised no event the daemon will ever read: the daemon must say so and rescan at
    once (the periodic rescan is an hour away).  Events keep coming afterwards, and SIGTERM
    still exits 0 with no traceback."""
    alice, bob = tree / "alice", tree / "bob"
    alice.mkdir()
    bob.mkdir()
    (alice / "a.tmp").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    saved = save_full(outside / "epoch1.pt", epoch=1)
    daemon = start_daemon(str(tree), "rescan_seconds=3600", "storm_rescan_seconds=3600")
    daemon.wait_ready()

    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for _ in range(10_000):  # 20,000 renames: 40,000 events
            os.rename(alice / "a.tmp", alice / "b.tmp")
            os.rename(alice / "b.tmp", alice / "a.tmp")
        os.rename(outside / "epoch1.pt", bob / "epoch1.pt")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)

    daemon.wait_until((bob / "epoch1_inference.pt").exists, "bob's checkpoint, by the rescan")
    assert_copy_matches(bob / "epoch1_inference.pt", saved)
    assert "WARNING sweeper.daemon: event storm: the inotify queue overflowed" in daemon.log()
    later = save_full(bob / "epoch2.pt", epoch=2)
    daemon.wait_until((bob / "epoch2_inference.pt").exists, "bob's next checkpoint, by events")
    assert_copy_matches(bob / "epoch2_inference.pt", later)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    assert "Traceback" not in daemon.log()


_STORM = textwrap.dedent(
    """
    import os, sys
    folder = sys.argv[1]
    number = 0
    while not os.path.exists(os.path.join(folder, "stop")):
        with open(os.path.join(folder, f"junk{number % 200}.pt"), "wb") as junk:
            junk.write(b"not a checkpoint")
        number += 1
    """
)


def test_a_storm_without_end_rescans_at_most_once_per_storm_rescan_seconds(
    tree: Path, start_daemon: StartDaemon
) -> None:
    """A user rewrites 200 checkpoint-named files without end, far past queue_size=20.  The
    daemon rescans at once on the first storm, then at most once per storm_rescan_seconds=3
    (it says the next rescan is deferred), not back to back.  A real checkpoint written during
    the storm, whose event the storms drop, is still extracted: the deferred rescan is never
    lost."""
    junk, run = tree / "junk", tree / "run"
    junk.mkdir()
    daemon = start_daemon(
        str(tree), "queue_size=20", "rescan_seconds=3600", "storm_rescan_seconds=3"
    )
    daemon.wait_ready()

    began = time.monotonic()
    storm = subprocess.Popen([sys.executable, "-c", _STORM, str(junk)])
    try:
        daemon.wait_log("event storm: more than 20 changed files at once; rescanning every root")
        saved = save_full(run / "epoch1.pt", epoch=1)
        time.sleep(7)  # a storm lasting two intervals and more
    finally:
        (junk / "stop").touch()
        storm.wait(timeout=TIMEOUT)
    daemon.wait_until((run / "epoch1_inference.pt").exists, "the checkpoint from the storm")
    assert_copy_matches(run / "epoch1_inference.pt", saved)
    rescans = daemon.log().count("changed files at once; rescanning every root\n")
    allowed = int((time.monotonic() - began) / 3) + 1
    assert 2 <= rescans <= allowed, daemon.log()
    assert "changed files at once; rescanning every root in " in daemon.log()  # deferred


def test_while_a_rescan_for_new_symlinks_waits_so_do_the_settled_folders(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon, notify: NotifySocket
) -> None:
    """A symlink pins its target wherever it is, and only a full rescan learns of it.  A second
    new symlink within storm_rescan_seconds defers that rescan; a folder settling meanwhile must
    wait for it, or the planner would demote a checkpoint the new symlink pins (keep_full=1)."""
    run, links = tree / "run", tmp_path / "links"
    links.mkdir()
    save_full(run / "epoch1.pt", epoch=1, seed=1)
    daemon = start_daemon(str(tree), "keep_full=1", "rescan_seconds=3600", "storm_rescan_seconds=4")
    daemon.wait_ready()
    assert (run / "epoch1_inference.pt").exists()

    since = notify.mark()
    os.symlink(links, tree / "first-link")
    daemon.wait_log("new symlinks, which may pin files in any folder; rescanning every root")
    busy = daemon.wait_for(
        lambda m: (s := Status.parse(m)) is not None and s.queued + s.working > 0, since=since
    )
    daemon.wait_for(
        lambda m: (s := Status.parse(m)) is not None and s.queued + s.working == 0, since=busy
    )
    os.symlink(run / "epoch1.pt", tree / "pin")  # the user pins epoch 1
    daemon.wait_log("new symlinks, which may pin files in any folder; rescanning every root in ")
    save_full(run / "epoch2.pt", epoch=2, seed=2)

    daemon.wait_until((run / "epoch2_inference.pt").exists, "epoch 2's copy")
    assert (run / "epoch1.pt").exists(), daemon.log()  # pinned: never demoted


# ---------------------------------------------------------------------------------------------
# Hostile files: read in the daemon's reader process, never in the daemon.


def _vm_hwm_kib(pid: int) -> int:
    """The process's own peak resident memory (its mm's high-water mark, not carried over from
    the process that started it)."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1])


def test_memory_bombs_are_refused_while_the_daemon_stays_small(
    tree: Path, start_daemon: StartDaemon, ledger: Path
) -> None:
    """Already there at start, each in a run folder of its own beside an ordinary one: the
    issue's bomb (a data.pkl that is a list of 40M small ints, 80 MB), one the opcode count let
    through before (12M ints: gigabytes once unpickled, copied and compared), and one inside
    every pickle bound that needs more than the readers' default 512 MiB to read (3M empty
    dicts).  The ordinary folder gets its copy; each bomb is named in the log as refused, for
    its reason, and left alone; the daemon's own peak RSS stays at most 128 MiB: their contents
    were read in its reader process."""
    past_a_bound = "data.pkl has more than 8,000,000 objects"
    past_the_limit = "reading it needs more memory than sweeper allows"
    bombs = {
        tree / "bomb40" / "e1.pt": (b"K\x00", 40_000_000, past_a_bound),
        tree / "bomb12" / "e1.pt": (b"K\x00", 12_000_000, past_a_bound),
        tree / "dicts" / "e1.pt": (b"}", 3_000_000, past_the_limit),
    }
    for bomb, (item, count, _) in bombs.items():
        bomb.parent.mkdir()
        save_pickle_as_checkpoint(bomb, full_looking_pickle(batched_list(item, count)))
    saved = save_full(tree / "run" / "e1.pt", epoch=1)

    daemon = start_daemon(str(tree))
    daemon.wait_ready()
    daemon.wait_until(inference(tree / "run" / "e1.pt").exists, "the ordinary folder's copy")
    for bomb, (_, _, reason) in bombs.items():
        daemon.wait_log(f"{bomb}: skipped: refused: {reason}")
    peak_kib = _vm_hwm_kib(daemon.pid)

    assert_copy_matches(inference(tree / "run" / "e1.pt"), saved)
    for bomb in bombs:
        assert names(bomb.parent) == {"e1.pt"}
        assert records_for(ledger, bomb) == []
    assert peak_kib <= 128 * 1024, f"the daemon's peak RSS: {peak_kib // 1024} MiB"
    assert len(_children(daemon.pid)) == 1  # its one reader, alive for the next files
    assert daemon.alive()


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            found += [int(child) for child in children.read().split()]
    return found


def test_a_reload_that_raises_the_memory_limit_reads_a_refused_file_again(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon
) -> None:
    """A checkpoint whose notes are one 48 MB string needs more than 32 MiB to read: under
    ``classify_memory_limit: 33554432`` it is refused and named in the log.  A reload (SIGHUP)
    that raises the limit applies from the next read on, and forgets what the old limit
    refused: the next scan reads the file and writes its copy."""
    config = tmp_path / "config.yaml"
    config.write_text(f"classify_memory_limit: {32 * 1024 * 1024}\n")
    big = tree / "run" / "e1.pt"
    saved = save_full_checkpoint(big, extra={"notes": "x" * 48_000_000})
    daemon = start_daemon(str(tree), config=config)
    daemon.wait_ready()
    daemon.wait_log(f"{big}: {MEMORY_REFUSAL}")
    assert not inference(big).exists()

    config.write_text("classify_memory_limit: 536870912\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("configuration reloaded")

    daemon.wait_until(inference(big).exists, "the copy, once the limit allows reading it")
    assert_copy_matches(inference(big), saved)


def test_the_daemon_reconciles_what_a_killed_sweep_left_open(
    tmp_path: Path, start_daemon: StartDaemon, ledger: Path
) -> None:
    """A one-shot sweep killed right after it put a copy in place, before the copy's record: the
    daemon's first run closes the intent from the tree (the copy is there: counted as written),
    removes the marker, and the ledger's totals equal what the tree shows."""
    template = tmp_path / "template"
    run = template / "root" / "run"
    run.mkdir(parents=True)
    (template / "state").mkdir()
    save_full(run / "epoch1.pt", epoch=1)
    os.utime(run / "epoch1.pt", (1_700_000_000, 1_700_000_000))
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "template": str(template),
                "work": str(tmp_path / "work"),
                "modes": ["kill-after:renameat2"],
                "args": ["sweep", "{root}", "--ledger", "{ledger}", "min_age_seconds=0"],
            }
        )
    )
    (tmp_path / "work").mkdir()
    driver = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("fault_driver.py")), str(spec)],
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{Path(__file__).parent}"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert driver.returncode == 0, driver.stderr
    (point,) = [json.loads(line) for line in driver.stdout.splitlines()]
    assert point["faulted"] == 137
    crashed = Path(point["tree"])
    copy = crashed / "root" / "run" / "epoch1_inference.pt"
    assert copy.exists()
    assert [r["action"] for r in records(crashed / "state" / "ledger.jsonl")] == ["extract-intent"]
    ledger.parent.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(crashed / "state"):  # the ledger and the dead run's marker
        suffix = name[len("ledger.jsonl") :]
        shutil.copy2(crashed / "state" / name, f"{ledger}{suffix}")
    assert len(markers_of(ledger)) == 1

    daemon = start_daemon(str(crashed / "root"))
    daemon.wait_ready()

    actions = [r["action"] for r in records(ledger)]
    assert actions == ["extract-intent", "extract"], daemon.details()
    closing = records(ledger)[-1]
    assert (
        closing["reason"].startswith("reconciled by run ")
        and "its copy is in place" in closing["reason"]
    )
    assert closing["bytes_written"] == copy.stat().st_size == -outcome_total(records(ledger))
    assert markers_of(ledger) == []


# ---------------------------------------------------------------------------------------------
# Checkpoint folders


def test_a_trainer_saving_checkpoint_folders_gets_the_older_ones_demoted_on_events(
    tmp_path: Path, tree: Path, start_daemon: StartDaemon, ledger: Path
) -> None:
    """A Hugging Face Trainer's checkpoint-N/ folders appearing one by one, each written in the
    Trainer's order (weights, optimizer, RNG state, trainer_state.json last), with no periodic
    rescan: the events inside the folders bring the daemon to their run folder, and once
    checkpoint-8 has settled checkpoint-4 loses its training state; checkpoint-2 (the best)
    and the newest two stay complete."""
    from folder_layouts import write

    trained = tmp_path / "trained"
    write("hf", trained)
    run = tree / "run"
    daemon = start_daemon(str(tree), "keep_full=2", "rescan_seconds=3600")
    daemon.wait_ready()
    order = [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "training_args.bin",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    ]
    for step in (2, 4, 6, 8):
        checkpoint = run / f"checkpoint-{step}"
        checkpoint.mkdir()
        for name in order:
            shutil.copyfile(trained / checkpoint.name / name, checkpoint / name)

    def demoted() -> bool:
        return not (run / "checkpoint-4" / "optimizer.pt").exists()

    daemon.wait_until(demoted, "checkpoint-4's training state to be deleted")
    time.sleep(QUIET_WAIT)
    for step in (2, 6, 8):
        assert names(run / f"checkpoint-{step}") == set(order), step
    assert names(run / "checkpoint-4") == set(order) - {
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
    }
    deleted = [r for r in records(ledger) if r["action"] == "delete"]
    assert sorted(Path(r["path"]).name for r in deleted) == [
        "optimizer.pt",
        "rng_state.pth",
        "scheduler.pt",
    ]
