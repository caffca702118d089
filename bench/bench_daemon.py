"""Daemon benchmark (issue 4): `sweeper watch` idle, latency and burst, as whole processes.

    python bench/bench_daemon.py [--quick] [--json] [--workdir DIR]

Everything is generated under DIR (/tmp/sweeper-bench-daemon) and removed at the end.  Each
phase starts its own daemon, ``sweeper watch ROOT --ledger L KEY=VALUE...``, with a real AF_UNIX
datagram socket as ``NOTIFY_SOCKET`` (a thread drains it at once, as PID 1 does: the kernel queues
only ``net.unix.max_dgram_qlen`` datagrams, and a full queue makes the daemon's send wait).

  idle     bench/make_tree.py builds 1,000 run folders of one small full checkpoint each under
           DIR/idle/data/*/*/results/checkpoints; a one-shot ``sweeper sweep`` writes every
           inference copy first, so the daemon's catch-up sweep finds nothing to do.  The daemon
           runs the bundled defaults (settle 30 s, rescan 600 s).  After READY=1 and a few quiet
           seconds, the window: its CPU time (utime + stime of every thread, /proc/PID/stat) as
           a share of one core, its context switches (wakeups), then VmRSS and VmHWM, the
           inotify watches it holds (``inotify wd:`` lines in /proc/PID/fdinfo) and whether any
           libtorch is mapped.
  rescan   the same tree and a second daemon with a short rescan_seconds: a window of exactly
           N rescan periods gives the CPU cost of one full rescan of the 1,000 folders, and
           that cost spread over the default 600 s.
  latency  settle_seconds=2, rescan 3600 s.  A writer process (torch) builds a full checkpoint
           (bench/make_checkpoint.py, 5 x Linear(2048, 2048) + AdamW: ~252 MB) and, per trial,
           ``torch.save``s it under a temporary name in an empty run folder and renames it into
           place; "writer finished" is when the rename returned.  The bench polls (every 5 ms)
           for ``<stem>_inference.pt``, which the daemon renames into place whole.  Then, with
           the daemon idle, ``sweeper extract SRC -o OUT`` of the same file is timed as a whole
           process (after a ``sync``, page cache warm).  Target: latency <= settle + 2 x extract.
  burst    settle_seconds=1, keep_full=2, min_age_seconds=0.  make_tree.py stages 20 runs x
           epochs 1..10 outside the watched root; the bench renames all 200 into 20 empty
           watched run folders in one tight loop, then polls until every file has its inference
           copy and exactly epochs 9 and 10 remain full in every folder.  It records the time
           to drain, STATUS= maxima, the daemon's VmRSS/VmHWM before and after (and sampled
           while draining), the ledger's records, ``sweeper inspect --verify`` of every copy,
           and any file left that should not be there.

Children run without PYTHONDONTWRITEBYTECODE, as a normal install does.  CPU time and memory come
from /proc/PID of the daemon itself (spawned directly, so VmHWM is its own: the high-water mark
belongs to the address space that exec creates).

A benchmark, not a test (STYLE.md rule 15): it prints figures against the issue's targets and
never fails on them; it exits non-zero only if a command fails or the daemon dies.  Progress goes
to stderr; the table (or, with --json, one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import IO

import harness
from harness import (
    CommandFailed,
    describe_digests,
    machine,
    sweeper_command,
    timed_process,
)

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WORKDIR = "/tmp/sweeper-bench-daemon"
MIB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

TARGET_IDLE_CPU_PERCENT = 0.1  # "~0%": a tenth of a percent of one core
TARGET_IDLE_RSS_MIB = 60.0
TARGET_LATENCY_RATIO = 1.0  # latency / (settle + 2 x extract)

DEFAULT_RESCAN_SECONDS = 600.0  # the bundled config.yaml's
IDLE_RUNS = 1_000
LATENCY_SETTLE_S = 2.0
LATENCY_SHAPE = (2048, 5)  # width, layers: ~252 MB with AdamW state
BURST_RUNS = 20
BURST_EPOCHS = 10
BURST_KEEP_FULL = 2
BURST_SETTLE_S = 1.0
POLL_S = 0.005
DEADLINE_S = 600.0

# PYTHONDONTWRITEBYTECODE (set in some sandboxes) would leave an editable sweeper recompiling its
# modules on every start; children run as a normal install does.
CHILD_ENV = dict(harness.CHILD_ENV)
for _inherited in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
    CHILD_ENV.pop(_inherited, None)

# STATUS=, as sweeper.report.status_line words it (sizes in human units).
_STATUS = re.compile(
    r"^STATUS=(?:NOT ACTING: .*; )?(?P<phase>[^;]+); (?P<queued>\d+) queued, "
    r"(?P<settling>\d+) settling; (?P<actions>\d+) files acted on, (?P<failed>\d+) failed; "
    r"reclaimed (?P<today>.+) today, (?P<total>.+) in total$"
)


@dataclass(frozen=True)
class Scale:
    idle_seconds: float
    quiet_seconds: float  # after READY=1, before the idle window opens
    rescan_seconds: float
    rescans: int
    trials: int


FULL_SCALE = Scale(idle_seconds=60.0, quiet_seconds=5.0, rescan_seconds=15.0, rescans=4, trials=9)
QUICK_SCALE = Scale(idle_seconds=15.0, quiet_seconds=3.0, rescan_seconds=10.0, rescans=2, trials=3)


class BenchFailed(CommandFailed):
    pass


# ---------------------------------------------------------------------------------------------
# systemd's side of the notify protocol


@dataclass(frozen=True)
class Status:
    settling: int
    queued: int
    working: int
    actions: int
    failed: int

    @property
    def idle(self) -> bool:
        return not (self.settling or self.queued or self.working)

    @classmethod
    def parse(cls, message: str) -> Status | None:
        match = _STATUS.match(message)
        if match is None:
            return None
        return cls(
            settling=int(match["settling"]),
            queued=int(match["queued"]),
            working=1 if match["phase"].startswith("working on") else 0,
            actions=int(match["actions"]),
            failed=int(match["failed"]),
        )


class NotifyReceiver:
    """A bound AF_UNIX datagram socket drained by a thread; every datagram kept, timestamped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(path)
        self._sock.settimeout(0.2)
        self._lock = threading.Lock()
        self._messages: list[tuple[float, str]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._receive, name="notify", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._messages.append((time.monotonic(), data.decode(errors="replace")))

    def messages(self, since: int = 0) -> list[tuple[float, str]]:
        with self._lock:
            return self._messages[since:]

    def mark(self) -> int:
        with self._lock:
            return len(self._messages)

    def statuses(self, since: int = 0) -> list[tuple[float, Status]]:
        parsed = ((t, Status.parse(m)) for t, m in self.messages(since))
        return [(t, s) for t, s in parsed if s is not None]

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=5)
        self._sock.close()
        if os.path.lexists(self.path):
            os.unlink(self.path)


# ---------------------------------------------------------------------------------------------
# the daemon, seen from /proc


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    hwm_kib: int
    threads: int


@dataclass(frozen=True)
class Sample:
    at: float  # monotonic
    cpu_s: float
    switches: int  # voluntary + involuntary context switches, all threads


class Daemon:
    """One ``sweeper watch`` process, spawned directly so /proc/PID is the daemon's own."""

    def __init__(
        self,
        name: str,
        workdir: str,
        roots: Sequence[str],
        settings: dict[str, str],
        receiver: NotifyReceiver,
    ) -> None:
        state = os.path.join(workdir, f"state-{name}")
        os.makedirs(state, exist_ok=True)
        self.name = name
        self.ledger = os.path.join(state, "ledger.jsonl")
        self.log_path = os.path.join(workdir, "logs", f"daemon-{name}.stderr")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self.argv = [*sweeper_command(), "watch", *roots, "--ledger", self.ledger]
        self.argv += [f"{key}={value}" for key, value in settings.items()]
        self.receiver = receiver
        self.since = receiver.mark()
        env = {**CHILD_ENV, "NOTIFY_SOCKET": receiver.path}
        with open(self.log_path, "wb") as log:
            self.started = time.monotonic()
            self.process = subprocess.Popen(
                self.argv,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.pid = self.process.pid

    @property
    def command(self) -> str:
        return " ".join(self.argv)

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchFailed(
                f"daemon {self.name} exited {self.process.returncode}; log tail:\n"
                + self.log_tail()
            )

    def wait_ready(self, timeout: float = DEADLINE_S) -> float:
        """Seconds from spawn to READY=1."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in self.receiver.messages(self.since):
                if message == "READY=1":
                    return at - self.started
            self.check_alive()
            time.sleep(0.02)
        raise BenchFailed(f"daemon {self.name}: no READY=1 within {timeout:.0f} s")

    def last_status(self) -> Status | None:
        found = self.receiver.statuses(self.since)
        return found[-1][1] if found else None

    def is_idle(self) -> bool:
        """The last STATUS= says 0 settling, 0 queued, 0 working."""
        status = self.last_status()
        return status is not None and status.idle

    def sample(self) -> Sample:
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        switches = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/status") as status:
                    for line in status:
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt")):
                            switches += int(line.split()[1])
            except OSError:
                continue  # a thread that ended meanwhile
        return Sample(time.monotonic(), cpu, switches)

    def thread_cpu(self) -> dict[int, float]:
        """CPU seconds of each thread, by thread id."""
        found: dict[int, float] = {}
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/stat") as stat:
                    fields = stat.read().rpartition(")")[2].split()
            except OSError:
                continue
            found[int(task)] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return found

    def memory(self) -> Memory:
        values: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    values[key] = int(rest.split()[0])
        return Memory(values["VmRSS"], values["VmHWM"], values["Threads"])

    def inotify_watches(self) -> int:
        count = 0
        base = f"/proc/{self.pid}/fdinfo"
        for fd in os.listdir(base):
            try:
                with open(os.path.join(base, fd)) as info:
                    count += sum(1 for line in info if line.startswith("inotify wd:"))
            except OSError:
                continue
        return count

    def mapped(self, needle: str) -> list[str]:
        """Files mapped into the daemon whose path contains ``needle``."""
        found: set[str] = set()
        with open(f"/proc/{self.pid}/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and needle in parts[5]:
                    found.add(parts[5].strip())
        return sorted(found)

    def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        if self.process.poll() is not None:
            return self.process.returncode, 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise BenchFailed(f"daemon {self.name} ignored SIGTERM for 30 s") from None
        return code, time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class Run:
    wall_s: float
    peak_rss_kib: int


def run_process(argv: Sequence[str], log_path: str, stdout: IO[bytes] | None = None) -> Run:
    timed = timed_process(argv, log_path, stdout, CHILD_ENV)
    return Run(timed.wall_s, timed.peak_rss_kib)


def wait_until(
    predicate: Callable[[], bool],
    daemon: Daemon,
    what: str,
    timeout: float = DEADLINE_S,
    interval: float = POLL_S,
) -> float:
    """Poll until ``predicate`` holds; the monotonic time it was first seen to hold."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchFailed(
                f"timed out after {timeout:.0f} s waiting for {what}\n" + daemon.log_tail()
            )
        daemon.check_alive()
        time.sleep(interval)


def exists(path: str) -> Callable[[], bool]:
    return lambda: os.path.exists(path)


def build_tree(top: str, files: int, per_run: int, log: str) -> float:
    maker = os.path.join(BENCH_DIR, "make_tree.py")
    argv = [sys.executable, maker, top, "--files", str(files), "--per-run", str(per_run)]
    return run_process(argv, log).wall_s


def glob_root(top: str) -> str:
    """make_tree.py's layout, as an admin would configure it."""
    return os.path.join(top, "data", "*", "*", "results", "checkpoints")


def loadavg() -> float:
    return os.getloadavg()[0]


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# phases


@dataclass
class Idle:
    command: str
    runs: int
    presweep_s: float
    ready_s: float
    catch_up_actions: int
    window_s: float
    cpu_s: float
    switches: int
    memory: Memory
    watches: int
    torch_mapped: list[str]
    loadavg: tuple[float, float]

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_s / self.window_s

    @property
    def wakeups_per_s(self) -> float:
        return self.switches / self.window_s


@dataclass
class Rescan:
    command: str
    rescan_seconds: float
    rescans: int
    window_s: float
    cpu_s: float
    working_seen: int  # STATUS= datagrams that showed a rescan at work
    # The window's CPU by thread role.  Roles by thread id order (ids grow as threads start,
    # barring wrap-around): the main thread is the pid; the worker started last, after the
    # catch-up; every other thread is watchdog's (its inotify reader, its dispatcher and one
    # emitter per watched root).
    cpu_by_role: dict[str, float]
    memory_before: Memory
    memory_after: Memory
    loadavg: tuple[float, float]

    def cpu_per_rescan_s(self, idle_cpu_percent: float) -> float:
        idle_share = idle_cpu_percent / 100.0 * self.window_s
        return max(0.0, self.cpu_s - idle_share) / self.rescans

    def amortised_percent(self, idle_cpu_percent: float) -> float:
        return 100.0 * self.cpu_per_rescan_s(idle_cpu_percent) / DEFAULT_RESCAN_SECONDS


@dataclass(frozen=True)
class Trial:
    source_bytes: int
    write_s: float  # torch.save + rename, in the writer
    latency_s: float  # rename returned -> inference copy in place
    promote_s: float  # rename returned -> STATUS= shows the folder queued or worked on
    extract_s: float  # `sweeper extract` wall, whole process
    extract_peak_rss_kib: int


@dataclass
class Latency:
    command: str
    settle_s: float
    trials: list[Trial] = field(default_factory=list)
    memory: Memory | None = None
    loadavg: tuple[float, float] = (0.0, 0.0)

    @property
    def median_latency_s(self) -> float:
        return statistics.median(t.latency_s for t in self.trials)

    @property
    def median_extract_s(self) -> float:
        return statistics.median(t.extract_s for t in self.trials)

    @property
    def median_promote_s(self) -> float:
        return statistics.median(t.promote_s for t in self.trials)

    @property
    def median_work_s(self) -> float:
        return statistics.median(t.latency_s - t.promote_s for t in self.trials)

    @property
    def bound_s(self) -> float:
        return self.settle_s + 2 * self.median_extract_s

    @property
    def ratio(self) -> float:
        return self.median_latency_s / self.bound_s

    @property
    def trial_ratios(self) -> list[float]:
        return [t.latency_s / (self.settle_s + 2 * t.extract_s) for t in self.trials]


@dataclass
class Burst:
    command: str
    files: int
    runs: int
    arrive_s: float  # first rename -> last rename
    first_copy_s: float  # last rename -> first inference copy
    drain_s: float  # last rename -> every folder in its final state
    idle_status_s: float  # last rename -> STATUS= back to 0 settling, 0 queued, 0 working
    copies: int
    full_left: int
    wrong_folders: list[str]
    unexpected_files: list[str]
    max_settling: int
    max_queued: int
    final_status: Status | None
    ledger_actions: dict[str, int]
    inspected_inference_intact: int
    memory_before: Memory
    memory_after: Memory
    rss_max_sampled_kib: int
    cpu_s: float
    loadavg: tuple[float, float]


@dataclass
class Result:
    quick: bool
    sources_digest: str  # before the first phase and after the last; both if they differ
    idle: Idle
    rescan: Rescan
    latency: Latency
    burst: Burst
    stops: dict[str, tuple[int, float]]


def phase_idle(
    workdir: str,
    scale: Scale,
    receiver: NotifyReceiver,
    log: str,
    stops: dict[str, tuple[int, float]],
) -> tuple[Idle, Rescan]:
    top = os.path.join(workdir, "idle")
    progress(f"idle: tree of {IDLE_RUNS} run folders x 1 checkpoint in {top} ...")
    build_tree(top, IDLE_RUNS, 1, log)
    root = glob_root(top)
    presweep_ledger = os.path.join(workdir, "state-presweep", "ledger.jsonl")
    os.makedirs(os.path.dirname(presweep_ledger), exist_ok=True)
    progress("idle: one-shot sweep writes every inference copy first ...")
    # On one CPU, so that `sweeper sweep` classifies in-process: its fork pool of one worker per
    # CPU hangs now and then at shutdown (the workers inherit its SIGTERM handler, which only
    # sets a flag, so Pool.terminate() cannot end a worker blocked on the task queue's lock).
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # this thread's, inherited by the child
    try:
        argv = [*sweeper_command(), "sweep", root, "--ledger", presweep_ledger]
        presweep = run_process(argv, log)
    finally:
        os.sched_setaffinity(0, allowed)
    progress(f"  {presweep.wall_s:.1f} s")

    load_start = loadavg()
    defaults = {"settle_seconds": "30", "rescan_seconds": f"{DEFAULT_RESCAN_SECONDS:g}"}
    daemon = Daemon("idle", workdir, [root], defaults, receiver)
    try:
        ready_s = daemon.wait_ready()
        progress(
            f"idle: READY=1 after {ready_s:.1f} s; quiet {scale.quiet_seconds:g} s, "
            f"then a {scale.idle_seconds:g} s window ..."
        )
        time.sleep(scale.quiet_seconds)
        status = daemon.last_status()
        before = daemon.sample()
        time.sleep(scale.idle_seconds)
        after = daemon.sample()
        daemon.check_alive()
        idle = Idle(
            command=daemon.command,
            runs=IDLE_RUNS,
            presweep_s=presweep.wall_s,
            ready_s=ready_s,
            catch_up_actions=status.actions if status else -1,
            window_s=after.at - before.at,
            cpu_s=after.cpu_s - before.cpu_s,
            switches=after.switches - before.switches,
            memory=daemon.memory(),
            watches=daemon.inotify_watches(),
            torch_mapped=daemon.mapped("torch"),
            loadavg=(load_start, loadavg()),
        )
        progress(
            f"  {idle.cpu_percent:.3f}% CPU, {idle.wakeups_per_s:.1f} wakeups/s, "
            f"RSS {idle.memory.rss_kib / 1024:.1f} MiB (HWM "
            f"{idle.memory.hwm_kib / 1024:.1f}), {idle.watches} inotify watches"
        )
    finally:
        stops["idle"] = daemon.stop()

    load_start = loadavg()
    period = scale.rescan_seconds
    settings = {"settle_seconds": "30", "rescan_seconds": f"{period:g}"}
    daemon = Daemon("rescan", workdir, [root], settings, receiver)
    try:
        daemon.wait_ready()
        # Rescans fall due at READY + k x period: a window from half a period in, n periods
        # long, holds exactly n of them, each with half a period to finish.
        ready_at = next(at for at, m in receiver.messages(daemon.since) if m == "READY=1")
        time.sleep(max(0.0, ready_at + period / 2 - time.monotonic()))
        memory_before = daemon.memory()
        mark = receiver.mark()
        before = daemon.sample()
        threads_before = daemon.thread_cpu()
        progress(f"rescan: rescan_seconds={period:g}, a window of {scale.rescans} rescans ...")
        time.sleep(period * scale.rescans)
        after = daemon.sample()
        threads_after = daemon.thread_cpu()
        daemon.check_alive()
        working = sum(1 for _, s in receiver.statuses(mark) if s.working)
        rescan = Rescan(
            command=daemon.command,
            rescan_seconds=period,
            rescans=scale.rescans,
            window_s=after.at - before.at,
            cpu_s=after.cpu_s - before.cpu_s,
            working_seen=working,
            cpu_by_role=cpu_by_role(daemon.pid, threads_before, threads_after),
            memory_before=memory_before,
            memory_after=daemon.memory(),
            loadavg=(load_start, loadavg()),
        )
        progress(f"  {rescan.cpu_s:.2f} s CPU over {rescan.window_s:.1f} s")
    finally:
        stops["rescan"] = daemon.stop()
    shutil.rmtree(top)
    return idle, rescan


def cpu_by_role(pid: int, before: dict[int, float], after: dict[int, float]) -> dict[str, float]:
    """Split a window's CPU between the main thread, the worker and watchdog's threads."""
    roles = {"main": 0.0, "worker (scan, plan, execute)": 0.0, "watchdog threads": 0.0}
    worker = max(after)
    for tid, seconds in after.items():
        used = seconds - before.get(tid, 0.0)
        if tid == pid:
            roles["main"] += used
        elif tid == worker:
            roles["worker (scan, plan, execute)"] += used
        else:
            roles["watchdog threads"] += used
    return {role: round(seconds, 2) for role, seconds in roles.items()}


_WRITER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from make_checkpoint import build_checkpoint

checkpoint = build_checkpoint(int(sys.argv[2]), int(sys.argv[3]))
print("ready", flush=True)
for line in sys.stdin:
    path, epoch = line.split()
    checkpoint["epoch"] = int(epoch)
    temp = path + ".tmp"  # not *.pt: the daemon's patterns ignore it
    started = time.monotonic()
    torch.save(checkpoint, temp)
    os.rename(temp, path)
    print(started, time.monotonic(), os.path.getsize(path), flush=True)
"""


def phase_latency(
    workdir: str,
    scale: Scale,
    receiver: NotifyReceiver,
    log: str,
    stops: dict[str, tuple[int, float]],
) -> Latency:
    top = os.path.join(workdir, "latency")
    root = os.path.join(top, "results", "checkpoints")
    folders = [os.path.join(root, f"trial{number}") for number in range(1, scale.trials + 1)]
    for folder in folders:
        os.makedirs(folder)
    out_dir = os.path.join(top, "extract-out")
    os.makedirs(out_dir)
    width, layers = LATENCY_SHAPE
    progress(f"latency: writer builds {layers} x Linear({width}, {width}) + AdamW ...")
    with open(log, "ab") as writer_log:
        writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, BENCH_DIR, str(width), str(layers)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=writer_log,
            text=True,
            env=CHILD_ENV,
        )
    assert writer.stdin is not None and writer.stdout is not None
    daemon: Daemon | None = None
    load_start = loadavg()
    try:
        if writer.stdout.readline().strip() != "ready":
            raise BenchFailed(f"the checkpoint writer failed; see {log}")
        settings = {"settle_seconds": f"{LATENCY_SETTLE_S:g}", "rescan_seconds": "3600"}
        daemon = running = Daemon("latency", workdir, [root], settings, receiver)
        running.wait_ready()
        result = Latency(running.command, LATENCY_SETTLE_S)
        for number, folder in enumerate(folders, start=1):
            source = os.path.join(folder, f"checkpoint_epoch_{number}.pt")
            copy = os.path.join(folder, f"checkpoint_epoch_{number}_inference.pt")
            os.sync()  # untimed: no trial pays for the last one's writeback
            mark = receiver.mark()
            writer.stdin.write(f"{source} {number}\n")
            writer.stdin.flush()
            reply = writer.stdout.readline().split()
            if len(reply) != 3:
                raise BenchFailed(f"the checkpoint writer failed; see {log}")
            started, finished, size = float(reply[0]), float(reply[1]), int(reply[2])
            appeared = wait_until(exists(copy), running, copy)
            wait_until(running.is_idle, running, "the daemon to go idle", interval=0.05)
            out = os.path.join(out_dir, f"checkpoint_epoch_{number}_inference.pt")
            os.sync()
            extract = run_process([*sweeper_command(), "extract", source, "-o", out], log)
            # The main loop publishes STATUS= right after it promotes a settled path, in the same
            # tick: the first status showing work is when the settle wait ended.
            promoted = next(
                (at for at, s in receiver.statuses(mark) if not s.settling and not s.idle),
                float("nan"),
            )
            trial = Trial(
                size,
                finished - started,
                appeared - finished,
                promoted - finished,
                extract.wall_s,
                extract.peak_rss_kib,
            )
            result.trials.append(trial)
            progress(
                f"latency: trial {number}/{scale.trials}  {size / 1e6:.0f} MB written in "
                f"{trial.write_s:.2f} s; promoted after {trial.promote_s:.3f} s, copy after "
                f"{trial.latency_s:.3f} s; extract "
                f"{trial.extract_s:.3f} s"
            )
            for path in (out, source, copy):
                os.unlink(path)
        result.memory = running.memory()
        result.loadavg = (load_start, loadavg())
        return result
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)
        writer.stdout.close()
        if daemon is not None:
            stops["latency"] = daemon.stop()
        shutil.rmtree(top)


def _count_actions(ledger: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    if not os.path.exists(ledger):
        return counts
    with open(ledger) as lines:
        for line in lines:
            if line.strip():
                action = str(json.loads(line).get("action"))
                counts[action] = counts.get(action, 0) + 1
    return dict(sorted(counts.items()))


def _inspect_intact_inference(paths: Sequence[str], workdir: str, log: str) -> int:
    """How many of ``paths`` ``sweeper inspect --verify`` reads as intact inference copies."""
    listing = os.path.join(workdir, "inspect.json")
    with open(listing, "wb") as out:
        run_process([*sweeper_command(), "inspect", "--json", "--verify", *paths], log, out)
    with open(listing) as source:
        text = source.read()
    os.unlink(listing)
    decoder, index, good = json.JSONDecoder(), 0, 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            return good
        item, index = decoder.raw_decode(text, index)
        if item.get("kind") == "inference" and item.get("intact"):
            good += 1


def phase_burst(
    workdir: str, receiver: NotifyReceiver, log: str, stops: dict[str, tuple[int, float]]
) -> Burst:
    top = os.path.join(workdir, "burst")
    stage = os.path.join(top, "stage")
    files = BURST_RUNS * BURST_EPOCHS
    progress(f"burst: staging {BURST_RUNS} runs x epochs 1..{BURST_EPOCHS} in {stage} ...")
    build_tree(stage, files, BURST_EPOCHS, log)
    staged = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(os.path.join(stage, "data"))
        for name in names
    )
    by_run: dict[str, list[str]] = {}
    for path in staged:
        by_run.setdefault(os.path.dirname(path), []).append(path)
    if len(by_run) != BURST_RUNS or len(staged) != files:
        raise BenchFailed(f"make_tree.py staged {len(staged)} files in {len(by_run)} folders")
    root = os.path.join(top, "watched", "results", "checkpoints")
    folders = [os.path.join(root, f"run{number:02d}") for number in range(BURST_RUNS)]
    for folder in folders:
        os.makedirs(folder)
    moves = [
        (path, os.path.join(folder, os.path.basename(path)))
        for folder, paths in zip(folders, by_run.values(), strict=True)
        for path in paths
    ]
    moves.sort(key=lambda move: (os.path.basename(move[0]), move[1]))  # epoch by epoch
    names = [f"checkpoint_epoch_{epoch}.pt" for epoch in range(1, BURST_EPOCHS + 1)]
    copies = {name.replace(".pt", "_inference.pt") for name in names}
    kept = set(names[-BURST_KEEP_FULL:])
    final = copies | kept

    load_start = loadavg()
    settings = {
        "settle_seconds": f"{BURST_SETTLE_S:g}",
        "rescan_seconds": "3600",
        "keep_full": str(BURST_KEEP_FULL),
        "min_age_seconds": "0",
    }
    daemon = Daemon("burst", workdir, [root], settings, receiver)
    try:
        daemon.wait_ready()
        time.sleep(1.0)
        memory_before = daemon.memory()
        cpu_before = daemon.sample().cpu_s
        mark = receiver.mark()
        progress(f"burst: {files} renames into {BURST_RUNS} watched run folders ...")
        first = time.monotonic()
        for source, target in moves:
            os.rename(source, target)
        last = time.monotonic()
        rss_max = 0
        first_copy: float | None = None
        listings: dict[str, set[str]] = {}
        deadline = last + DEADLINE_S
        while True:
            now = time.monotonic()
            listings = {folder: set(os.listdir(folder)) for folder in folders}
            if first_copy is None and any(listing & copies for listing in listings.values()):
                first_copy = now
            rss_max = max(rss_max, daemon.memory().rss_kib)
            if all(listing == final for listing in listings.values()) or now > deadline:
                break
            daemon.check_alive()
            time.sleep(0.05)
        drained = now
        settled_status = wait_until(
            daemon.is_idle, daemon, "STATUS= to show the daemon idle", interval=0.05
        )
        idle_status_at = next(
            (at for at, s in receiver.statuses(mark) if s.idle and at >= first), settled_status
        )
        time.sleep(2.0)  # anything still to come (a second look at a folder) shows up here
        listings = {folder: set(os.listdir(folder)) for folder in folders}
        statuses = [s for _, s in receiver.statuses(mark)]
        memory_after = daemon.memory()
        cpu_after = daemon.sample().cpu_s
        present = [
            os.path.join(f, n) for f, listing in listings.items() for n in sorted(listing & copies)
        ]
        intact = _inspect_intact_inference(present, workdir, log) if present else 0
        result = Burst(
            command=daemon.command,
            files=files,
            runs=BURST_RUNS,
            arrive_s=last - first,
            first_copy_s=(first_copy - last) if first_copy is not None else float("nan"),
            drain_s=drained - last,
            idle_status_s=idle_status_at - last,
            copies=sum(len(listing & copies) for listing in listings.values()),
            full_left=sum(len(listing & set(names)) for listing in listings.values()),
            wrong_folders=[
                os.path.basename(f) for f, listing in listings.items() if listing != final
            ],
            unexpected_files=sorted(
                os.path.join(os.path.basename(f), n)
                for f, listing in listings.items()
                for n in listing - final
            ),
            max_settling=max((s.settling for s in statuses), default=0),
            max_queued=max((s.queued for s in statuses), default=0),
            final_status=daemon.last_status(),
            ledger_actions=_count_actions(daemon.ledger),
            inspected_inference_intact=intact,
            memory_before=memory_before,
            memory_after=memory_after,
            rss_max_sampled_kib=max(rss_max, memory_after.rss_kib),
            cpu_s=cpu_after - cpu_before,
            loadavg=(load_start, loadavg()),
        )
        progress(
            f"  drained {result.copies}/{files} copies, {result.full_left} full left, "
            f"in {result.drain_s:.2f} s; HWM {memory_before.hwm_kib / 1024:.1f} -> "
            f"{memory_after.hwm_kib / 1024:.1f} MiB"
        )
        return result
    finally:
        stops["burst"] = daemon.stop()
        shutil.rmtree(top)


def benchmark(workdir: str, scale: Scale, quick: bool) -> Result:
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    os.makedirs(os.path.join(workdir, "logs"))
    log = os.path.join(workdir, "logs", "commands.stderr")
    receiver = NotifyReceiver(os.path.join(workdir, "notify.sock"))
    stops: dict[str, tuple[int, float]] = {}
    digest_before = sweeper_sources_digest()
    succeeded = False
    try:
        idle, rescan = phase_idle(workdir, scale, receiver, log, stops)
        latency = phase_latency(workdir, scale, receiver, log, stops)
        burst = phase_burst(workdir, receiver, log, stops)
        digests = describe_digests(digest_before, sweeper_sources_digest())
        succeeded = True
        return Result(quick, digests, idle, rescan, latency, burst, stops)
    finally:
        receiver.close()
        if succeeded:
            shutil.rmtree(workdir)
        else:  # keep the logs (small) for the failure; the generated data goes
            for name in os.listdir(workdir):
                if name != "logs":
                    path = os.path.join(workdir, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
            progress(f"bench_daemon: logs kept in {os.path.join(workdir, 'logs')}")


# ---------------------------------------------------------------------------------------------
# report


def sweeper_sources_digest() -> str:
    """SHA-256 over the package's .py files beside this bench: which code was measured."""
    package = os.path.join(os.path.dirname(BENCH_DIR), "sweeper")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            digest.update(name.encode() + b"\0")
            with open(os.path.join(package, name), "rb") as source:
                digest.update(source.read())
    return digest.hexdigest()


@dataclass(frozen=True)
class Figure:
    phase: str
    name: str
    value: float
    unit: str
    target_max: float | None = None  # None: reported, no target

    @property
    def met(self) -> bool | None:
        return None if self.target_max is None else self.value <= self.target_max


def figures(result: Result) -> list[Figure]:
    idle, rescan, latency, burst = result.idle, result.rescan, result.latency, result.burst
    mib = 1 / 1024
    return [
        Figure("idle", "CPU, share of one core", idle.cpu_percent, "%", TARGET_IDLE_CPU_PERCENT),
        Figure("idle", "wakeups (context switches)", idle.wakeups_per_s, "/s"),
        Figure("idle", "VmRSS", idle.memory.rss_kib * mib, "MiB", TARGET_IDLE_RSS_MIB),
        Figure(
            "idle",
            "VmHWM (catch-up included)",
            idle.memory.hwm_kib * mib,
            "MiB",
            TARGET_IDLE_RSS_MIB,
        ),
        Figure("idle", "libtorch mapped", float(bool(idle.torch_mapped)), "yes=1", 0.0),
        Figure("idle", "inotify watches", idle.watches, ""),
        Figure("idle", "threads", idle.memory.threads, ""),
        Figure("idle", "spawn -> READY=1 (catch-up)", idle.ready_s, "s"),
        Figure(
            "rescan",
            f"CPU per full rescan, {idle.runs} folders",
            rescan.cpu_per_rescan_s(idle.cpu_percent),
            "s",
        ),
        Figure(
            "rescan",
            f"CPU with rescan_seconds={DEFAULT_RESCAN_SECONDS:g}",
            idle.cpu_percent + rescan.amortised_percent(idle.cpu_percent),
            "%",
            TARGET_IDLE_CPU_PERCENT,
        ),
        Figure(
            "rescan",
            "VmRSS after the rescans",
            rescan.memory_after.rss_kib * mib,
            "MiB",
            TARGET_IDLE_RSS_MIB,
        ),
        Figure("latency", "median latency", latency.median_latency_s, "s"),
        Figure("latency", "median `sweeper extract`", latency.median_extract_s, "s"),
        Figure("latency", "settle + 2 x extract", latency.bound_s, "s"),
        Figure(
            "latency", "latency / (settle + 2 x extract)", latency.ratio, "", TARGET_LATENCY_RATIO
        ),
        Figure("latency", "worst trial's ratio", max(latency.trial_ratios), ""),
        Figure(
            "latency", "median rename -> promoted (settle + tick)", latency.median_promote_s, "s"
        ),
        Figure("latency", "median promoted -> copy (daemon's work)", latency.median_work_s, "s"),
        Figure("burst", "inference copies missing", burst.files - burst.copies, "", 0.0),
        Figure("burst", "folders not in final state", len(burst.wrong_folders), "", 0.0),
        Figure("burst", "files left over", len(burst.unexpected_files), "", 0.0),
        Figure("burst", "drain (last rename -> all done)", burst.drain_s, "s"),
        Figure("burst", "VmHWM before", burst.memory_before.hwm_kib * mib, "MiB"),
        Figure(
            "burst", "VmHWM after", burst.memory_after.hwm_kib * mib, "MiB", TARGET_IDLE_RSS_MIB
        ),
        Figure(
            "burst",
            "VmHWM after / idle VmRSS",
            burst.memory_after.hwm_kib / idle.memory.rss_kib,
            "x",
        ),
    ]


def to_json(result: Result, workdir: str) -> dict[str, object]:
    idle, rescan, latency, burst = result.idle, result.rescan, result.latency, result.burst
    return {
        "benchmark": "daemon",
        "quick": result.quick,
        "sweeper_sources_sha256": result.sources_digest,
        "machine": machine(os.path.dirname(workdir.rstrip("/")) or "/"),
        "idle": {
            **asdict(idle),
            "cpu_percent": round(idle.cpu_percent, 4),
            "wakeups_per_s": round(idle.wakeups_per_s, 2),
        },
        "rescan": {
            **asdict(rescan),
            "cpu_per_rescan_s": round(rescan.cpu_per_rescan_s(idle.cpu_percent), 4),
            "amortised_percent_at_default": round(rescan.amortised_percent(idle.cpu_percent), 4),
        },
        "latency": {
            **asdict(latency),
            "median_latency_s": round(latency.median_latency_s, 4),
            "median_extract_s": round(latency.median_extract_s, 4),
            "bound_s": round(latency.bound_s, 4),
            "ratio": round(latency.ratio, 4),
            "trial_ratios": [round(r, 4) for r in latency.trial_ratios],
        },
        "burst": asdict(burst),
        "daemon_stops": {
            name: {"exit_code": code, "seconds": round(seconds, 3)}
            for name, (code, seconds) in result.stops.items()
        },
        "figures": [
            {
                "phase": f.phase,
                "name": f.name,
                "value": round(f.value, 4),
                "unit": f.unit,
                "target_max": f.target_max,
                "met": f.met,
            }
            for f in figures(result)
        ],
    }


def render(result: Result) -> str:
    idle, rescan, latency, burst = result.idle, result.rescan, result.latency, result.burst
    loads = [idle.loadavg, rescan.loadavg, latency.loadavg, burst.loadavg]
    lines = [
        f"load average (1 min) during the phases: {min(min(p) for p in loads):.2f}-"
        f"{max(max(p) for p in loads):.2f} on {os.cpu_count()} CPUs"
        + ("  (--quick)" if result.quick else ""),
        f"sweeper sources sha256: {result.sources_digest}",
        "",
        f"{'phase':<8} {'figure':<40} {'measured':>10} {'unit':<6} {'target':>10}",
    ]
    for f in figures(result):
        target = "" if f.target_max is None else f"<= {f.target_max:g}"
        verdict = "" if f.met is None else ("met" if f.met else "MISSED")
        lines.append(
            f"{f.phase:<8} {f.name:<40} {f.value:10.3f} {f.unit:<6} {target:>10} {verdict}"
        )
    lines += [
        "",
        f"latency trials (settle {latency.settle_s:g} s):",
        f"{'trial':>5} {'MB':>6} {'write s':>8} {'latency s':>10} {'= settled':>10} "
        f"{'+ work':>8} {'extract s':>10} {'extract MiB':>12} {'ratio':>6}",
    ]
    for number, (trial, ratio) in enumerate(
        zip(latency.trials, latency.trial_ratios, strict=True), start=1
    ):
        lines.append(
            f"{number:>5} {trial.source_bytes / 1e6:6.0f} {trial.write_s:8.2f} "
            f"{trial.latency_s:10.3f} {trial.promote_s:10.3f} "
            f"{trial.latency_s - trial.promote_s:8.3f} {trial.extract_s:10.3f} "
            f"{trial.extract_peak_rss_kib / 1024:12.1f} {ratio:6.2f}"
        )
    roles = ", ".join(f"{role} {seconds:.2f}" for role, seconds in rescan.cpu_by_role.items())
    lines += [
        "",
        f"idle: {idle.runs} run folders, catch-up actions {idle.catch_up_actions}, "
        f"window {idle.window_s:.1f} s, {idle.cpu_s:.2f} s CPU; torch mapped: "
        f"{idle.torch_mapped or 'none'}",
        f"rescan: {rescan.rescans} x {rescan.rescan_seconds:g} s, {rescan.cpu_s:.2f} s CPU in "
        f"{rescan.window_s:.1f} s ({roles}), STATUS working seen {rescan.working_seen}x; VmRSS "
        f"{rescan.memory_before.rss_kib / 1024:.1f} -> {rescan.memory_after.rss_kib / 1024:.1f}"
        " MiB",
        f"burst: {burst.files} files into {burst.runs} folders in {burst.arrive_s * 1000:.1f} ms;"
        f" first copy after {burst.first_copy_s:.2f} s; STATUS idle after "
        f"{burst.idle_status_s:.2f} s; max {burst.max_settling} settling, {burst.max_queued} "
        f"queued; {burst.cpu_s:.2f} s CPU; sampled VmRSS max "
        f"{burst.rss_max_sampled_kib / 1024:.1f} MiB",
        f"burst: {burst.copies} copies ({burst.inspected_inference_intact} verified by sweeper "
        f"inspect), {burst.full_left} full left (expected {burst.runs * BURST_KEEP_FULL}); "
        f"ledger {burst.ledger_actions}; final {burst.final_status}",
    ]
    if burst.wrong_folders:
        lines.append(f"burst: folders not in their final state: {burst.wrong_folders}")
    if burst.unexpected_files:
        lines.append(f"burst: files left over: {burst.unexpected_files[:10]}")
    lines.append(
        "daemon stops (SIGTERM): "
        + ", ".join(
            f"{name} exit {code} in {seconds:.2f} s"
            for name, (code, seconds) in result.stops.items()
        )
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure sweeper watch: idle, latency, burst.")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="shorter idle windows and 3 latency trials (about 2 minutes)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--workdir",
        default=DEFAULT_WORKDIR,
        help=f"for everything generated; removed at the end ({DEFAULT_WORKDIR})",
    )
    args = parser.parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    scale = QUICK_SCALE if args.quick else FULL_SCALE
    try:
        result = benchmark(workdir, scale, args.quick)
    except CommandFailed as error:
        print(f"bench_daemon: {error}", file=sys.stderr)
        return 1
    print(json.dumps(to_json(result, workdir), indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
