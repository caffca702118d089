"""How the daemon learns that files changed: inotify, or polling where inotify cannot serve.

Observers tell a :class:`Sink` what changed and decide nothing.  Both walk with the scan's own
:func:`~sweeper.inventory.walk_folders`: the same safety (O_NOFOLLOW, one filesystem, one mount),
the same depth and entry limits, one open per folder.  Both say when they cannot do their job —
a watch the kernel refuses, a queue that overflowed, a thread that died — instead of going quiet:
events that are silently missing look exactly like a quiet tree.

inotify watches are not recursive, so :class:`InotifyObserver` keeps one watch per folder.  The
daemon's full scans add them (the walk hands each folder's descriptor to :meth:`watch` before
listing it, so nothing created after the listing goes unseen); the reader thread adds the
folders created or moved in between, and drops the ones that leave.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sweeper.errors import FileRefused
from sweeper.inventory import FolderRef, WalkLimits, mount_id, open_folder, walk_folders

log = logging.getLogger(__name__)

# inotify(7)
_IN_CLOSE_WRITE = 0x0000_0008
_IN_MOVED_FROM = 0x0000_0040
_IN_MOVED_TO = 0x0000_0080
_IN_CREATE = 0x0000_0100
_IN_DELETE_SELF = 0x0000_0400
_IN_MOVE_SELF = 0x0000_0800
_IN_UNMOUNT = 0x0000_2000
_IN_Q_OVERFLOW = 0x0000_4000
_IN_IGNORED = 0x0000_8000
_IN_ONLYDIR = 0x0100_0000
_IN_DONT_FOLLOW = 0x0200_0000
_IN_EXCL_UNLINK = 0x0400_0000
_IN_ISDIR = 0x4000_0000
# Writes finished, names appearing or leaving, and the folder itself going: not opens, reads or
# each write, or sweeper's own reads would flood the queue on every rescan.
_MASK = (
    _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
    | _IN_EXCL_UNLINK
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_BYTES = 256 * 1024
# File times are coarser than time.time_ns(), and on a network filesystem the server's clock
# sets them: a file a little older than ``add`` is reported too (it is only looked at).
_CLOCK_SLACK_NS = 5_000_000_000

WATCH_LIMIT = (
    "the inotify watch limit is reached (sysctl fs.inotify.max_user_watches, or "
    "user.max_inotify_watches in a user namespace)"
)


class Sink(Protocol):
    """Where observers report.  Called from their threads and from the scan's walk."""

    def interesting(self, name: str) -> bool:
        """Whether a file of this name may be a checkpoint (pollers keep state only for those)."""
        ...

    def changed(self, path: str, *, appeared: bool) -> None:
        """A file was created, written and closed, or renamed to or from ``path``
        (``appeared``: the name is new, so it may be a symlink)."""
        ...

    def lost(self, reason: str) -> None:
        """Events were lost: only a rescan can tell what changed."""
        ...

    def failed(self, root: str, reason: str) -> None:
        """The root folder ``root`` is not (fully) watched by this observer any more."""
        ...


class _Libc:
    """The three inotify calls, through ctypes (the standard library has none)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.init1 = libc.inotify_init1
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch = libc.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = libc.inotify_rm_watch
        self.rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self.rm_watch.restype = ctypes.c_int


def _check(result: int) -> int:
    if result < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return result


def _events(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(wd, mask, name) for each event in what one read returned."""
    offset = 0
    while offset + _EVENT.size <= len(data):
        wd, mask, _, length = _EVENT.unpack_from(data, offset)
        start = offset + _EVENT.size
        yield wd, mask, data[start : start + length].rstrip(b"\0")
        offset = start + length


@dataclass
class _Folder:
    """A watched folder: its root folder, where it is, and the watched folders inside it."""

    root: str
    ref: FolderRef
    depth: int  # levels below the root folder
    children: dict[str, int] = field(default_factory=dict)  # name -> wd


@dataclass
class _Root:
    top: FolderRef
    mount: int | None
    wd: int | None = None  # the root folder's own watch; None once it ended
    wds: set[int] = field(default_factory=set)
    ended: bool = False


class _OtherMount(Exception):
    """A folder that moved in from another mount: not followed."""


class _Refused(Exception):
    """The kernel refused a watch (the limit, most often)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror)
        self.error = error


class InotifyObserver:
    """One inotify instance, one reader thread, one watch per folder of every root it serves.

    A root whose folders cannot all be watched (the watch limit, or any other refusal) is given
    up as a whole — its watches removed, so they cannot starve other roots — and reported to
    :meth:`Sink.failed`; so is every root when the reader thread dies.  A queue overflow is
    reported to :meth:`Sink.lost`.
    """

    def __init__(self, sink: Sink, limits: WalkLimits) -> None:
        self._sink = sink
        self._limits = limits
        self._libc = _Libc()
        # Raises OSError (EMFILE: the per-user instance limit): the caller polls instead.
        self._fd = _check(self._libc.init1(os.O_CLOEXEC | os.O_NONBLOCK))
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # Watches are added through /proc/self/fd, so the watch is on the very folder the walk
        # opened, whatever a user renames meanwhile; by path only where /proc is missing.
        self._by_descriptor = os.path.isdir("/proc/self/fd")
        self._lock = threading.Lock()  # the maps below; the reader and the scan share them
        self._folders: dict[int, _Folder] = {}
        self._by_path: dict[str, int] = {}
        self._roots: dict[str, _Root] = {}
        self._given_up: set[str] = set()
        self._stopping = False
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="inotify", daemon=True)
        self._thread.start()

    # -- what the daemon asks ---------------------------------------------------------------

    @property
    def failure(self) -> str | None:
        """Why the reader stopped, once it has stopped on its own (None while it runs)."""
        if self._thread.is_alive() or self._stopping:
            return None
        return self._failure or "its reader thread stopped"

    def roots(self) -> list[str]:
        with self._lock:
            return [root for root in self._roots if root not in self._given_up]

    def watch_count(self) -> int:
        with self._lock:
            return len(self._folders)

    def watch(self, top: FolderRef, folder: FolderRef, fd: int) -> None:
        """Watch ``folder`` (open as ``fd``), a folder the scan walks below the root folder
        ``top``; the walk calls this before listing it.  Safe to repeat on every rescan."""
        with self._lock:
            if top.display in self._given_up or self._stopping:
                return
            root = self._roots.get(top.display)
            if folder == top and (root is None or root.ended or root.top != top):
                if root is not None:
                    log.info(
                        "%s: its watch ended (folder deleted or replaced); rewatching", top.display
                    )
                    self._drop_root_watches(root)
                root = _Root(top, mount_id(fd))
                self._roots[top.display] = root
            if root is None:
                return
            depth = len(folder.components) - len(top.components)
            try:
                self._add(root, folder, depth, fd)
            except _Refused as refused:
                self._give_up(root, refused.error)

    def stop(self) -> None:
        """Stop the reader and close the instance (every watch goes with it).  Never raises."""
        with self._lock:
            self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"!")
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.warning("the inotify reader did not stop within 10 s")
            return  # it still holds the descriptor
        for fd in (self._fd, self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- watches ------------------------------------------------------------------------------

    def _add(self, root: _Root, folder: FolderRef, depth: int, fd: int) -> int | None:
        """Add (or confirm) the watch on ``folder``; :class:`_Refused` when the kernel refuses."""
        if self._by_descriptor:
            target, mask = f"/proc/self/fd/{fd}", _MASK
        else:
            target, mask = folder.display, _MASK | _IN_DONT_FOLLOW
        try:
            wd = _check(self._libc.add_watch(self._fd, os.fsencode(target), mask))
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ENOTDIR) and not self._by_descriptor:
                return None  # gone already: nothing to watch
            raise _Refused(error) from error
        known = self._folders.get(wd)
        if known is not None and known.ref == folder and known.root == root.top.display:
            return wd
        if known is not None:  # the same folder under another name: moved while unseen
            self._unlink(wd, known)
        self._folders[wd] = _Folder(root.top.display, folder, depth)
        self._by_path[folder.display] = wd
        root.wds.add(wd)
        if depth == 0:
            root.wd = wd
        else:
            parent = self._by_path.get(os.path.dirname(folder.display))
            if parent is not None and parent in self._folders:
                self._folders[parent].children[folder.components[-1]] = wd
        return wd

    def _unlink(self, wd: int, folder: _Folder) -> None:
        """Forget ``wd`` in the maps (the watch itself stays)."""
        if self._by_path.get(folder.ref.display) == wd:
            del self._by_path[folder.ref.display]
        parent = self._by_path.get(os.path.dirname(folder.ref.display))
        if parent is not None and parent in self._folders:
            siblings = self._folders[parent].children
            if siblings.get(folder.ref.components[-1] if folder.ref.components else "") == wd:
                del siblings[folder.ref.components[-1]]
        root = self._roots.get(folder.root)
        if root is not None:
            root.wds.discard(wd)
        del self._folders[wd]

    def _drop(self, wd: int) -> None:
        """Remove the watches on a folder and every watched folder inside it."""
        pending = [wd]
        while pending:
            current = pending.pop()
            folder = self._folders.get(current)
            if folder is None:
                continue
            pending.extend(folder.children.values())
            self._unlink(current, folder)
            self._libc.rm_watch(self._fd, current)  # EINVAL when the kernel dropped it already

    def _drop_root_watches(self, root: _Root) -> None:
        for wd in list(root.wds):
            folder = self._folders.get(wd)
            if folder is not None:
                self._unlink(wd, folder)
                self._libc.rm_watch(self._fd, wd)
        root.wds.clear()
        root.wd = None

    def _give_up(self, root: _Root, error: OSError) -> None:
        """A root only partly watched would miss events silently: watch none of it."""
        self._drop_root_watches(root)
        self._given_up.add(root.top.display)
        reason = WATCH_LIMIT if error.errno == errno.ENOSPC else f"inotify: {error.strerror}"
        self._sink.failed(root.top.display, reason)

    # -- the reader ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            poller.register(self._wake_read, select.POLLIN)
            while not self._stopping:
                poller.poll()
                if self._stopping:
                    return
                try:
                    data = os.read(self._fd, _READ_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                for wd, mask, name in _events(data):
                    self._handle(wd, mask, os.fsdecode(name))
        except BaseException as error:
            # One line for the journal; the daemon says what it does about it.  The traceback,
            # for a bug report, at -v.
            self._failure = f"its reader thread died ({type(error).__name__}: {error})"
            log.error("inotify observer: %s", self._failure)
            log.debug("inotify observer: how its reader thread died", exc_info=True)

    def _handle(self, wd: int, mask: int, name: str) -> None:
        if mask & _IN_Q_OVERFLOW:
            self._sink.lost("the inotify queue overflowed (fs.inotify.max_queued_events)")
            return
        with self._lock:
            folder = self._folders.get(wd)
            if folder is None:
                return  # a watch already dropped
            if mask & (_IN_IGNORED | _IN_MOVE_SELF | _IN_UNMOUNT | _IN_DELETE_SELF):
                self._ended(wd, folder, mask)
                return
            if not name:
                return
            path = os.path.join(folder.ref.display, name)
            appeared: list[str] = []
            if mask & _IN_ISDIR:
                if mask & _IN_MOVED_FROM and name in folder.children:
                    self._drop(folder.children[name])  # its paths are wrong now, wherever it went
                if mask & (_IN_CREATE | _IN_MOVED_TO):
                    appeared = self._add_below(folder, name)
        if not mask & _IN_ISDIR:
            self._sink.changed(path, appeared=bool(mask & (_IN_CREATE | _IN_MOVED_TO)))
        for found in appeared:
            self._sink.changed(found, appeared=True)

    def _ended(self, wd: int, folder: _Folder, mask: int) -> None:
        root = self._roots.get(folder.root)
        is_root = root is not None and root.wd == wd
        if mask & _IN_IGNORED:
            self._unlink(wd, folder)
        elif is_root and mask & _IN_MOVE_SELF and root is not None:
            self._drop_root_watches(root)  # its folders' paths are all wrong now
        if is_root and root is not None:
            root.ended = True
            root.wd = None

    def _add_below(self, parent: _Folder, name: str) -> list[str]:
        """A folder appeared (made, or moved in): watch it and what it holds; returns its files,
        whose own events came before there was a watch to raise them."""
        root = self._roots.get(parent.root)
        depth = parent.depth + 1
        if root is None or depth > self._limits.max_depth:
            return []
        try:
            parent_fd = open_folder(parent.ref)
        except (OSError, FileRefused):
            return []
        try:
            info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            return []
        finally:
            os.close(parent_fd)
        if not stat.S_ISDIR(info.st_mode) or info.st_dev != root.top.dev:
            return []
        known = parent.children.get(name)
        if known is not None and known in self._folders:
            ref = self._folders[known].ref
            if (ref.dev, ref.ino) == (info.st_dev, info.st_ino):
                return []  # watched already, by the walk that met its parent (mkdir -p)
            self._drop(known)  # replaced by what arrived
        top = parent.ref.child(name, info)
        limits = WalkLimits(self._limits.max_depth - depth, self._limits.max_entries)

        def opened(sub_top: FolderRef, folder: FolderRef, fd: int) -> None:
            if folder == sub_top and mount_id(fd) != root.mount:
                raise _OtherMount
            self._add(root, folder, depth + len(folder.components) - len(top.components), fd)

        problems: list[tuple[str, str]] = []
        found: list[str] = []
        try:
            for folder, entries in walk_folders(
                top, problems, limits, opened=opened, capped=lambda path, reason: None
            ):
                found.extend(os.path.join(folder.display, e.name) for e in entries if not e.is_dir)
        except _OtherMount:
            return []
        except _Refused as refused:
            self._give_up(root, refused.error)
            return []
        except OSError:
            return found  # the folder went while it was walked: its events say the rest
        return found


class PollingObserver:
    """Walks each root it serves every ``interval`` seconds and reports the files whose
    identity, size or mtime changed.  It remembers only checkpoint-named files and symlinks, so
    its memory grows with those, not with the tree.

    A root's first walk takes stock in this thread, not the caller's (which may be the daemon's
    main loop); files whose inode changed (ctime: written, renamed into place) since the root
    was added are reported by that walk, so nothing slips between the adding and the stock."""

    def __init__(self, sink: Sink, limits: WalkLimits, interval: float) -> None:
        self._sink = sink
        self._limits = limits
        self._interval = interval
        self._lock = threading.Lock()
        self._roots: dict[str, tuple[FolderRef, int]] = {}  # with the time.time_ns() it came
        self._snapshots: dict[str, dict[str, tuple[int, int, int]]] = {}
        self._failing: set[str] = set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="polling", daemon=True)
        self._thread.start()

    @property
    def failure(self) -> str | None:
        if self._thread.is_alive() or self._stop.is_set():
            return None
        return self._failure or "its thread stopped"

    def roots(self) -> list[str]:
        with self._lock:
            return list(self._roots)

    def add(self, top: FolderRef) -> None:
        """Poll the root folder ``top`` from now on (its first walk only takes stock)."""
        with self._lock:
            known = self._roots.get(top.display)
            if known is None or known[0] != top:
                self._roots[top.display] = (top, time.time_ns())
                self._snapshots.pop(top.display, None)
                self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.warning("the polling observer did not stop within 10 s")

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                with self._lock:
                    roots = list(self._roots.values())
                for top, added_ns in roots:
                    if self._stop.is_set():
                        return
                    self._poll(top, added_ns)
                self._wake.wait(self._interval)
        except BaseException as error:
            self._failure = f"its thread died ({type(error).__name__}: {error})"
            log.error("polling observer: %s", self._failure)
            log.debug("polling observer: how its thread died", exc_info=True)

    def _poll(self, top: FolderRef, added_ns: int) -> None:
        problems: list[tuple[str, str]] = []
        now: dict[str, tuple[int, int, int]] = {}
        since_added: list[str] = []
        for folder, entries in walk_folders(
            top,
            problems,
            self._limits,
            capped=lambda path, reason: None,
            should_stop=self._stop.is_set,
        ):
            for entry in entries:
                if entry.is_dir:
                    continue
                if entry.is_symlink or self._sink.interesting(entry.name):
                    info = entry.info
                    path = os.path.join(folder.display, entry.name)
                    now[path] = (info.st_ino, info.st_size, info.st_mtime_ns)
                    if info.st_ctime_ns >= added_ns - _CLOCK_SLACK_NS:
                        since_added.append(path)
        if self._stop.is_set():
            return
        if problems and problems[0][0] == top.display:  # the root folder itself is unreadable
            if top.display not in self._failing:
                self._failing.add(top.display)
                log.warning("polling %s: %s; retrying", top.display, problems[0][1])
            return
        self._failing.discard(top.display)
        with self._lock:
            before = self._snapshots.get(top.display)
            self._snapshots[top.display] = now
        if before is None:  # taking stock
            for path in since_added:
                self._sink.changed(path, appeared=True)
            return
        for path, identity in now.items():
            old = before.get(path)
            if old != identity:
                self._sink.changed(path, appeared=old is None or old[0] != identity[0])
        for path in before.keys() - now.keys():
            self._sink.changed(path, appeared=False)
