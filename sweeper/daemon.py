"""``sweeper watch``: the daemon.  Events say "look here"; the sweep's planner and executor act.

Threads: the main thread owns signals, the observers, the settle bookkeeping, rescans and the
systemd notifications; worker threads take folders (or a full rescan) from one bounded,
deduplicated queue and run scan -> plan -> execute on them under the action lock, exactly as
``sweeper sweep`` does.  Nothing imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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
from pathlib import Path
from types import FrameType

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyObserver
from watchdog.observers.polling import PollingObserver

from sweeper.config import ObserverKind, Settings, load_settings
from sweeper.errors import ConfigError, LedgerUnavailable
from sweeper.execute import SweepReport, execute_plan
from sweeper.extract import is_sweeper_output, is_sweeper_temp
from sweeper.intact import Verifier, verify_inventory
from sweeper.inventory import FileReader, Inventory, ScanCache, expand_root, scan, scan_folder
from sweeper.ledger import AppendEach, acquire_instance_lock, action_lock, check_writable
from sweeper.notify import Notifier
from sweeper.plan import SweepPlan, plan_sweep
from sweeper.policy import Action
from sweeper.signals import StopFlag

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
_FULL_SWEEP = "\0full-sweep"
# What inotify is asked for: writes finished, files appearing or renamed into place, and
# folders coming and going.  Not opens, plain closes or each write: sweeper's own reads would
# otherwise flood the observer on every rescan.
_INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]
_UNSETTLED = "skipped: changed "  # policy's words for a file not yet quiet for settle_seconds
_QUIET_SKIPS = frozenset(
    [
        "skipped: sweeper's own output",
        "skipped: already an inference checkpoint",
        "skipped: already bare weights",
    ]
)  # queue item: rescan every root (never a valid path)
_TICK_SECONDS = 0.5


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


@dataclass(frozen=True)
class _Watched:
    """A folder being watched, and the watch."""

    observer: BaseObserver
    watch: ObservedWatch

    def ended(self) -> bool:
        """The observer stopped watching: the folder was deleted (or moved away)."""
        return not any(
            emitter.watch == self.watch and emitter.is_alive() for emitter in self.observer.emitters
        )


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
    reclaimed: int = 0
    ledger_problem: str | None = None  # why nothing is being done: the ledger takes no records
    processed: int = 0
    failures: int = 0


class _EventHandler(FileSystemEventHandler):
    """Notes which checkpoint-named paths changed; decides nothing.

    At most ``limit()`` paths are remembered: an event storm (a user's rename loop, a flood of
    files) past that drops them all and asks for one full rescan instead (``storm``), so memory
    stays bounded and nothing is missed."""

    def __init__(
        self,
        state: _State,
        patterns: Callable[[], Sequence[str]],
        symlink_seen: threading.Event,
        limit: Callable[[], int] = lambda: 10_000,
        storm: threading.Event | None = None,
    ) -> None:
        self._state = state
        self._patterns = patterns
        self._symlink_seen = symlink_seen
        self._limit = limit
        self._storm = storm if storm is not None else threading.Event()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        paths = (
            [event.src_path, event.dest_path] if event.event_type == "moved" else [event.src_path]
        )
        for raw in paths:
            path = os.fsdecode(raw) if raw else ""
            if event.event_type in ("created", "moved") and os.path.islink(path):
                self._symlink_seen.set()  # it may pin a file in another folder: full rescan
            name = os.path.basename(path)
            if not name or is_sweeper_temp(name) or is_sweeper_output(name):
                continue
            if not any(fnmatch.fnmatchcase(name, p) for p in self._patterns()):
                continue
            with self._state.lock:
                pending = self._state.pending
                if path not in pending and len(pending) >= self._limit():
                    pending.clear()  # the rescan the storm triggers covers every one of them
                    self._storm.set()
                    continue
                pending[path] = _Pending(time.monotonic(), os.path.dirname(path))


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
        self._observers: list[BaseObserver] = []
        self._watched: dict[str, _Watched] = {}
        self._workers: list[threading.Thread] = []
        self._symlink_targets: frozenset[tuple[int, int]] = frozenset()
        self._symlink_seen = threading.Event()
        self._storm = threading.Event()
        self._cache = ScanCache()  # rescans skip re-parsing files that have not changed
        self._verifier = Verifier()  # kept files are read in full once, not on every rescan
        # Files' contents are read in a worker process of its own, under an address-space
        # limit: a hostile file costs that worker, never the daemon, and is refused.
        self._reader = FileReader(self.settings.classify_memory_limit, self._should_stop)

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
            self._start_observers()
            log.info("catch-up sweep of %s", ", ".join(self.settings.roots))
            # Files already there at start are judged by completeness alone (end record, no
            # writer); from now on a file must also have been quiet for settle_seconds.
            self._full_sweep(settle=False)
            for index in range(self.settings.workers):
                worker = threading.Thread(target=self._work, name=f"worker-{index}", daemon=True)
                worker.start()
                self._workers.append(worker)
            if not self._stop():
                self._notifier.ready()
            self._publish_status(force=True)
            count = len(self._watched)
            log.info("watching %d folder%s", count, "" if count == 1 else "s")
            self._loop()
            self._notifier.stopping()
            log.info("stopping (%s)", self._stop.signal_name or "request")
            self._stop_observers()
            for worker in self._workers:
                worker.join(timeout=30)
            self._reader.close()
        return 0

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
            self._promote_settled(now)
            if self._symlink_seen.is_set():
                self._symlink_seen.clear()
                self._enqueue(_FULL_SWEEP)
            if self._storm.is_set():
                self._storm.clear()
                log.warning(
                    "event storm: more than %d changed files at once; rescanning every root",
                    self.settings.queue_size,
                )
                self._enqueue(_FULL_SWEEP)
            if now >= next_rescan:
                self._enqueue(_FULL_SWEEP)
                self._refresh_watches()
                next_rescan = now + self.settings.rescan_seconds
            if interval is not None and now >= next_ping:
                if self._making_progress(now, interval):
                    self._notifier.watchdog()
                next_ping = now + interval
            self._publish_status()
            self._stop.wait(self._until_next_due(time.monotonic()))

    def _until_next_due(self, now: float) -> float:
        """Sleep until the next settling file is due (so latency is settle_seconds, not settle
        plus a tick), but at most a tick: signals, reloads and pings are checked that often."""
        settle = self.settings.settle_seconds
        with self._state.lock:
            due = min((p.last_event + settle for p in self._state.pending.values()), default=None)
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

    def _enqueue(self, item: str) -> None:
        with self._state.lock:
            if item in self._state.queued:
                return
            self._state.queued.add(item)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._state.lock:
                self._state.queued.discard(item)
            log.warning("work queue full; %s left to the next rescan", item)

    _last_status = ""

    def _publish_status(self, force: bool = False) -> None:
        with self._state.lock:
            text = (
                f"{len(self._state.pending)} settling, {self._queue.qsize()} queued, "
                f"{self._state.busy} working; {self._state.processed} actions, "
                f"{self._state.failures} failed, {self._state.reclaimed} bytes reclaimed"
            )
            if self._state.ledger_problem is not None:
                text = f"NOT ACTING: {self._state.ledger_problem}; {text}"
        if force or text != self._last_status:
            self._last_status = text
            self._notifier.status(text)

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
            self._cache = ScanCache()  # what the old limit refused is read again
        self.settings = settings
        self._stop_observers()
        self._start_observers()
        self._enqueue(_FULL_SWEEP)
        self._notifier.ready()
        log.info("configuration reloaded")

    # -- observers -------------------------------------------------------------------------------

    def _start_observers(self) -> None:
        handler = _EventHandler(
            self._state,
            lambda: self.settings.patterns,
            self._symlink_seen,
            lambda: self.settings.queue_size,
            self._storm,
        )
        self._handler = handler
        self._inotify: BaseObserver | None = None
        self._polling: BaseObserver | None = None
        self._watched = {}
        self._refresh_watches()

    def _refresh_watches(self) -> None:
        """Watch every folder the roots name now (globs may match new folders over time).

        A folder deleted and made again under the same name is a new directory: the observer's
        watch ended with the old one, so the new one is watched afresh."""
        for pattern in self.settings.roots:
            try:
                folders = [f.display for f in expand_root(pattern)]
            except OSError as error:
                log.warning("root %s: %s; the rescan will look again", pattern, error.strerror)
                continue
            for path in folders:
                known = self._watched.get(path)
                if known is not None and not known.ended():
                    continue
                if known is not None:
                    log.info("%s: its watch ended (folder deleted or replaced); rewatching", path)
                    # The observer still holds the ended watch and would not start another one
                    # for the same path.
                    with contextlib.suppress(KeyError):
                        known.observer.unschedule(known.watch)
                self._watch(path)

    def _watch(self, path: str) -> None:
        kind = self.settings.observer
        if kind is ObserverKind.auto:
            fstype = filesystem_type(path)
            if wants_polling(fstype):
                log.info("%s is on %s (no events from other hosts): polling it", path, fstype)
                kind = ObserverKind.polling
            else:
                kind = ObserverKind.inotify
        if kind is ObserverKind.inotify:
            try:
                observer = self._observer(inotify=True)
                watch = observer.schedule(
                    self._handler, path, recursive=True, event_filter=_INOTIFY_EVENTS
                )
                self._watched[path] = _Watched(observer, watch)
                return
            except RuntimeError as error:  # no thread for another watch (a tasks limit)
                log.warning("cannot watch %s: %s; the rescan covers it", path, error)
                return
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EMFILE):
                    log.warning("cannot watch %s: %s; the rescan covers it", path, error)
                    return
                log.warning(
                    "inotify watch limit exhausted (fs.inotify.max_user_watches); polling %s", path
                )
        try:
            observer = self._observer(inotify=False)
            watch = observer.schedule(self._handler, path, recursive=True)
        except (OSError, RuntimeError) as error:
            log.warning("cannot poll %s: %s; the rescan covers it", path, error)
            return
        self._watched[path] = _Watched(observer, watch)

    def _observer(self, *, inotify: bool) -> BaseObserver:
        if inotify:
            if self._inotify is None:
                self._inotify = InotifyObserver()
                self._inotify.start()
                self._observers.append(self._inotify)
            return self._inotify
        if self._polling is None:
            self._polling = PollingObserver(timeout=max(1.0, self.settings.settle_seconds / 2))
            self._polling.start()
            self._observers.append(self._polling)
        return self._polling

    def _stop_observers(self) -> None:
        for observer in self._observers:
            observer.stop()
        for observer in self._observers:
            observer.join(timeout=10)
        self._observers = []

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
            with self._state.lock:
                self._state.queued.discard(item)
                self._state.busy += 1
                self._state.heartbeat = time.monotonic()
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

    def _full_sweep(self, *, settle: bool = True) -> None:
        settings = self.settings

        def inventory() -> Inventory:
            found = scan(settings.roots, settings.patterns, cache=self._cache, reader=self._reader)
            self._symlink_targets = found.symlink_targets  # pins for the single-folder scans
            return found

        self._act(inventory, exclusive=True, settle=settle)

    def _sweep_folder(self, folder: str) -> None:
        settings = self.settings
        targets = self._symlink_targets
        self._act(
            lambda: scan_folder(
                settings.roots, settings.patterns, folder, targets, self._cache, self._reader
            ),
            exclusive=False,
        )

    def _act(
        self, inventory: Callable[[], Inventory], *, exclusive: bool, settle: bool = True
    ) -> None:
        settings = self.settings
        # Waiting for a one-shot sweep to release the lock is not being stuck: _should_stop
        # keeps the watchdog heartbeat going while the wait lasts (it may outlast WatchdogSec).
        lock = action_lock(settings.ledger, exclusive=exclusive, should_stop=self._should_stop)
        with lock as locked:
            if not locked:
                return
            try:
                check_writable(settings.ledger)
            except LedgerUnavailable as error:
                self._ledger_trouble(str(error))
                return
            rules = settings.rules(settle=settle)
            now_ns = time.time_ns()
            found = verify_inventory(inventory(), rules, now_ns=now_ns, verifier=self._verifier)
            plan = plan_sweep(found, rules, now_ns=now_ns)
            for path, reason in plan.problems:
                log.warning("%s: %s", path, reason)
            self._note_skipped(plan)
            result = execute_plan(
                plan,
                AppendEach(str(settings.ledger)),
                run_id=uuid.uuid4().hex[:12],
                should_stop=self._should_stop,
            )
        if result.ledger_error is not None:
            self._ledger_trouble(result.ledger_error)
        elif result.outcomes:  # records were written: the ledger works again
            self._ledger_trouble(None)
        self._account(result)

    def _ledger_trouble(self, problem: str | None) -> None:
        """Say once (not on every scan) that the ledger stopped or started taking records again;
        the daemon stays up and acts again as soon as it does."""
        with self._state.lock:
            before, self._state.ledger_problem = self._state.ledger_problem, problem
        if problem is not None and problem != before:
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

    def _account(self, result: SweepReport) -> None:
        with self._state.lock:
            self._state.reclaimed += result.reclaimed_bytes
            self._state.processed += len(result.outcomes)
            self._state.failures += result.failures


def _with_ledger(settings: Settings, ledger: Path) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, ledger=ledger)
