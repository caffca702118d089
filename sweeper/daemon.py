"""``sweeper watch``: the daemon.  Events say "look here"; the sweep's planner and executor act.

Threads: the main thread owns signals, the settle bookkeeping, rescans, the observers' health
and the systemd notifications; worker threads take folders (or a full rescan) from one bounded,
deduplicated queue and run scan -> plan -> execute on them under the action lock, exactly as
``sweeper sweep`` does; the observers (:mod:`sweeper.observers`) run their own threads.  A full
scan's walk also keeps the inotify watches complete.  Nothing imports torch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fnmatch
import logging
import os
import platform
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType

from sweeper import __version__, report, scan_cache
from sweeper.atomic import remove_stale_temps
from sweeper.config import ObserverKind, Settings, load_settings
from sweeper.counters import Counters, CountingSink, Totals, seeded_from
from sweeper.errors import ConfigError, LedgerUnavailable
from sweeper.execute import execute_plan
from sweeper.extract import is_sweeper_output, is_sweeper_temp
from sweeper.formats.layouts import MARKERS
from sweeper.intact import Verifier, verify_run
from sweeper.inventory import (
    FileReader,
    FolderRef,
    Inventory,
    ScanCache,
    WalkLimits,
    scan,
    scan_folder,
)
from sweeper.journal import Journal
from sweeper.ledger import AppendEach, acquire_instance_lock, action_lock, check_writable
from sweeper.ledger_segments import before_acting
from sweeper.metrics import Snapshot, reclaimable_left, write_metrics
from sweeper.notify import Notifier
from sweeper.observers import InotifyObserver, PollingObserver
from sweeper.plan import Pressure, SweepPlan, plan_all
from sweeper.policy import Action, Rules
from sweeper.preflight import check_plan
from sweeper.pressure import Space, bytes_needed, measure, measure_roots, under_pressure
from sweeper.scan_cache import PersistentCache
from sweeper.signals import StopFlag
from sweeper.status import DaemonStatus, process_start_time, status_path_for, write_status
from sweeper.trash import list_held, tidy_all

log = logging.getLogger(__name__)

# Filesystems where other hosts' writes raise no inotify events: watch them by polling.
NETWORK_FILESYSTEMS = frozenset(
    [
        "nfs",
        "nfs4",
        "cifs",
        "smb",
        "smb2",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "ceph",
        "glusterfs",
        "beegfs",
        "9p",
        "afs",
        "ncpfs",
        "panfs",
        "pvfs2",
        "orangefs",
        "quobyte",
        "wekafs",
        "virtiofs",
    ]
)
_FULL_SWEEP = "\0full-sweep"  # queue item: rescan every root (never a valid path)
_UNSETTLED = "skipped: changed "  # policy's words for a file not yet quiet for settle_seconds
_QUIET_SKIPS = frozenset(
    [
        "skipped: sweeper's own output",
        "skipped: already an inference checkpoint",
        "skipped: already bare weights",
    ]
)
_TICK_SECONDS = 0.5
_STATE_FILE_SECONDS = 1.0  # the status and metrics files are rewritten at most this often
_STATE_FILE_HEARTBEAT = 60.0  # ... and at least this often (``updated`` shows it is alive)
_SPACE_SECONDS = 2.0  # free space is measured this often, and at the next tick after events


def filesystem_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem holding ``path``, from the longest matching mount point."""
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) < 5 or not right:
                    continue
                mount_point = fields[4].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and (best is None or len(mount_point) > best[0]):
                    best = (len(mount_point), right.split()[0])
    except OSError:
        return None
    return best[1] if best else None


def wants_polling(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse"))


def lower_io_priority() -> bool:
    """Best-effort ``ioprio_set(IOPRIO_CLASS_IDLE)`` for this thread and the threads it starts
    (systemd's IOSchedulingClass=idle does the same for the service)."""
    number = {"x86_64": 251, "aarch64": 30, "ppc64le": 273}.get(platform.machine())
    if number is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(number, 1, 0, 3 << 13)) == 0


@dataclass
class _Pending:
    last_event: float
    folder: str


@dataclass
class _State:
    """What the main thread and the workers share; every field guarded by ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: dict[str, _Pending] = field(default_factory=dict)
    queued: set[str] = field(default_factory=set)
    busy: int = 0
    heartbeat: float = field(default_factory=time.monotonic)
    ledger_problem: str | None = None  # why nothing is being done: the ledger takes no records
    working_on: dict[str, str] = field(default_factory=dict)  # worker -> folder it sweeps
    errors: dict[str, int] = field(default_factory=dict)  # kind -> count, this run
    last_error: tuple[float, str] | None = None  # (Unix time, message)
    last_scan: tuple[float, float] | None = None  # the last full scan: (ended, seconds)
    reclaimable: dict[str, int] | None = None  # root -> what the last full plan left to do
    events: int = 0  # checkpoint-named paths changed so far (free space is measured after)
    spaces: dict[int, tuple[Space, str]] = field(default_factory=dict)  # dev -> (space, a root)
    pressured: frozenset[int] = frozenset()  # the devices under disk pressure


class _LastError(logging.Handler):
    """Notes the daemon's last error-level log line, for ``sweeper status``."""

    def __init__(self, state: _State) -> None:
        super().__init__(logging.ERROR)
        self._state = state

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it elsewhere
            return
        with self._state.lock:
            self._state.last_error = (record.created, " ".join(message.splitlines())[:500])


class _StateFiles:
    """Writes the status and metrics files on a thread of their own: an fsync waiting behind a
    busy disk (the daemon's I/O class is idle) must never hold up the main loop, which pings
    the watchdog.  Only the latest state offered is written; older ones are dropped."""

    def __init__(self, write: Callable[[DaemonStatus], None]) -> None:
        self._write = write
        self._changed = threading.Condition()
        self._latest: DaemonStatus | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="state-files", daemon=True)
        self._thread.start()

    def offer(self, status: DaemonStatus) -> None:
        with self._changed:
            self._latest = status
            self._changed.notify()

    def close(self, last: DaemonStatus) -> None:
        """Stop the thread, then write ``last`` here, once whatever it was writing is done."""
        with self._changed:
            self._closed = True
            self._latest = None
            self._changed.notify()
        self._thread.join(timeout=30)
        self._write(last)

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._latest is None and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                status, self._latest = self._latest, None
            if status is None:
                continue
            try:
                self._write(status)
            except Exception:  # never let the status thread die silently
                log.exception("writing the status file failed")


class _EventHandler:
    """The observers' sink (:class:`sweeper.observers.Sink`): notes which checkpoint-named paths
    changed; decides nothing.

    At most ``limit()`` paths are remembered: an event storm (a user's rename loop, a flood of
    files) past that drops them all and asks for one full rescan instead (``storm``), so memory
    stays bounded and nothing is missed.  Lost events and roots no longer watched are passed on
    to ``lost`` and ``failed``, for the main thread to act on."""

    def __init__(
        self,
        state: _State,
        patterns: Callable[[], Sequence[str]],
        symlink_seen: threading.Event,
        limit: Callable[[], int] = lambda: 10_000,
        storm: threading.Event | None = None,
        lost: Callable[[str], None] = lambda reason: None,
        failed: Callable[[str, str], None] = lambda root, reason: None,
    ) -> None:
        self._state = state
        self._patterns = patterns
        self._symlink_seen = symlink_seen
        self._limit = limit
        self._storm = storm if storm is not None else threading.Event()
        self.lost = lost
        self.failed = failed

    def interesting(self, name: str) -> bool:
        return (
            bool(name)
            and not is_sweeper_temp(name)
            and not is_sweeper_output(name)
            and any(fnmatch.fnmatchcase(name, p) for p in (*self._patterns(), *MARKERS))
        )

    def changed(self, path: str, *, appeared: bool) -> None:
        if appeared and os.path.islink(path):
            self._symlink_seen.set()  # it may pin a file in another folder: full rescan
        if not self.interesting(os.path.basename(path)):
            return
        with self._state.lock:
            pending = self._state.pending
            if path not in pending and len(pending) >= self._limit():
                pending.clear()  # the rescan the storm triggers covers every one of them
                self._storm.set()
                return
            pending[path] = _Pending(time.monotonic(), os.path.dirname(path))
            self._state.events += 1


class Watcher:
    """The daemon; ``run()`` returns the exit code."""

    def __init__(
        self,
        config_path: Path | None,
        overrides: Sequence[str],
        roots: Sequence[str],
        notifier: Notifier,
    ) -> None:
        self._config_path = config_path
        self._overrides = tuple(overrides)
        self._roots = tuple(roots)
        self._notifier = notifier
        self.settings: Settings = load_settings(config_path, overrides, roots=roots)
        self._stop = StopFlag()
        self._reload = threading.Event()
        self._state = _State()
        self._queue: queue.Queue[str] = queue.Queue(maxsize=self.settings.queue_size)
        self._workers: list[threading.Thread] = []
        self._symlink_targets: frozenset[tuple[int, int]] = frozenset()
        self._symlink_seen = threading.Event()
        self._storm = threading.Event()
        # Observers: created as the scans meet the root folders, guarded by _observers_lock
        # (taken before either observer's own lock and before the state lock).
        self._observers_lock = threading.Lock()
        self._inotify: InotifyObserver | None = None
        self._polling: PollingObserver | None = None
        self._inotify_refused: str | None = None  # why inotify is not used any more
        self._polling_stopped: str | None = None
        self._kinds: dict[str, ObserverKind] = {}  # root folder -> how it is watched
        self._tops: dict[str, FolderRef] = {}  # root folder -> where it is
        self._trouble: list[tuple[str, str]] = []  # (root, why) not watched; under state.lock
        self._lost: str | None = None  # why events were lost; under state.lock
        self._capped_said: set[tuple[str, str]] = set()
        # Storm rescans: at most one per storm_rescan_seconds; a storm meanwhile defers it.
        self._storm_reason: str | None = None
        self._new_pins = False  # a new symlink was seen: settled folders wait for the rescan
        self._storm_said = False
        self._next_storm_rescan = 0.0
        # Rescans skip re-parsing files that have not changed, and kept files are read in full
        # once: in the persistent scan cache (sweeper.scan_cache), shared with one-shot sweeps,
        # or, with scan_cache off, in memory.
        store = (
            PersistentCache(scan_cache.path_for(self.settings.ledger))
            if self.settings.scan_cache
            else None
        )
        self._cache: ScanCache | PersistentCache = store if store is not None else ScanCache()
        self._verifier = Verifier(store=store)
        # Files' contents are read in a worker process of its own, under an address-space
        # limit: a hostile file costs that worker, never the daemon, and is refused.
        self._reader = FileReader(self.settings.classify_memory_limit, self._should_stop)
        # What `sweeper status` and the metrics say (see _publish_status).
        self._counters = Counters()  # seeded from the ledger once the instance lock is held
        self._started = time.time()
        self._process_start = process_start_time(os.getpid()) or 0
        self._phase = "catch-up"
        self._why_polled: dict[str, str] = {}  # root -> why it is polled; under _observers_lock
        self._state_written: tuple[object, float] | None = None
        self._state_file_said = False
        self._state_files = _StateFiles(self._write_state)
        # Disk pressure (the disk-space thread only, once it runs): when free space was last
        # measured, after which event count, and when a filesystem still under pressure may be
        # swept again.
        self._next_space_check = 0.0
        self._events_measured = 0
        self._next_pressure_sweep = 0.0
        self._space_thread = threading.Thread(target=self._watch_space, name="disk-space")
        self._space_thread.daemon = True

    # -- signals -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def stop(signum: int, frame: FrameType | None) -> None:
            del frame
            self._stop.set(signal.Signals(signum).name)

        def reload(signum: int, frame: FrameType | None) -> None:
            del signum, frame
            self._reload.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)
        signal.signal(signal.SIGIO, signal.SIG_IGN)  # the writer probe's lease, see inventory

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> int:
        with acquire_instance_lock(self.settings.ledger):
            self._lower_priority()
            self._counters = seeded_from(str(self.settings.ledger), _warn)
            remove_stale_temps(status_path_for(self.settings.ledger))  # a killed write's
            errors = _LastError(self._state)
            logging.getLogger("sweeper").addHandler(errors)
            self._start_observers()
            self._check_space(time.monotonic())  # a disk already filling: the catch-up knows
            self._space_thread.start()
            log.info("catch-up sweep of %s", ", ".join(self.settings.roots))
            self._publish_status(force=True)
            # Files already there at start are judged by completeness alone (end record, no
            # writer); from now on a file must also have been quiet for settle_seconds.  Its
            # walk starts the watching, each folder before it is listed.
            began, before = time.monotonic(), self._counters.totals()
            self._full_sweep(settle=False)
            self._say_caught_up(time.monotonic() - began, before)
            for index in range(self.settings.workers):
                worker = threading.Thread(target=self._work, name=f"worker-{index}", daemon=True)
                worker.start()
                self._workers.append(worker)
            if not self._stop():
                self._notifier.ready()
            self._check_observers()  # what the catch-up found unwatchable is polled from now on
            self._phase = "watching"
            self._publish_status(force=True)
            self._say_watching()
            self._loop()
            self._notifier.stopping()
            log.info("stopping (%s)", self._stop.signal_name or "request")
            self._stop_observers()
            self._space_thread.join(timeout=30)
            for worker in self._workers:
                worker.join(timeout=30)
            self._reader.close()
            self._phase = "stopped"
            self._state_files.close(self.status())  # not _publish_status: STOPPING=1 stays last
            logging.getLogger("sweeper").removeHandler(errors)
        return 0

    def _say_caught_up(self, seconds: float, before: Totals) -> None:
        """One line for what the catch-up sweep did, from the records it appended."""
        after = self._counters.totals()
        reclaimed = after.reclaimed_bytes - before.reclaimed_bytes
        log.info(
            "catch-up sweep done in %.1f s: %d files acted on, %d failed; reclaimed %s",
            seconds,
            after.acted_on - before.acted_on,
            after.failures - before.failures,
            report.human_size(reclaimed),
        )

    def _lower_priority(self) -> None:
        current = os.nice(0)
        if self.settings.nice > current:
            try:
                os.nice(self.settings.nice - current)
            except OSError as error:  # e.g. a seccomp filter without setpriority
                log.warning("cannot lower the CPU priority: %s", error.strerror)
        if not lower_io_priority():
            log.debug("could not lower the I/O priority")

    def _loop(self) -> None:
        next_rescan = time.monotonic() + self.settings.rescan_seconds
        interval = self._notifier.watchdog_interval_seconds
        next_ping = time.monotonic()
        while not self._stop():
            if self._reload.is_set():
                self._reload.clear()
                self._reload_config()
            now = time.monotonic()
            self._check_observers()
            if now >= next_rescan:
                if self._enqueue(_FULL_SWEEP):
                    self._storm_reason = None  # the periodic rescan covers the storm too
                    self._new_pins = False
                next_rescan = now + self.settings.rescan_seconds
            self._storm_rescan(now)
            if not self._new_pins:
                self._promote_settled(now)
            if interval is not None and now >= next_ping:
                if self._making_progress(now, interval):
                    self._notifier.watchdog()
                next_ping = now + interval
            self._publish_status()
            due = next_ping if interval is not None else None
            self._stop.wait(self._until_next_due(time.monotonic(), due))

    def _storm_rescan(self, now: float) -> None:
        """Events that call for a full rescan — more changed files than ``queue_size``, events
        lost by the kernel, a new symlink (it may pin a file in any folder) — get one at once,
        but at most one per ``storm_rescan_seconds``, so a user who storms without end cannot
        keep the daemon rescanning back to back.  Another such event meanwhile defers the
        rescan to the end of that interval, never drops it; while the rescan that learns of new
        symlinks waits, so do the settled folders (their pins may have changed)."""
        reason = self._storm_reason
        if self._storm.is_set():
            self._storm.clear()
            reason = f"more than {self.settings.queue_size} changed files at once"
        with self._state.lock:
            lost, self._lost = self._lost, None
        reason = lost or reason
        if self._symlink_seen.is_set():
            self._symlink_seen.clear()
            self._new_pins = True
            reason = reason or "new symlinks, which may pin files in any folder"
        self._storm_reason = reason
        if reason is None:
            return
        if now >= self._next_storm_rescan:
            if self._enqueue(_FULL_SWEEP):
                if self._new_pins and reason.startswith("new symlinks"):
                    log.info("%s; rescanning every root", reason)
                else:
                    log.warning("event storm: %s; rescanning every root", reason)
                self._storm_reason = None
                self._new_pins = False
                self._storm_said = False
                self._next_storm_rescan = now + self.settings.storm_rescan_seconds
        elif not self._storm_said:
            self._storm_said = True
            log.warning(
                "event storm: %s; rescanning every root in %.0f s (storm_rescan_seconds)",
                reason,
                self._next_storm_rescan - now,
            )

    def _watch_space(self) -> None:
        """The disk-space thread: statvfs may hang on a network filesystem, and must never hold
        up the main loop, which pings the watchdog."""
        while not self._stop.wait(_TICK_SECONDS):
            try:
                self._check_space(time.monotonic())
            except Exception:  # never let the thread die silently
                log.exception("measuring free space failed")

    def _check_space(self, now: float) -> None:
        """Measure the free space of every root's filesystem (every few seconds, and at the
        next tick after events) and move each in or out of disk pressure.  Entering pressure
        queues a full sweep at once, which plans at the harder pace on that filesystem; while it
        stays under pressure and a sweep has not brought it back, another follows at most once
        per ``storm_rescan_seconds`` (each one frees only what is still needed)."""
        with self._state.lock:
            events = self._state.events
        if now < self._next_space_check and events == self._events_measured:
            return
        self._next_space_check = now + _SPACE_SECONDS
        self._events_measured = events
        rules = self.settings.pressure
        with self._observers_lock:
            tops = sorted(self._tops)
        measured: dict[int, tuple[Space, str]] = {}
        for root in tops or self.settings.roots:
            for space in measure_roots([root]):
                measured.setdefault(space.dev, (space, root))
        with self._state.lock:
            before = self._state.pressured
        pressured = set()
        entered = False
        for dev, (space, _) in measured.items():
            was = dev in before
            if under_pressure(space, rules, active=was):
                pressured.add(dev)
                if not was:
                    entered = True
                    log.warning(
                        "disk pressure on %s: %s free of %s, below pressure.free_below (%s); "
                        "sweeping its roots with keep_full=%d until %s free",
                        space.filesystem,
                        report.human_size(space.free_bytes),
                        report.human_size(space.total_bytes),
                        rules.free_below.text,
                        rules.keep_full,
                        report.human_size(rules.target_bytes(space.total_bytes)),
                    )
            elif was:
                log.warning(
                    "disk pressure over on %s: %s free of %s, at pressure.free_target (%s)",
                    space.filesystem,
                    report.human_size(space.free_bytes),
                    report.human_size(space.total_bytes),
                    rules.free_target.text,
                )
        with self._state.lock:
            self._state.spaces = measured
            self._state.pressured = frozenset(pressured)
        if not pressured or self._phase == "catch-up":
            return  # the catch-up sweep is at the harder pace already where it must be
        if (entered or now >= self._next_pressure_sweep) and self._enqueue(_FULL_SWEEP):
            self._next_pressure_sweep = now + self.settings.storm_rescan_seconds

    def _pressure_now(self) -> tuple[Pressure, ...]:
        """The filesystems under disk pressure, measured again now: a plan frees only what is
        still needed."""
        with self._state.lock:
            pressured = [self._state.spaces[dev] for dev in sorted(self._state.pressured)]
        rules = self.settings.pressure
        found = []
        for space, root in pressured:
            try:
                fresh = dataclasses.replace(measure(root, named=False), filesystem=space.filesystem)
            except OSError:
                continue  # no root there now: nothing there to sweep either
            if fresh.dev == space.dev:
                found.append(Pressure(fresh, bytes_needed(fresh, rules), rules.keep_full))
        return tuple(found)

    def _until_next_due(self, now: float, ping: float | None = None) -> float:
        """Sleep until the next settling file or ping is due (so latency is settle_seconds, not
        settle plus a tick), but at most a tick: signals, reloads and observers' health are
        checked that often."""
        settle = self.settings.settle_seconds
        with self._state.lock:
            due = min((p.last_event + settle for p in self._state.pending.values()), default=None)
        if ping is not None:
            due = ping if due is None else min(due, ping)
        if due is None:
            return _TICK_SECONDS
        return min(_TICK_SECONDS, max(0.01, due - now))

    def _making_progress(self, now: float, interval: float) -> bool:
        with self._state.lock:
            idle = self._state.busy == 0
            return idle or now - self._state.heartbeat < 2 * interval

    def _promote_settled(self, now: float) -> None:
        """Queue the folder of every path quiet for settle_seconds (no event, no mtime change)."""
        settle = self.settings.settle_seconds
        with self._state.lock:
            candidates = [
                (p, e) for p, e in self._state.pending.items() if now - e.last_event >= settle
            ]
        for path, pending in candidates:
            try:
                age = time.time() - os.stat(path, follow_symlinks=False).st_mtime
            except OSError:
                age = settle  # gone or renamed: its folder still deserves a look
            with self._state.lock:
                if self._state.pending.get(path) is not pending:
                    continue  # a newer event arrived meanwhile
                if age < settle:
                    pending.last_event = now - age  # eligible once the mtime is settled
                    continue
                del self._state.pending[path]
            self._enqueue(pending.folder)

    def _enqueue(self, item: str) -> bool:
        """Queue ``item`` unless it is queued already; False when the queue is full."""
        with self._state.lock:
            if item in self._state.queued:
                return True
            self._state.queued.add(item)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._state.lock:
                self._state.queued.discard(item)
            if item != _FULL_SWEEP:
                log.warning("work queue full; %s left to the next rescan", item)
            return False
        return True

    _last_status = ""

    def status(self) -> DaemonStatus:
        """What the daemon is doing now, as ``sweeper status`` shows it."""
        totals = self._counters.totals()
        today_files, today_bytes = totals.day(datetime.now(timezone.utc))
        with self._observers_lock:
            polled = tuple(
                (root, self._why_polled.get(root, "polled"))
                for root, kind in sorted(self._kinds.items())
                if kind is ObserverKind.polling
            )
        with self._state.lock:
            scan = self._state.last_scan
            error = self._state.last_error
            return DaemonStatus(
                pid=os.getpid(),
                process_start=self._process_start,
                started=self._started,
                updated=time.time(),
                phase=self._phase,
                working_on=tuple(sorted(self._state.working_on.values())),
                queued=self._queue.qsize(),
                settling=len(self._state.pending),
                last_full_scan=scan[0] if scan else None,
                last_full_scan_seconds=scan[1] if scan else None,
                today_files=today_files,
                today_bytes=today_bytes,
                total_files=totals.acted_on,
                total_bytes=totals.reclaimed_bytes,
                failed=totals.failures,
                last_error=error[1] if error else None,
                last_error_time=error[0] if error else None,
                polled=polled,
                not_acting=self._state.ledger_problem,
                filesystems=tuple(
                    sorted(
                        (
                            space.filesystem,
                            space.free_bytes,
                            space.total_bytes,
                            dev in self._state.pressured,
                        )
                        for dev, (space, _) in self._state.spaces.items()
                    )
                ),
            )

    def _publish_status(self, force: bool = False) -> None:
        """The notify STATUS= line, and the status and metrics files, when they change."""
        status = self.status()
        text = report.status_line(status)
        if force or text != self._last_status:
            self._last_status = text
            self._notifier.status(text)
        self._write_state_files(status, force)

    def _write_state_files(self, status: DaemonStatus, force: bool) -> None:
        """Have the status (and metrics) files rewritten when what they say changed, at most
        once a second, and once a minute anyway."""
        now = time.monotonic()
        what = dataclasses.replace(status, updated=0.0)
        if not force and self._state_written is not None:
            before, when = self._state_written
            if now - when < (_STATE_FILE_HEARTBEAT if what == before else _STATE_FILE_SECONDS):
                return
        self._state_written = (what, now)
        self._state_files.offer(status)

    def _write_state(self, status: DaemonStatus) -> None:
        """Write the status file, and the metrics file when asked for (on _StateFiles's
        thread); a failure is said once and never stops the daemon."""
        try:
            write_status(self.settings.ledger, status)
            if self.settings.metrics_file is not None:
                write_metrics(self.settings.metrics_file, self._metrics(status))
        except OSError as error:
            if not self._state_file_said:
                self._state_file_said = True
                log.warning("cannot write the status or metrics file: %s", error)
            return
        self._state_file_said = False

    def _metrics(self, status: DaemonStatus) -> Snapshot:
        with self._state.lock:
            reclaimable = dict(self._state.reclaimable) if self._state.reclaimable else None
            errors = dict(self._state.errors)
        return Snapshot(
            totals=self._counters.totals(),
            version=__version__,
            reclaimable=reclaimable,
            last_sweep=status.last_full_scan,
            last_sweep_seconds=status.last_full_scan_seconds,
            queue_length=status.queued,
            errors={"ledger": 0, "scan": 0, **errors},
            filesystems=tuple((name, free, active) for name, free, _, active in status.filesystems),
        )

    # -- configuration -------------------------------------------------------------------------

    def _reload_config(self) -> None:
        try:
            settings = load_settings(self._config_path, self._overrides, roots=self._roots)
        except ConfigError as error:
            log.error("reload refused, keeping the running configuration: %s", error)
            return
        self._notifier.reloading(time.monotonic_ns() // 1000)
        if settings.ledger != self.settings.ledger:
            log.warning("ledger path changes need a restart; keeping %s", self.settings.ledger)
            settings = _with_ledger(settings, self.settings.ledger)
        if settings.classify_memory_limit != self.settings.classify_memory_limit:
            self._reader.set_memory_limit(settings.classify_memory_limit)
            if isinstance(self._cache, ScanCache):  # (the persistent one keeps no refusals)
                self._cache = ScanCache()  # what the old limit refused is read again
        self.settings = settings
        self._stop_observers()
        self._start_observers()
        self._enqueue(_FULL_SWEEP)
        self._notifier.ready()
        log.info("configuration reloaded")

    # -- observers -------------------------------------------------------------------------------

    def _start_observers(self) -> None:
        """Fresh observer state; the observers themselves start as the next scan meets each
        root folder (see :meth:`_opened`)."""
        self._handler = _EventHandler(
            self._state,
            lambda: self.settings.patterns,
            self._symlink_seen,
            lambda: self.settings.queue_size,
            self._storm,
            self._events_lost,
            self._not_watched,
        )
        with self._observers_lock:
            self._inotify = None
            self._polling = None
            self._inotify_refused = None
            self._polling_stopped = None
            self._kinds = {}
            self._tops = {}
            self._why_polled = {}
        with self._state.lock:
            self._trouble = []  # the stopped observers' troubles are not the new ones'
            self._lost = None

    def _limits(self) -> WalkLimits:
        return WalkLimits(self.settings.max_depth, self.settings.max_folder_entries)

    def _opened(self, top: FolderRef, folder: FolderRef, fd: int) -> None:
        """Called by a full scan's walk for each folder, open as ``fd``, before it is listed:
        each root folder is given its observer the first time it is met, and every folder of
        an inotify root gets its watch (a no-op when it has one), so each rescan also repairs
        the watching."""
        if self._stop():
            return  # the observers are stopping, or stopped: start none again
        with self._observers_lock:
            kind = self._kinds.get(top.display)
            if kind is None or folder == top:
                if kind is None:
                    kind = self._kinds[top.display] = self._observer_for(top)
                self._tops[top.display] = top
            if kind is ObserverKind.inotify and self._inotify is not None:
                self._inotify.watch(top, folder, fd)
            polling = self._polling_observer() if kind is ObserverKind.polling else None
        if polling is not None and folder == top:
            polling.add(top)

    def _observer_for(self, top: FolderRef) -> ObserverKind:
        """How to watch a root folder met for the first time (under ``_observers_lock``)."""
        kind = self.settings.observer
        if kind is ObserverKind.auto:
            fstype = filesystem_type(top.display)
            if wants_polling(fstype):
                log.info(
                    "%s is on %s (no events from other hosts): polling it", top.display, fstype
                )
                self._why_polled[top.display] = f"on {fstype}: no events from other hosts"
                return ObserverKind.polling
            kind = ObserverKind.inotify
        if kind is ObserverKind.polling:
            self._why_polled[top.display] = "observer: polling in the configuration"
            return kind
        if self._inotify is None and self._inotify_refused is None:
            try:
                self._inotify = InotifyObserver(self._handler, self._limits())
            except (OSError, RuntimeError) as error:  # EMFILE: the per-user instance limit
                reason = error.strerror if isinstance(error, OSError) else str(error)
                self._inotify_refused = f"inotify is unavailable ({reason})"
                log.warning("%s; polling every root instead", self._inotify_refused)
        if self._inotify is None:
            self._why_polled[top.display] = self._inotify_refused or "inotify is unavailable"
            return ObserverKind.polling
        return ObserverKind.inotify

    def _polling_observer(self) -> PollingObserver | None:
        if self._polling is None and self._polling_stopped is None:
            interval = max(1.0, self.settings.settle_seconds / 2)
            self._polling = PollingObserver(self._handler, self._limits(), interval)
        return self._polling

    def _events_lost(self, reason: str) -> None:
        with self._state.lock:
            self._lost = reason

    def _not_watched(self, root: str, reason: str) -> None:
        with self._state.lock:
            self._trouble.append((root, reason))

    def _check_observers(self) -> None:
        """Every way an observer can stop serving a root is met the same way: say so, poll that
        root from now on, and rescan at once (what happened meanwhile went unseen)."""
        with self._state.lock:
            trouble, self._trouble = self._trouble, []
        with self._observers_lock:
            inotify, polling = self._inotify, self._polling
        if inotify is not None and inotify.failure is not None:
            reason = f"the inotify observer failed: {inotify.failure}"
            with self._observers_lock:
                self._inotify = None
                self._inotify_refused = reason
                roots = [r for r, kind in self._kinds.items() if kind is ObserverKind.inotify]
            inotify.stop()
            trouble += [(root, reason) for root in roots]
        if polling is not None and polling.failure is not None:
            with self._observers_lock:
                self._polling = None
                self._polling_stopped = polling.failure
            log.error(
                "the polling observer failed: %s; the roots it polled are only rescanned, "
                "every rescan_seconds",
                polling.failure,
            )
            self._enqueue(_FULL_SWEEP)
        if not trouble:
            return
        for root, reason in trouble:
            log.warning("%s: %s; polling it instead, and rescanning", root, reason)
            with self._observers_lock:
                self._kinds[root] = ObserverKind.polling
                self._why_polled[root] = reason
                top = self._tops.get(root)
                poller = self._polling_observer()
            if top is not None and poller is not None:
                poller.add(top)
        self._enqueue(_FULL_SWEEP)

    def _say_watching(self) -> None:
        with self._observers_lock:
            kinds = list(self._kinds.values())
            watches = self._inotify.watch_count() if self._inotify is not None else 0
        polled = sum(1 for kind in kinds if kind is ObserverKind.polling)
        log.info(
            "watching %d folder%s: %d by inotify (%d watches), %d by polling",
            len(kinds),
            "" if len(kinds) == 1 else "s",
            len(kinds) - polled,
            watches,
            polled,
        )

    def _capped(self, path: str, reason: str) -> None:
        """A folder the walks leave out: said once, not on every rescan."""
        if (path, reason) not in self._capped_said and len(self._capped_said) < 10_000:
            self._capped_said.add((path, reason))
            log.warning("%s: %s", path, reason)

    def _stop_observers(self) -> None:
        """Stop both observers; whatever state they are in, this never raises."""
        with self._observers_lock:
            observers = [self._inotify, self._polling]
            self._inotify = None
            self._polling = None
        for observer in observers:
            if observer is None:
                continue
            try:
                observer.stop()
            except Exception:
                log.exception("stopping an observer failed")

    # -- work ----------------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        """Polled by the executor between files and copy chunks: also the progress heartbeat."""
        with self._state.lock:
            self._state.heartbeat = time.monotonic()
        return self._stop()

    def _work(self) -> None:
        while not self._stop():
            try:
                item = self._queue.get(timeout=_TICK_SECONDS)
            except queue.Empty:
                continue
            name = threading.current_thread().name
            with self._state.lock:
                self._state.queued.discard(item)
                self._state.busy += 1
                self._state.heartbeat = time.monotonic()
                self._state.working_on[name] = "every root" if item == _FULL_SWEEP else item
            try:
                if item == _FULL_SWEEP:
                    self._full_sweep()
                else:
                    self._sweep_folder(item)
            except Exception:
                log.exception("unexpected error while sweeping %s", item)
            finally:
                with self._state.lock:
                    self._state.busy -= 1
                    self._state.working_on.pop(name, None)

    def _full_sweep(self, *, settle: bool = True) -> None:
        settings = self.settings
        began = time.monotonic()

        def inventory() -> Inventory:
            found = scan(
                settings.roots,
                settings.patterns,
                cache=self._cache,
                should_stop=self._should_stop,  # once per folder: the heartbeat of a long walk
                limits=self._limits(),
                opened=self._opened,
                capped=self._capped,
                reader=self._reader,
            )
            self._symlink_targets = found.symlink_targets  # pins for the single-folder scans
            return found

        if self._act(inventory, exclusive=True, settle=settle):
            with self._state.lock:
                self._state.last_scan = (time.time(), time.monotonic() - began)

    def _sweep_folder(self, folder: str) -> None:
        settings = self.settings
        targets = self._symlink_targets
        self._act(
            lambda: scan_folder(
                settings.roots,
                settings.patterns,
                folder,
                targets,
                self._cache,
                limits=self._limits(),
                reader=self._reader,
            ),
            exclusive=False,
        )

    def _act(
        self, inventory: Callable[[], Inventory], *, exclusive: bool, settle: bool = True
    ) -> bool:
        """Scan, plan and act; True when it got as far as acting (or finding nothing to do)."""
        settings = self.settings
        # Waiting for a one-shot sweep to release the lock is not being stuck: _should_stop
        # keeps the watchdog heartbeat going while the wait lasts (it may outlast WatchdogSec).
        lock = action_lock(settings.ledger, exclusive=exclusive, should_stop=self._should_stop)
        with lock as locked:
            if not locked:
                return False
            run_id = uuid.uuid4().hex[:12]
            ledger = CountingSink(AppendEach(str(settings.ledger)), self._counters)
            try:
                check_writable(settings.ledger)
                if exclusive:  # no other run is half-way: every marker is a dead run's
                    before_acting(
                        str(settings.ledger),
                        ledger,
                        run_id=run_id,
                        max_bytes=settings.ledger_max_bytes,
                        segments=settings.ledger_segments,
                    )
                    tidy_all(settings.roots)  # ... and every half-made trash entry
            except LedgerUnavailable as error:
                self._ledger_trouble(str(error))
                return False
            rules = settings.rules(settle=settle)
            now_ns = time.time_ns()
            found = self._verified(inventory(), rules, now_ns)
            pressure = self._pressure_now()  # after the scan, which may have taken long
            harder = settings.rules(settle=settle, pressure=True)
            if pressure:
                found = self._verified(found, harder, now_ns, {p.space.dev for p in pressure})
            # The trash is purged by full sweeps (they hold the action lock exclusively).
            held, refused = list_held(settings.roots) if exclusive else ([], [])
            planned = plan_all(
                found,
                rules,
                harder,
                pressure,
                held,
                now_ns=now_ns,
                undo_seconds=settings.undo_seconds,
                refused=refused,
            )
            for path, reason in refused:  # nothing is purged from it: exit 1, as for a bad file
                log.error("%s: %s", path, reason)
            plan = check_plan(planned)
            for path, reason in plan.problems:
                log.warning("%s: %s", path, reason)
            self._count_error("scan", len(plan.problems))
            self._note_skipped(plan)
            result = execute_plan(
                plan,
                ledger,
                run_id=run_id,
                should_stop=self._should_stop,
                journal=Journal(str(settings.ledger), run_id),
            )
        if result.ledger_error is not None:
            self._ledger_trouble(result.ledger_error)
        elif result.outcomes:  # records were written: the ledger works again
            self._ledger_trouble(None)
        if exclusive:
            left = reclaimable_left(settings.roots, plan.entries, result.outcomes)
            with self._state.lock:
                self._state.reclaimable = left
        return True

    def _count_error(self, kind: str, count: int = 1) -> None:
        if count:
            with self._state.lock:
                self._state.errors[kind] = self._state.errors.get(kind, 0) + count

    def _verified(
        self, inventory: Inventory, rules: Rules, now_ns: int, devices: set[int] | None = None
    ) -> Inventory:
        """``verify_inventory`` (of the run folders on ``devices`` only, when given), with the
        heartbeat going between run folders."""
        runs = []
        for run in inventory.runs:
            self._should_stop()
            if devices is not None and run.folder.dev not in devices:
                runs.append(run)
                continue
            runs.append(verify_run(run, rules, now_ns=now_ns, verifier=self._verifier))
        return dataclasses.replace(inventory, runs=tuple(runs))

    def _ledger_trouble(self, problem: str | None) -> None:
        """Say once (not on every scan) that the ledger stopped or started taking records again;
        the daemon stays up and acts again as soon as it does."""
        with self._state.lock:
            before, self._state.ledger_problem = self._state.ledger_problem, problem
        if problem is not None and problem != before:
            self._count_error("ledger")
            log.error("%s; retrying at every scan", problem)
        elif problem is None and before is not None:
            log.warning("the ledger takes records again; acting again")

    def _note_skipped(self, plan: SweepPlan) -> None:
        """Say why files were left alone, and look again at those still settling."""
        now = time.monotonic()
        for entry in plan.entries:
            if entry.action is not Action.SKIP or entry.reason in _QUIET_SKIPS:
                continue
            if entry.reason.startswith(_UNSETTLED):
                with self._state.lock:
                    self._state.pending.setdefault(entry.path, _Pending(now, entry.folder.display))
            else:
                log.info("%s: %s", entry.path, entry.reason)


def _warn(message: str) -> None:
    log.warning("%s", message)


def _with_ledger(settings: Settings, ledger: Path) -> Settings:
    return dataclasses.replace(settings, ledger=ledger)
