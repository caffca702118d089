"""The real ``sweeper watch`` as a subprocess, a datagram socket standing in for systemd, and
writer processes that behave like training jobs.

Nothing here sleeps for a fixed time and hopes: every wait polls for an observable fact (a file,
a datagram, a log line) up to a generous deadline, so a loaded machine makes tests slower, never
red.  When a wait fails, the message carries the daemon's log and every datagram it sent.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from conftest import run_cli, untimed
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

REPO_ROOT = Path(__file__).resolve().parents[1]
# Deadlines, not expectations: every wait normally ends in well under a second or two.
TIMEOUT = 60.0
SETTLE_SECONDS = 0.5
RESCAN_SECONDS = 2.0

T = TypeVar("T")

# STATUS=, in the words `sweeper status` uses (sweeper.report.status_line).
_STATUS = re.compile(
    r"^STATUS=(?:NOT ACTING: .*; )?(?:DISK PRESSURE on .*?; )?"
    r"(?P<phase>[^;]+); (?P<queued>\d+) queued, "
    r"(?P<settling>\d+) settling; (?P<actions>\d+) files acted on, (?P<failed>\d+) failed; "
    r"reclaimed (?P<today>-?[\d.]+ [KMGTP]?i?B) today, (?P<total>-?[\d.]+ [KMGTP]?i?B) in total$"
)


def daemon_status(ledger: Path) -> dict[str, Any]:
    """``sweeper status --ledger LEDGER --json``, run as a user would (exit 0 or 3)."""
    done = run_cli("status", "--ledger", ledger, "--json")
    assert done.returncode in (0, 3), done.stderr
    result: dict[str, Any] = done.json()
    return result


def wait_until(
    predicate: Callable[[], T | bool | None],
    what: str,
    *,
    timeout: float = TIMEOUT,
    interval: float = 0.02,
    details: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(interval)


@dataclass(frozen=True)
class Status:
    """One STATUS= datagram, parsed (sizes stay in their human units: the daemon's status file,
    read by `sweeper status --json`, has the bytes)."""

    phase: str
    settling: int
    queued: int
    working: int
    actions: int
    failed: int
    total: str

    @classmethod
    def parse(cls, message: str) -> Status | None:
        match = _STATUS.match(message)
        if match is None:
            return None
        phase = match["phase"]
        return cls(
            phase=phase,
            settling=int(match["settling"]),
            queued=int(match["queued"]),
            working=1 if phase.startswith("working on") else 0,
            actions=int(match["actions"]),
            failed=int(match["failed"]),
            total=match["total"],
        )


class NotifySocket:
    """A bound AF_UNIX datagram socket, as systemd's ``NOTIFY_SOCKET``, drained promptly on a
    thread as PID 1 drains it (the daemon's sends wait while the queue is full); keeps every
    datagram in arrival order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._arrived = threading.Condition()
        self._messages: list[str] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._reader.start()

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=TIMEOUT)
        self._sock.close()

    def _read(self) -> None:
        while not self._closed.is_set():
            readable, _, _ = select.select([self._sock], [], [], 0.05)
            if readable:
                self._drain()

    def _drain(self) -> None:
        with self._arrived:
            while True:
                try:
                    data = self._sock.recv(65536)
                except BlockingIOError:
                    return
                self._messages.append(data.decode())
                self._arrived.notify_all()

    @property
    def messages(self) -> list[str]:
        with self._arrived:
            return list(self._messages)

    def mark(self) -> int:
        """The index of the next datagram: everything from the mark on was sent after this
        call began (what the kernel held is taken first)."""
        self._drain()
        with self._arrived:
            return len(self._messages)

    def find(self, predicate: Callable[[str], bool], since: int = 0) -> int | None:
        """Index of the first datagram from ``since`` on that matches."""
        messages = self.messages
        for index in range(since, len(messages)):
            if predicate(messages[index]):
                return index
        return None

    def wait_for(
        self,
        predicate: Callable[[str], bool],
        what: str,
        *,
        since: int = 0,
        timeout: float = TIMEOUT,
        details: Callable[[], str] = lambda: "",
    ) -> int:
        """Index of the first matching datagram from ``since`` on, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(predicate, since)
            if found is not None:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"timed out after {timeout:.0f} s waiting for the datagram {what}\n"
                    f"datagrams: {self.messages!r}\n{details()}"
                )
            with self._arrived:
                self._arrived.wait(min(left, 0.1))

    def statuses(self, since: int = 0) -> list[Status]:
        parsed = (Status.parse(m) for m in self.messages[since:])
        return [status for status in parsed if status is not None]

    def count(self, message: str, since: int = 0) -> int:
        return sum(1 for m in self.messages[since:] if m == message)


class Reads(FileSystemEventHandler):
    """Counts, per file below ``top``, how often a process opened it read-only and closed it
    again (inotify's IN_CLOSE_NOWRITE): each time the daemon examines a file it does so once.
    The test must not read those files itself while it counts."""

    def __init__(self, top: Path) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._observer = InotifyObserver()
        self._observer.schedule(self, str(top), recursive=True)
        self._observer.start()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type == "closed_no_write" and not event.is_directory:
            path = os.fsdecode(event.src_path)
            with self._lock:
                self._counts[path] = self._counts.get(path, 0) + 1

    def count(self, path: Path) -> int:
        with self._lock:
            return self._counts.get(str(path), 0)

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=TIMEOUT)


class Daemon:
    """One ``python -m sweeper watch`` process; stderr goes to a file for the test to read."""

    def __init__(
        self,
        tmp_path: Path,
        args: Sequence[str],
        *,
        notify: NotifySocket | None,
        ledger: Path,
        env: dict[str, str] | None = None,
        as_watchdog_pid: bool = False,
        journal: bool = False,
        name: str = "daemon",
        user_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.notify = notify
        self.ledger = ledger
        # Datagrams from here on are this daemon's (an earlier one on the socket has stopped).
        self.since = notify.mark() if notify is not None else 0
        self.log_path = tmp_path / f"{name}.stderr"
        command = [sys.executable, "-m", "sweeper", "watch", *args, "--ledger", str(ledger)]
        if as_watchdog_pid:
            # systemd sets WATCHDOG_PID to the service's main pid; a shell that execs the daemon
            # keeps its pid, so $$ is the daemon's pid.
            command = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *command]
        if user_limits:
            command = [*in_user_namespace(user_limits), *command]
        environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        for inherited in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
            environ.pop(inherited, None)
        if notify is not None:
            environ["NOTIFY_SOCKET"] = str(notify.path)
        environ.update(env or {})
        with open(self.log_path, "wb") as stderr:
            if journal:
                # As under systemd: JOURNAL_STREAM names the very stream stderr is.
                info = os.fstat(stderr.fileno())
                environ["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
            self.process = subprocess.Popen(
                command,
                cwd=tmp_path,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.pid = self.process.pid

    def log(self) -> str:
        return untimed(self.log_path.read_text(errors="replace"))

    def details(self) -> str:
        state = "running" if self.process.poll() is None else f"exited {self.process.returncode}"
        messages = self.notify.messages if self.notify is not None else []
        return f"daemon {state}; datagrams: {messages!r}\ndaemon log:\n{self.log()}"

    def alive(self) -> bool:
        """True while running; fails the test at once (with the log) if it has died."""
        if self.process.poll() is not None:
            raise AssertionError(f"the daemon died\n{self.details()}")
        return True

    def wait_until(self, predicate: Callable[[], T | bool | None], what: str) -> T:
        """``wait_until`` that also fails fast if the daemon dies meanwhile."""
        return wait_until(lambda: self.alive() and predicate(), what, details=self.details)

    def wait_for(self, message: str | Callable[[str], bool], *, since: int | None = None) -> int:
        """Index of the first matching datagram this daemon sent (from ``since`` on)."""
        assert self.notify is not None
        predicate = (lambda m: m == message) if isinstance(message, str) else message
        start = self.since if since is None else max(since, self.since)
        return self.notify.wait_for(predicate, repr(message), since=start, details=self.details)

    def wait_ready(self) -> int:
        return self.wait_for("READY=1")

    def wait_log(self, text: str) -> None:
        self.wait_until(lambda: text in self.log(), f"{text!r} in the daemon's log")

    def wait_for_reads(
        self, reads: Reads, path: Path, since: int, count: int = 2, min_seconds: float = 0.0
    ) -> None:
        """Wait until the daemon has opened and examined ``path`` ``count`` more times than
        ``since`` (a :meth:`Reads.count`), and at least ``min_seconds`` have passed."""
        started = time.monotonic()
        self.wait_until(
            lambda: (
                reads.count(path) >= since + count and time.monotonic() - started >= min_seconds
            ),
            f"the daemon to examine {path.name} {count} more times",
        )

    def signal(self, signum: int) -> None:
        self.alive()
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the daemon did not exit within {timeout:.0f} s\n{self.details()}"
            ) from None

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL if it lingers; never leaves a process behind."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def in_user_namespace(limits: Mapping[str, int]) -> list[str]:
    """A command prefix: run in a new user namespace (root mapped to root) whose per-user kernel
    limits (/proc/sys/user/NAME, e.g. max_inotify_watches) are ``limits`` — the host's own
    limits stay untouched.  unshare and sh exec in turn, so the pid stays the daemon's."""
    settings = " && ".join(f"echo {n} > /proc/sys/user/{name}" for name, n in limits.items())
    return ["unshare", "--user", "--map-root-user", "sh", "-c", f'{settings} && exec "$@"', "sh"]


def user_namespaces_work() -> bool:
    """Whether this machine lets us make a user namespace and set its limits."""
    try:
        probe = subprocess.run(
            [*in_user_namespace({"max_inotify_watches": 100}), "true"],
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
    except OSError:
        return False
    return probe.returncode == 0


_IN_OPEN = 0x20


class DirectoryOpens:
    """Counts how often any process opens each of ``folders`` (inotify's IN_OPEN on the folder
    itself; opening a subfolder is an event with a name, not counted).  The kernel reports
    every open, so the count is exact once :meth:`count` has drained the queue."""

    def __init__(self, folders: Sequence[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        assert self._fd >= 0, os.strerror(ctypes.get_errno())
        self._folders: dict[int, Path] = {}
        for folder in folders:
            wd = libc.inotify_add_watch(self._fd, os.fsencode(folder), _IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self._folders[wd] = folder
        self._counts = dict.fromkeys(folders, 0)

    def count(self, folder: Path) -> int:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                if mask & _IN_OPEN and not length and wd in self._folders:
                    self._counts[self._folders[wd]] += 1
        return self._counts[folder]

    def close(self) -> None:
        os.close(self._fd)


# ---------------------------------------------------------------------------------------------
# Writers: other processes producing checkpoint files the way training jobs do.

_CHUNKED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    target, source, chunks, pause, stop_after = sys.argv[1:6]
    chunks, pause, stop_after = int(chunks), float(pause), int(stop_after)
    with open(source, "rb") as f:
        data = f.read()
    step = -(-len(data) // chunks)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    for index in range(chunks):
        if index == stop_after:
            print("stopped", flush=True)
            time.sleep(3600)  # until the test kills us, mid-file
        if index:
            time.sleep(pause)
        view = memoryview(data)[index * step : (index + 1) * step]
        while view:
            view = view[os.write(fd, view) :]
        print(f"chunk {index}", flush=True)
    print("written", flush=True)
    sys.stdin.readline()  # hold the file open, complete, until the test says close
    os.close(fd)
    print("closed", flush=True)
    """
)


class ChunkedWriter:
    """Another process writing ``source``'s bytes to ``target`` in ``chunks`` pieces, ``pause``
    seconds apart, through one open descriptor; it stops before chunk ``stop_after`` (to be
    killed there) or, once all is written, holds the file open until :meth:`close`."""

    def __init__(
        self,
        target: Path,
        source: Path,
        *,
        chunks: int,
        pause: float,
        stop_after: int | None = None,
    ) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CHUNKED_WRITER,
                str(target),
                str(source),
                str(chunks),
                str(pause),
                str(chunks if stop_after is None else stop_after),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def read_line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("close\n")
        self.process.stdin.flush()
        assert self.read_line() == "closed"
        self.process.wait(timeout=TIMEOUT)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=TIMEOUT)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=TIMEOUT)
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
