"""The observers, in process, on real folders with real inotify.

What the daemon makes of them end to end is in test_daemon.py; here are the parts no outside
process can reach: an observer whose thread dies, and the bookkeeping of watches as folders move.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import TIMEOUT, wait_until
from trees import save_full

from sweeper.daemon import Watcher
from sweeper.inventory import FolderRef, WalkLimits, expand_root, walk_folders
from sweeper.notify import Notifier
from sweeper.observers import InotifyObserver, PollingObserver


class Recorder:
    """A sink that remembers what it was told; ``explode`` makes ``changed`` raise."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes: list[tuple[str, bool]] = []
        self.lost_reasons: list[str] = []
        self.failures: list[tuple[str, str]] = []
        self.explode = False

    def interesting(self, name: str) -> bool:
        return name.endswith(".pt")

    def changed(self, path: str, *, appeared: bool) -> None:
        if self.explode:
            raise RuntimeError("a bug in the sink")
        with self.lock:
            self.changes.append((path, appeared))

    def lost(self, reason: str) -> None:
        self.lost_reasons.append(reason)

    def failed(self, root: str, reason: str) -> None:
        self.failures.append((root, reason))

    def paths(self) -> set[str]:
        with self.lock:
            return {path for path, _ in self.changes}


def top_of(folder: Path) -> FolderRef:
    (top,) = expand_root(str(folder))
    return top


def watch_all(observer: InotifyObserver, folder: Path) -> None:
    """What the daemon's full scan does: walk, handing each folder to the observer."""
    top = top_of(folder)
    problems: list[tuple[str, str]] = []
    for _ in walk_folders(top, problems, opened=observer.watch):
        pass
    assert problems == []


@pytest.fixture
def sink() -> Recorder:
    return Recorder()


@pytest.fixture
def inotify(sink: Recorder) -> Iterator[InotifyObserver]:
    observer = InotifyObserver(sink, WalkLimits())
    yield observer
    observer.stop()


# ---------------------------------------------------------------------------------------------
# The inotify observer.


def test_folders_made_and_moved_inside_a_root_are_watched_under_their_new_names(
    tmp_path: Path, sink: Recorder, inotify: InotifyObserver
) -> None:
    """A run folder renamed inside the root keeps its watches under the new name (events name
    the new path); one moved out of the root gives its watches back."""
    (tmp_path / "outside").mkdir()
    root = tmp_path / "root"
    (root / "old" / "run").mkdir(parents=True)
    watch_all(inotify, root)
    assert inotify.watch_count() == 3

    os.rename(root / "old", root / "new")
    (root / "made" / "deeper").mkdir(parents=True)
    wait_until(lambda: inotify.watch_count() >= 5, "watches on the folders made")
    (root / "new" / "run" / "epoch1.pt").write_bytes(b"x")
    (root / "made" / "deeper" / "epoch2.pt").write_bytes(b"x")
    wanted = {f"{root}/new/run/epoch1.pt", f"{root}/made/deeper/epoch2.pt"}
    wait_until(lambda: wanted <= sink.paths(), "events under the new names")
    assert not any("/old/" in path for path in sink.paths())

    os.rename(root / "new", tmp_path / "outside" / "new")
    wait_until(lambda: inotify.watch_count() == 3, "the moved-out folders' watches dropped")
    assert sink.failures == [] and sink.lost_reasons == []


def test_a_dying_reader_thread_is_reported_not_silent(
    tmp_path: Path, sink: Recorder, inotify: InotifyObserver, caplog: pytest.LogCaptureFixture
) -> None:
    watch_all(inotify, tmp_path)
    assert inotify.failure is None
    sink.explode = True

    (tmp_path / "epoch1.pt").write_bytes(b"x")

    failure = wait_until(lambda: inotify.failure, "the observer to report its failure")
    assert failure == "its reader thread died (RuntimeError: a bug in the sink)"
    assert "inotify observer: its reader thread died" in caplog.text
    inotify.stop()  # stopping a dead observer is quiet


def test_a_root_past_the_watch_limit_is_given_up_whole(
    tmp_path: Path, sink: Recorder, inotify: InotifyObserver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel refusing one watch (ENOSPC, as at the limit) gives up the whole root: its
    other watches are removed, so a half-watched root never misses events silently."""
    for index in range(4):
        (tmp_path / f"run{index}").mkdir()
    real = inotify._libc.add_watch
    calls = 0

    def add_watch(fd: int, path: bytes, mask: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            import ctypes

            ctypes.set_errno(28)  # ENOSPC
            return -1
        return int(real(fd, path, mask))

    monkeypatch.setattr(inotify._libc, "add_watch", add_watch)
    watch_all(inotify, tmp_path)

    assert sink.failures == [(str(tmp_path), pytest.approx(sink.failures[0][1]))]
    assert "the inotify watch limit is reached" in sink.failures[0][1]
    assert inotify.watch_count() == 0
    assert inotify.roots() == []


# ---------------------------------------------------------------------------------------------
# The polling observer.


def test_polling_reports_changes_made_from_the_moment_a_root_is_added(
    tmp_path: Path, sink: Recorder
) -> None:
    """The first walk takes stock in the observer's thread; a file written between ``add`` and
    that walk is reported all the same (by its ctime), and later changes by the next walks."""
    (tmp_path / "run").mkdir()
    polling = PollingObserver(sink, WalkLimits(), interval=0.05)
    try:
        polling.add(top_of(tmp_path))
        (tmp_path / "run" / "new.pt").write_bytes(b"x")
        wait_until(lambda: f"{tmp_path}/run/new.pt" in sink.paths(), "the file written at once")
        (tmp_path / "run" / "later.pt").write_bytes(b"x")
        wait_until(lambda: f"{tmp_path}/run/later.pt" in sink.paths(), "a later file")
        os.symlink("/", tmp_path / "run" / "link")
        wait_until(lambda: (f"{tmp_path}/run/link", True) in sink.changes, "the new symlink")
    finally:
        polling.stop()
    assert polling.failure is None


# ---------------------------------------------------------------------------------------------
# The daemon, when its inotify observer dies.


def test_the_daemon_polls_every_root_once_its_inotify_thread_dies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader thread dies (a bug, injected at its sink): the daemon says so, polls the
    root and rescans at once; a checkpoint written afterwards is extracted by polling (the
    periodic rescan is an hour away), and stopping returns 0."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    watcher = Watcher(
        None,
        [
            "settle_seconds=0.2",
            "min_age_seconds=0",
            "rescan_seconds=3600",
            "nice=0",
            f"ledger={tmp_path / 'ledger.jsonl'}",
        ],
        [str(root)],
        Notifier(),
    )
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(watcher.run()))
    thread.start()
    try:
        wait_until(lambda: "watching 1 folder: 1 by inotify" in caplog.text, "the watching")
        healthy = watcher._handler.changed

        def broken_once(path: str, *, appeared: bool) -> None:
            watcher._handler.changed = healthy  # type: ignore[method-assign]
            raise RuntimeError("a bug in the sink")

        watcher._handler.changed = broken_once  # type: ignore[method-assign]
        (root / "run" / "trigger.pt").write_bytes(b"x")
        wait_until(lambda: "polling it instead, and rescanning" in caplog.text, "the fallback")

        save_full(root / "run" / "epoch1.pt", epoch=1)
        copy = root / "run" / "epoch1_inference.pt"
        wait_until(copy.exists, "the extraction, by polling", details=lambda: caplog.text)
    finally:
        watcher._stop.set("test")
        thread.join(timeout=TIMEOUT)
    assert exit_codes == [0]
    assert "Traceback" not in caplog.text  # one line each: the death, and what is done about it
    fallback = next(r for r in caplog.records if "polling it instead" in r.getMessage())
    assert fallback.levelno == logging.WARNING
    assert fallback.getMessage() == (
        f"{root}: the inotify observer failed: its reader thread died "
        "(RuntimeError: a bug in the sink); polling it instead, and rescanning"
    )
