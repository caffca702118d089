"""Scanning: an immutable inventory of the checkpoints under the roots, read without acting.

A shared server is hostile ground.  The walk opens directories one component at a time relative
to directory descriptors with ``O_NOFOLLOW``, never follows a symlink, never leaves the
filesystem of the root it started from, and checks every file with ``fstat`` after opening it.
Only the literal prefix of a configured root (the part before its first glob character, which an
admin wrote) is opened by path.

What a file holds is read in a worker process under an address-space limit, never in the
process that scans: forked workers classify whole run folders for one-shot sweeps, and a
:class:`FileReader` (one long-lived worker) reads the files the daemon's scans reach.  A file
that would take more memory than that limit is refused there; the scan goes on.
"""

from __future__ import annotations

import fcntl
import fnmatch
import functools
import itertools
import logging
import os
import stat
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sweeper import torchzip
from sweeper.errors import FileRefused
from sweeper.extract import (
    expansion_problem,
    folder_identity,
    is_sweeper_output,
    is_sweeper_temp,
    lease_conflict,
    open_regular,
    opened_by_processes,
    output_name,
    sparse_problem,
    superseded_name,
)
from sweeper.formats import layouts
from sweeper.formats.layouts import FolderCheckpoint
from sweeper.policy import CopyStatus
from sweeper.scan_cache import PersistentCache
from sweeper.torchzip import MEMORY_REFUSAL, Kind, Mode
from sweeper.workers import (
    READER_MEMORY_LIMIT,
    ExecWorker,
    Stopped,
    WorkerDied,
    WorkerPool,
    address_space_limit_problem,
    limit_address_space,
)

log = logging.getLogger(__name__)

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_GLOB_CHARS = frozenset("*?[")
KEEP_SUFFIX = ".keep"


@dataclass(frozen=True, slots=True)
class WalkLimits:
    """How far a walk goes below each root folder.  A folder more than ``max_depth`` levels
    below its root, or one holding more than ``max_entries`` entries, is neither listed nor
    entered, so neither swept nor watched: a user's 10,000-deep chain of folders or a folder of
    ten million files costs a bounded walk, not the sweep."""

    max_depth: int = 64
    max_entries: int = 100_000


# What a walk reports about each folder it opens (the root folder it started from, the folder,
# and a descriptor valid only during the call) and about each folder it leaves out (path, why).
FolderOpened = Callable[["FolderRef", "FolderRef", int], None]
FolderCapped = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class FolderRef:
    """How to reopen a folder safely: a trusted prefix, then names opened with O_NOFOLLOW."""

    prefix: str
    components: tuple[str, ...]
    dev: int
    ino: int
    display: str = field(compare=False)  # the path, for messages: prefix joined to components

    @classmethod
    def top(cls, prefix: str, info: os.stat_result) -> FolderRef:
        return cls(prefix, (), info.st_dev, info.st_ino, prefix)

    def child(self, name: str, info: os.stat_result) -> FolderRef:
        return FolderRef(
            self.prefix,
            (*self.components, name),
            info.st_dev,
            info.st_ino,
            os.path.join(self.display, name),
        )


@dataclass(frozen=True, slots=True)
class CopyState:
    """The inference copy beside a full checkpoint, as far as its directory tells.

    ``current``: its records (names, sizes, CRCs) are exactly what extraction would write now;
    ``stale``: sweeper made it from an earlier version of a file of this name (it names that
    version); ``foreign``: anything else under the copy's name, which is never overwritten.
    Only a copy owned by the checkpoint's owner, with one link, is current or stale: another
    user's file proves nothing and is never touched.  ``identity`` (dev, ino, size, mtime_ns)
    is what a refresh replaces; ``made_here``: the stale copy was made from this folder's
    file; ``aside``: the name a stale copy keeps when it is not replaced outright.
    """

    name: str
    status: CopyStatus
    problem: str | None = None
    size: int = 0
    identity: tuple[int, int, int, int] | None = None
    made_here: bool = False
    aside: str | None = None
    pinned: bool = False  # a .keep file or a flock pins the copy: it is never replaced outright


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One checkpoint-named file in a run folder, classified from its directory and pickle."""

    name: str
    display: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    nlink: int
    uid: int
    kind: Kind | None  # None when the file could not be read as a checkpoint
    problem: str | None  # why it cannot be used, in words ("truncated archive: ...")
    epoch: int | None = None
    step: int | None = None
    metric: tuple[str, float] | None = None
    output_bytes: int | None = None  # size of its inference copy, for full checkpoints
    copy: CopyState | None = None
    symlink: bool = False
    own_output: bool = False
    pinned: str | None = None  # ".keep file", "shared flock held", "target of a symlink"
    writing: bool = False  # a process holds it open for writing
    in_use: bool = False  # a process holds it open (for reading too)
    metrics: tuple[tuple[str, float], ...] = ()  # top level, then one level down ("a.b")
    # sweeper's copies made from this folder's file of that name (named as its copy): what
    # keep_inference may thin once that file is gone
    source_name: str | None = None
    verified: bool = False  # every record's CRC read and checked (see Verifier)
    # A checkpoint folder (a Hugging Face checkpoint-500/): its parts; demoting it deletes its
    # training state, its weights stay where they are (they are its inference copy).
    layout: FolderCheckpoint | None = None
    ctime_ns: int = 0  # with the rest of its identity: what the scan cache's CRC record is for


@dataclass(frozen=True, slots=True)
class RunFolder:
    root: str
    folder: FolderRef
    files: tuple[FileEntry, ...]
    owner_uid: int | None = None  # the folder's owner: only their files count toward keep rules


@dataclass(frozen=True, slots=True)
class Inventory:
    runs: tuple[RunFolder, ...]
    problems: tuple[tuple[str, str], ...]  # (path, reason) for folders that could not be read
    symlink_targets: frozenset[tuple[int, int]] = frozenset()  # (dev, ino) pinned by symlinks
    failed: int = 0  # run folders not swept because classifying them failed (also in problems)
    temp_folders: tuple[FolderRef, ...] = ()  # folders holding sweeper temp names (crash leftovers)


def open_folder(folder: FolderRef) -> int:
    """Reopen a scanned folder; fails if any component became a symlink or another directory."""
    fd = os.open(folder.prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return _require_same_folder(open_below(fd, folder.components), folder)


def open_below(fd: int, names: Sequence[str]) -> int:
    """The folder reached from the open folder ``fd`` through ``names``, each opened with
    O_NOFOLLOW relative to the last; ``fd`` is consumed (closed, or returned when ``names`` is
    empty), also when this raises."""
    try:
        for name in names:
            child = os.open(name, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_same_folder(fd: int, folder: FolderRef) -> int:
    """``fd`` if it is the folder that was scanned; closed, and FileRefused, if not."""
    try:
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if (info.st_dev, info.st_ino) != (folder.dev, folder.ino):
        os.close(fd)
        raise FileRefused(folder.display, "folder was replaced since it was scanned")
    return fd


def split_root(pattern: str) -> tuple[str, tuple[str, ...]]:
    """``/data/*/run/ckpt`` -> (``/data``, (``*``, ``run``, ``ckpt``)): the trusted prefix, opened
    by path, and the components that are matched and opened without following symlinks.

    The prefix ends at the first glob, and earlier at the first folder someone else could change:
    one not owned by root or by sweeper's own user, or writable by its group or others (as sshd's
    StrictModes judges a home).  Below ``/data/alice``, owned by alice, every component is opened
    with O_NOFOLLOW, so alice cannot point ``results`` at a folder outside the roots.
    """
    parts = pattern.split("/")
    end = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    start = "/" if pattern.startswith("/") else "."
    trusted = 1 if pattern.startswith("/") else 0  # "/" itself, or the working directory
    while trusted < end and _is_trusted("/".join(parts[: trusted + 1]) or start):
        trusted += 1
    prefix = "/".join(parts[:trusted]) or start
    return prefix, tuple(p for p in parts[trusted:] if p not in ("", "."))


def _is_trusted(path: str) -> bool:
    if path in ("", ".", "/"):
        return True
    try:
        info = os.lstat(path)
    except OSError:
        return False
    owners = {0, os.geteuid()}
    return info.st_uid in owners and (
        stat.S_ISLNK(info.st_mode) or not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def expand_root(pattern: str) -> Iterator[FolderRef]:
    """The folders a configured root names, globs matched one component at a time."""
    prefix, rest = split_root(pattern)
    fd = os.open(prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    info = os.fstat(fd)
    os.close(fd)
    yield from _expand(FolderRef.top(prefix, info), rest)


def _expand(folder: FolderRef, rest: tuple[str, ...]) -> Iterator[FolderRef]:
    """Depth first, each level's matches in name order: the folders in the order of their
    components, holding one level's matches at a time, not every root folder (a root such as
    ``/data/*/*/results`` may match tens of thousands)."""
    if not rest:
        yield folder
        return
    for child in _matching_children(folder, rest[0]):
        yield from _expand(child, rest[1:])


def _matching_children(folder: FolderRef, part: str) -> list[FolderRef]:
    try:
        fd = open_folder(folder)
    except (OSError, FileRefused):
        return []
    try:
        if _GLOB_CHARS & set(part):
            names = [e.name for e in os.scandir(fd) if e.is_dir(follow_symlinks=False)]
            names = sorted(n for n in names if fnmatch.fnmatchcase(n, part))
        else:
            names = [part]
        found = []
        for name in names:
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(info.st_mode):
                found.append(folder.child(name, info))
        return found
    finally:
        os.close(fd)


def scan(
    roots: Sequence[str],
    patterns: Sequence[str],
    *,
    progress: Callable[[int], None] | None = None,
    processes: int = 1,
    cache: Cache | None = None,
    refine: Callable[[RunFolder], RunFolder] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    limits: WalkLimits = WalkLimits(),
    opened: FolderOpened | None = None,
    capped: FolderCapped | None = None,
    reader: FileReader | None = None,
    memory_limit: int = READER_MEMORY_LIMIT,
    store: PersistentCache | None = None,
) -> Inventory:
    """Walk every root and classify each checkpoint-named file; nothing is changed on disk.

    Folders are classified by up to ``processes`` forked worker processes, each under an
    address-space limit of ``memory_limit`` bytes more than it starts with (0: none).  With a
    ``reader`` (the daemon's, which must not fork) or a ``cache``, this process walks and
    probes, and ``reader`` (by default, a :class:`FileReader` for this scan) reads each file's
    contents.  ``refine`` is applied to each run folder where it was classified (see
    :class:`Scan`).  ``should_stop`` is also asked once per folder walked (the daemon's
    heartbeat).  ``store``, the persistent scan cache, is shared by the forked workers: each
    file whose identity it knows is not read again.
    """
    walk = Scan(
        roots,
        patterns,
        processes=processes,
        cache=cache,
        refine=refine,
        limits=limits,
        opened=opened,
        capped=capped,
        should_stop=should_stop,
        reader=reader,
        memory_limit=memory_limit,
        store=store,
    )
    runs = tuple(walk.runs(progress, should_stop))
    return Inventory(
        runs,
        tuple(walk.problems),
        frozenset(walk.symlink_targets),
        walk.failed,
        tuple(walk.temp_folders),
    )


@dataclass(slots=True)
class _OnPath:
    """A folder on the walk's current path, and what its children need to know of it."""

    folder: FolderRef
    layout_names: frozenset[str] | None = None  # a checkpoint folder: the names it holds
    part: bool = False  # a part of a checkpoint folder (a Trainer checkpoint's global_step500/)
    queued: bool = False  # to be classified as a run folder


class Scan:
    """The walk of the roots, done up front (it finds the run folders, every symlink's target,
    the problems and the temporary files' folders), then ``runs()``: each run folder listed and
    classified as it is consumed.  Memory holds folders, not files, so a caller can plan and
    print one run folder at a time.  With ``stream``, not even the folders are kept: the run
    folders are found by a second walk as they are classified, so memory holds the folders on
    the walk's path and a few chunks in flight, at any size of tree."""

    def __init__(
        self,
        roots: Sequence[str],
        patterns: Sequence[str],
        *,
        processes: int = 1,
        cache: Cache | None = None,
        refine: Callable[[RunFolder], RunFolder] | None = None,
        limits: WalkLimits = WalkLimits(),
        opened: FolderOpened | None = None,
        capped: FolderCapped | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        reader: FileReader | None = None,
        memory_limit: int = READER_MEMORY_LIMIT,
        store: PersistentCache | None = None,
        stream: bool = False,
    ) -> None:
        self.patterns = tuple(patterns)
        self.processes = processes
        self.cache = cache
        self.store = store  # the persistent scan cache, shared by forked workers
        self.reader = reader
        self.memory_limit = memory_limit
        self.limits = limits
        # Applied to each run folder where it is classified (in the worker processes, in
        # parallel): sweeps pass the verification of the files their deletions count on.
        self.refine = refine
        self.problems: list[tuple[str, str]] = []
        self._failed = 0
        self.temp_folders: list[FolderRef] = []
        # A symlink anywhere under the roots pins its target, wherever that target sits.
        self.symlink_targets: set[tuple[int, int]] = set()
        self._path: dict[int, _OnPath] = {}  # the walk's current folder at each depth
        self._roots = tuple(roots)
        # Root folders (dev, ino), when there are several patterns: one inside another's tree
        # is walked as its own root, not as part of the other (one pattern's never nest).
        self._tops: set[tuple[int, int]] | None = None
        if len(self._roots) > 1:
            self._tops = {(top.dev, top.ino) for _, top in self._root_folders([])}
        # Streamed, the run folders are found again by a second walk as they are classified;
        # otherwise the first walk's list of them is kept (each folder is opened once).
        self._found: list[tuple[str, FolderRef, int]] | None = None if stream else []
        for found in self._walk(opened, capped, should_stop, first=True):
            if self._found is not None:
                self._found.append(found)

    def _walk(
        self,
        opened: FolderOpened | None,
        capped: FolderCapped | None,
        should_stop: Callable[[], bool],
        *,
        first: bool,
    ) -> Iterator[tuple[str, FolderRef, int]]:
        """Each run folder (its root, itself, how many checkpoint-named files it held when
        listed), in walk order.  The first walk records symlink targets, temporary files'
        folders and problems; the next ones only find run folders again.  A root folder
        inside another root's tree is walked as its own root, not as part of the other."""
        problems = self.problems if first else []
        tops = self._tops or set()
        walked: set[tuple[int, int]] = set()
        for pattern, top in self._root_folders(problems if first else []):
            if self._tops is not None:
                if (top.dev, top.ino) in walked:
                    continue  # (two patterns matching one folder)
                walked.add((top.dev, top.ino))
            self._path.clear()
            walk = walk_folders(
                top,
                problems,
                self.limits,
                opened=opened if first else None,
                capped=capped if first else _not_again,
                should_stop=should_stop,
                skip=tops,  # (never the top itself: it is no child of its own walk)
            )
            for folder, files in walk:
                if first:
                    self.symlink_targets |= _folder_symlink_targets(folder, files)
                queued = self._checkpoint_folder(pattern, folder, files)
                if queued is not None:
                    yield queued
                here = self._path[len(folder.components)]
                if here.part or here.layout_names is not None:
                    continue  # its files are parts of one checkpoint, swept with it
                if first and any(is_sweeper_temp(e.name) for e in files):
                    self.temp_folders.append(folder)
                wanted = sum(_is_candidate(e, self.patterns) for e in files)
                if wanted:
                    self._path[len(folder.components)].queued = True
                    yield pattern, folder, wanted

    def _root_folders(self, problems: list[tuple[str, str]]) -> Iterator[tuple[str, FolderRef]]:
        """Each root pattern's folders as they are matched; what fails goes to ``problems``."""
        for pattern in self._roots:
            matched = False
            try:
                for top in expand_root(pattern):
                    matched = True
                    yield pattern, top
            except OSError as error:
                problems.append((pattern, f"cannot open root: {error.strerror}"))
                continue
            if not matched:
                problems.append((pattern, "root matches no folder"))

    def _checkpoint_folder(
        self, pattern: str, folder: FolderRef, files: list[Listed]
    ) -> tuple[str, FolderRef, int] | None:
        """Put ``folder`` on the walk's path, noting whether it is a checkpoint folder (its
        parent is then a run folder, swept with it as one checkpoint: returned, to be queued,
        unless it already is) or a part of one; either way its own files are not swept one by
        one.  The walk goes on below it: a Trainer's output folder may
        hold its final model and trainer state (a checkpoint folder to its parent) and
        checkpoint-N folders."""
        depth = len(folder.components)  # the walk is depth first: its parent is on the path
        for deeper in [d for d in self._path if d >= depth]:
            del self._path[deeper]
        here = self._path[depth] = _OnPath(folder)
        above = self._path.get(depth - 1)
        if above is not None and (
            above.part
            or (
                above.layout_names is not None
                and layouts.claimed(above.layout_names, folder.components[-1], self.patterns)
            )
        ):
            here.part = True
            return None
        names = frozenset(e.name for e in files)
        if layouts.recognise(names, self.patterns) is None:
            return None
        here.layout_names = names
        if above is not None and not above.queued:
            above.queued = True
            return pattern, above.folder, 1
        return None

    @property
    def failed(self) -> int:
        """Run folders whose classification failed (a worker died): the sweep exits 1."""
        return self._failed

    def runs(
        self,
        progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[RunFolder]:
        """Each run folder with its files classified, in walk order; stops early (yielding
        nothing more) once ``should_stop`` turns true.  A folder whose worker died is
        recorded in ``problems`` and counted in ``failed``; the others go on."""
        for run in self._classified(None, progress, should_stop):
            assert isinstance(run, RunFolder)
            yield run

    def rendered(
        self,
        render: Callable[[RunFolder], object],
        progress: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[Rendered]:
        """``runs()``, each run folder (with files) turned by ``render`` into what the caller
        needs of it, in the classifier that classified it: the run folder itself never
        travels back.  Without forked classifiers (a ``reader`` or ``cache``) it is rendered
        here."""
        for run in self._classified(render, progress, should_stop):
            yield run if isinstance(run, Rendered) else Rendered(len(run.files), render(run))

    def _classified(
        self,
        render: Callable[[RunFolder], object] | None,
        progress: Callable[[int], None] | None,
        should_stop: Callable[[], bool],
    ) -> Iterator[RunFolder | Rendered]:
        files_seen = 0
        refine, targets = self.refine, self.symlink_targets

        def finish(run: RunFolder) -> RunFolder:
            if not run.files:
                return run
            pinned = _pin_symlink_targets(run, targets)
            if refine is None:
                return pinned
            try:
                return refine(pinned)
            except Exception:  # one folder's unforeseen failure must not stop the sweep
                log.exception("%s: unexpected error while verifying", run.folder.display)
                return pinned  # unverified: the plan deletes nothing that counts on it

        classified: Iterator[RunFolder | Rendered | tuple[str, str]]
        folders: Iterator[tuple[str, FolderRef, int]]
        if self._found is not None:
            folders = iter(self._found)
        else:
            folders = self._walk(None, None, should_stop, first=False)
        if self.reader is not None or self.cache is not None:
            classified = _classify_here(
                ((root, folder) for root, folder, _ in folders), self.patterns, self.cache,
                finish, should_stop, self.reader, self.memory_limit,
            )  # fmt: skip
        else:
            classified = _classify_in_workers(
                _chunks(folders),
                self.patterns,
                self.processes,
                finish,
                should_stop,
                self.memory_limit,
                self.store,
                render,
            )
        for run in classified:
            if isinstance(run, tuple):
                self.problems.append(run)
                self._failed += 1
                continue
            files = run.files if isinstance(run, Rendered) else len(run.files)
            if files:
                files_seen += files
                if progress is not None:
                    progress(files_seen)
                yield run
        if self.store is not None and not should_stop():
            self.store.prune()


def _classify_here(
    tasks: Iterable[tuple[str, FolderRef]],
    patterns: Sequence[str],
    cache: Cache | None,
    finish: Callable[[RunFolder], RunFolder],
    should_stop: Callable[[], bool],
    reader: FileReader | None,
    memory_limit: int,
) -> Iterator[RunFolder]:
    """Run folders walked and probed in this process; each file's contents read by ``reader``
    (a :class:`FileReader` of this scan's own when None)."""
    read = reader if reader is not None else FileReader(memory_limit)
    probes = _Probes(_OpenForWriting(), cache, read)
    try:
        for pattern, folder in tasks:
            if should_stop():
                return
            yield finish(_classify_listed(pattern, folder, patterns, probes))
        if cache is not None:
            cache.prune()
    finally:
        if read is not reader:
            read.close()


@dataclass(frozen=True, slots=True)
class Rendered:
    """What a classifier made of one run folder for :meth:`Scan.rendered`."""

    files: int  # the checkpoints the run folder held
    value: object


# Run folders go to the classifiers a few at a time: one message each way per chunk, not per
# folder, and what is in flight (chunks x the pool's window) stays small whatever the tree.
_CHUNK_FOLDERS = 16
_CHUNK_FILES = 256
_WINDOW = 4  # chunks in flight or held back for order, per classifier

_Task = tuple[str, FolderRef]
_Chunk = tuple[_Task, ...]


def _chunks(folders: Iterable[tuple[str, FolderRef, int]]) -> Iterator[_Chunk]:
    """Run folders (root, folder, checkpoint-named files) a few at a time, as they come."""
    chunk: list[_Task] = []
    files = 0
    for root, folder, size in folders:
        if chunk and (len(chunk) >= _CHUNK_FOLDERS or files + size > _CHUNK_FILES):
            yield tuple(chunk)
            chunk, files = [], 0
        chunk.append((root, folder))
        files += size
    if chunk:
        yield tuple(chunk)


def _not_again(path: str, reason: str) -> None:
    """(A folder left out is reported by the first walk, not again by the next.)"""


def _classify_in_workers(
    chunks: Iterator[_Chunk],
    patterns: Sequence[str],
    processes: int,
    finish: Callable[[RunFolder], RunFolder],
    should_stop: Callable[[], bool],
    memory_limit: int,
    store: PersistentCache | None = None,
    render: Callable[[RunFolder], object] | None = None,
) -> Iterator[RunFolder | Rendered | tuple[str, str]]:
    """Classified (or rendered) run folders in task order, or (path, reason) for a folder
    that failed.  When a classifier dies on a chunk, each of its folders is tried again on its
    own, so that only the folder that kills it is lost."""
    first = next(chunks, None)
    if first is None:
        return
    warn_if_memory_unlimited(memory_limit)

    def pool(size: int) -> WorkerPool[_Chunk, list[RunFolder | Rendered | tuple[str, str]]]:
        # Forked: ``finish`` and ``render`` (closures) reach the workers by inheritance.
        return WorkerPool(
            size,
            _classify_chunk,
            lambda: _init_worker(tuple(patterns), finish, memory_limit, store, render),
        )

    try:
        every = itertools.chain((first,), chunks)
        for chunk, runs in pool(processes).map(every, should_stop, window=_WINDOW * processes):
            if not isinstance(runs, WorkerDied):
                yield from runs
            elif len(chunk) == 1:
                yield _died(chunk[0][1], runs)
            else:
                alone = [(task,) for task in chunk]
                for (task,), run in pool(1).map(alone, should_stop):
                    yield from run if not isinstance(run, WorkerDied) else [_died(task[1], run)]
    except Stopped:
        return


def _died(folder: FolderRef, died: WorkerDied) -> tuple[str, str]:
    log.error("%s: classifying it failed (%s); not swept", folder.display, died.how)
    return (folder.display, f"not swept: its classifier {died.how}")


_worker_patterns: tuple[str, ...] = ()
_worker_finish: Callable[[RunFolder], RunFolder] | None = None
_worker_render: Callable[[RunFolder], object] | None = None
_worker_probes: _Probes | None = None


def _init_worker(
    patterns: tuple[str, ...],
    finish: Callable[[RunFolder], RunFolder],
    memory_limit: int,
    store: PersistentCache | None = None,
    render: Callable[[RunFolder], object] | None = None,
) -> None:
    """A forked classifier (signal handling is the pool's: ``sweeper.workers``).  Under its
    address-space limit a huge memo fails as a MemoryError (a refused file) too, so the opcode
    walk may skip pickles too small to pass a bound: ~0.2 ms a file, on trees of thousands."""
    if limit_reading_memory(memory_limit):
        torchzip.rely_on_address_space_limit()
    global _worker_patterns, _worker_probes, _worker_finish, _worker_render
    _worker_patterns = patterns
    _worker_finish = finish
    _worker_render = render
    _worker_probes = _Probes(_OpenForWriting(), store)


def limit_reading_memory(memory_limit: int) -> bool:
    """In a worker process that reads untrusted files: cap its address space at ``memory_limit``
    bytes more than it maps now (0: no cap), so that a file demanding more fails with
    MemoryError and is refused.  Whether the cap is in force."""
    return memory_limit > 0 and limit_address_space(memory_limit)


def warn_if_memory_unlimited(memory_limit: int) -> None:
    """Say once per process when the workers' address-space limit cannot be set (a seccomp
    filter that denies setrlimit/prlimit64): files are then still bounded by the opcode walk."""
    if memory_limit > 0:
        problem = address_space_limit_problem()
        if problem is not None:
            _warn_unlimited(problem)


@functools.lru_cache(maxsize=1)
def _warn_unlimited(problem: str) -> None:
    log.warning(
        "cannot limit the memory of the processes that read checkpoints (setrlimit: %s); "
        "only the pickle bounds protect against a file that demands too much",
        problem,
    )


def _classify_chunk(chunk: _Chunk) -> list[RunFolder | Rendered | tuple[str, str]]:
    """A few run folders, in a worker process: each classified, finished and (for
    :meth:`Scan.rendered`) rendered; one that raises is reported as failed, the rest go on."""
    assert _worker_probes is not None and _worker_finish is not None
    results: list[RunFolder | Rendered | tuple[str, str]] = []
    try:
        for pattern, folder in chunk:
            try:
                run = _worker_finish(
                    _classify_listed(pattern, folder, _worker_patterns, _worker_probes)
                )
                if _worker_render is not None and run.files:
                    results.append(Rendered(len(run.files), _worker_render(run)))
                else:
                    results.append(run)
            except Exception as error:  # (as a task that raised: this folder is not swept)
                results.append(_died(folder, WorkerDied(f"raised {type(error).__name__}: {error}")))
    finally:
        if isinstance(_worker_probes.cache, PersistentCache):
            _worker_probes.cache.flush()  # one transaction per chunk
    return results


def _classify_listed(
    pattern: str, folder: FolderRef, patterns: Sequence[str], probes: _Probes
) -> RunFolder:
    """List the folder (again: the walk kept no listings) and classify its checkpoints."""
    try:
        fd = open_folder(folder)
    except (OSError, FileRefused):
        return RunFolder(pattern, folder, ())  # gone since the walk: nothing to act on
    try:
        entries = _list(fd)
        owner = os.fstat(fd).st_uid
        files = _classify_folder(folder, entries, patterns, probes, fd)
    finally:
        os.close(fd)
    return RunFolder(pattern, folder, files, owner)


def _is_candidate(entry: Listed, patterns: Sequence[str]) -> bool:
    return (
        not entry.is_dir
        and not is_sweeper_temp(entry.name)
        and any(fnmatch.fnmatchcase(entry.name, p) for p in patterns)
    )


def _pin_symlink_targets(run: RunFolder, targets: set[tuple[int, int]]) -> RunFolder:
    files = tuple(
        _replace(file, pinned="target of a symlink")
        if (file.dev, file.ino) in targets and file.pinned is None and not file.symlink
        else file
        for file in run.files
    )
    return RunFolder(run.root, run.folder, files, run.owner_uid)


@dataclass(frozen=True, slots=True)
class Listed:
    """A directory entry and its lstat, taken while the directory was open."""

    name: str
    info: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.info.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.info.st_mode)


# The undo window's trash folder at the top of each root folder (sweeper.trash): never walked.
TRASH_NAME = ".sweeper-trash"


def _list(fd: int) -> list[Listed]:
    listed = []
    for entry in os.scandir(fd):
        try:
            listed.append(Listed(entry.name, entry.stat(follow_symlinks=False)))
        except OSError:
            continue  # vanished between readdir and stat
    listed.sort(key=lambda item: item.name)
    return listed


def _list_at_most(fd: int, limit: int) -> list[Listed] | None:
    """``_list``, or None as soon as the folder proves to hold more than ``limit`` entries (the
    memory a listing takes stays bounded)."""
    listed: list[Listed] = []
    with os.scandir(fd) as entries:
        for entry in entries:
            if len(listed) >= limit:
                return None
            try:
                listed.append(Listed(entry.name, entry.stat(follow_symlinks=False)))
            except OSError:
                continue  # vanished between readdir and stat
    listed.sort(key=lambda item: item.name)
    return listed


def locate_folder(roots: Sequence[str], path: str) -> tuple[str, FolderRef] | None:
    """The configured root and safe reference for ``path``, a folder below one of the roots as
    the observer reported it; None when it is not below any (or is reached through a symlink).
    Below a root folder inside another, the inner one, as a full scan walks it (``Scan``)."""
    matching: list[tuple[str, FolderRef]] = []
    for pattern in roots:
        try:
            tops = list(expand_root(pattern))
        except OSError:
            continue
        for top in tops:
            base = top.display.rstrip("/") + "/"
            if path == top.display or path.startswith(base):
                matching.append((pattern, top))
    if not matching:
        return None
    # (both are prefixes of path: the longer is the deeper; the first listed among equals)
    pattern, top = max(matching, key=lambda found: len(found[1].display.rstrip("/")))
    base = top.display.rstrip("/") + "/"
    folder = top
    relative = path[len(base) :] if path != top.display else ""
    try:
        for name in [part for part in relative.split("/") if part]:
            fd = open_folder(folder)
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
            if not stat.S_ISDIR(info.st_mode) or info.st_dev != top.dev:
                return None
            folder = folder.child(name, info)
        if not _same_mount(top, folder):
            return None
    except (OSError, FileRefused):
        return None
    return pattern, folder


def scan_folder(
    roots: Sequence[str],
    patterns: Sequence[str],
    path: str,
    symlink_targets: frozenset[tuple[int, int]] = frozenset(),
    cache: Cache | None = None,
    limits: WalkLimits = WalkLimits(),
    reader: FileReader | None = None,
) -> Inventory:
    """Like ``scan``, for the one run folder at ``path`` (not its subfolders), read by
    ``reader`` (by default, a :class:`FileReader` for this call).  Symlinks elsewhere are not
    walked: ``symlink_targets`` (from the last full scan) pins their targets.  A folder past
    ``limits.max_entries`` is left alone, as a full scan leaves it."""
    located = _run_folder_of(roots, path, patterns)
    if located is None:
        return Inventory((), ((path, "not a folder below the configured roots"),))
    pattern, folder = located
    try:
        fd = open_folder(folder)
    except (OSError, FileRefused) as error:
        reason = error.reason if isinstance(error, FileRefused) else str(error.strerror)
        return Inventory((), ((path, f"cannot open folder: {reason}"),))
    try:
        listed = _list_at_most(fd, limits.max_entries)
        owner = os.fstat(fd).st_uid
    finally:
        os.close(fd)
    if listed is None:
        reason = f"holds more than {limits.max_entries} entries (max_folder_entries); not swept"
        return Inventory((), ((path, reason),))
    entries = listed
    read = reader if reader is not None else FileReader(READER_MEMORY_LIMIT)
    try:
        files = _classify_folder(folder, entries, patterns, _Probes(_OpenForWriting(), cache, read))
    finally:
        if read is not reader:
            read.close()
    targets = symlink_targets | _folder_symlink_targets(folder, entries)
    run = _pin_symlink_targets(RunFolder(pattern, folder, files, owner), set(targets))
    return Inventory((run,) if files else (), (), frozenset(targets))


def _run_folder_of(
    roots: Sequence[str], path: str, patterns: Sequence[str]
) -> tuple[str, FolderRef] | None:
    """The run folder to sweep for a change at ``path``: the folder itself, or, when it is a
    checkpoint folder (or a part of one, as a Trainer checkpoint's ``global_step500/``), the
    run folder that holds it."""
    located = locate_folder(roots, path)
    for _ in range(3):
        if located is None or not located[1].components:
            return located
        folder = located[1]
        try:
            fd = open_folder(folder)
        except (OSError, FileRefused):
            return located
        try:
            listed = _list_at_most(fd, layouts.base.MAX_ENTRIES)
            names = {e.name for e in listed} if listed is not None else set()
            own = layouts.recognise(names, patterns) if listed is not None else None
            if (
                listed is None
                or own is None
                or _holds_checkpoint_folders(fd, listed, own, patterns)
            ):
                return located
        finally:
            os.close(fd)
        located = locate_folder(roots, os.path.dirname(folder.display))
    return located


def _holds_checkpoint_folders(
    fd: int, entries: list[Listed], own: layouts.Layout, patterns: Sequence[str]
) -> bool:
    for entry in entries:
        if not entry.is_dir or own.claims(entry.name):
            continue
        try:
            child = os.open(entry.name, _OPEN_DIR, dir_fd=fd)
        except OSError:
            continue
        try:
            listed = _list_at_most(child, layouts.base.MAX_ENTRIES)
        finally:
            os.close(child)
        names = {e.name for e in listed} if listed is not None else set()
        if listed is not None and layouts.recognise(names, patterns) is not None:
            return True
    return False


def walk_folders(
    top: FolderRef,
    problems: list[tuple[str, str]],
    limits: WalkLimits = WalkLimits(),
    *,
    opened: FolderOpened | None = None,
    capped: FolderCapped | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    skip: Collection[tuple[int, int]] = (),
) -> Iterator[tuple[FolderRef, list[Listed]]]:
    """Folders below ``top`` on its filesystem and its mount, with their entries, depth first;
    symlinks are not entered, nor bind mounts (the same filesystem, so the same ``st_dev``,
    reached through another mount: a way into folders outside the roots), nor folders past
    ``limits`` (each reported to ``capped``; below one root folder, only the first folder too
    deep is).  ``opened`` sees each folder's descriptor before it is listed; ``should_stop`` is
    asked before each folder and ends the walk early.  Folders whose (dev, ino) is in
    ``skip`` are not entered.

    Each folder is opened once, by name relative to its parent's descriptor with O_NOFOLLOW:
    the descriptors along the current path stay open (at most ``max_depth`` + 1), so the walk
    costs one open per folder however deep the tree, never a reopening from the root.
    """
    report = capped if capped is not None else _log_capped
    stack: list[tuple[int, FolderRef]] = [(0, top)]
    path: list[int] = []  # path[d]: the open folder at depth d on the way to the current one
    top_mount: int | None = None
    reported_depth = False
    try:
        while stack:
            if should_stop():
                return
            depth, folder = stack.pop()
            while len(path) > depth:  # depth first: the parent is the last folder kept open
                os.close(path.pop())
            try:
                fd = _open_child(path[-1], folder) if path else open_folder(folder)
            except (OSError, FileRefused) as error:
                reason = error.reason if isinstance(error, FileRefused) else error.strerror
                problems.append((folder.display, f"cannot open folder: {reason}"))
                continue
            path.append(fd)
            mount = mount_id(fd)
            if depth == 0:
                top_mount = mount
                if mount is None:
                    _warn_no_mount_ids()
            elif mount != top_mount:
                continue  # a mount point below the root: never crossed, as another filesystem
            if opened is not None:
                opened(top, folder, fd)
            entries = _list_at_most(fd, limits.max_entries)
            if entries is None:
                report(
                    folder.display,
                    f"holds more than {limits.max_entries} entries (max_folder_entries); "
                    "not walked",
                )
                continue
            # sweeper's trash (sweeper.trash), at any depth (another root's, when roots nest):
            # what it holds is no checkpoint
            entries = [e for e in entries if e.name != TRASH_NAME]
            children = [
                folder.child(e.name, e.info)
                for e in entries
                if e.is_dir
                and e.info.st_dev == top.dev  # never cross into another filesystem
                and (e.info.st_dev, e.info.st_ino) not in skip
            ]
            if children and depth >= limits.max_depth:
                if not reported_depth:
                    reported_depth = True
                    report(
                        children[0].display,
                        f"more than {limits.max_depth} folders below {top.display} (max_depth); "
                        "neither it nor any folder as deep there is walked",
                    )
                children = []
            stack.extend((depth + 1, child) for child in reversed(children))
            yield folder, entries
    finally:
        for fd in path:
            os.close(fd)


def _open_child(parent_fd: int, folder: FolderRef) -> int:
    """Open ``folder`` by its last name below its parent's descriptor; fails if it became a
    symlink or another directory since it was listed."""
    return _require_same_folder(os.open(folder.components[-1], _OPEN_DIR, dir_fd=parent_fd), folder)


def _log_capped(path: str, reason: str) -> None:
    log.warning("%s: %s", path, reason)


def mount_id(fd: int) -> int | None:
    """The id of the mount an open file or folder is reached through (``mnt_id`` in
    /proc/self/fdinfo): a bind mount of the same filesystem differs here, not in ``st_dev``."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            for line in info:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


@functools.lru_cache(maxsize=1)
def _warn_no_mount_ids() -> None:
    log.warning(
        "no /proc/self/fdinfo: bind mounts inside the roots cannot be told apart and may be crossed"
    )


def _same_mount(top: FolderRef, folder: FolderRef) -> bool:
    fds = [open_folder(top)]
    try:
        fds.append(open_folder(folder))
        return mount_id(fds[0]) == mount_id(fds[1])
    finally:
        for fd in fds:
            os.close(fd)


def _classify_folder(
    folder: FolderRef,
    entries: list[Listed],
    patterns: Sequence[str],
    probes: _Probes,
    opened: int | None = None,
) -> tuple[FileEntry, ...]:
    """The checkpoints among ``entries``, the listing of ``folder`` (``opened``, when the
    caller has it open: the descriptor it was listed through)."""
    names = {entry.name for entry in entries}
    own = layouts.recognise(names, patterns)  # a checkpoint folder: its files are its parts
    wanted = [] if own is not None else [e for e in entries if _is_candidate(e, patterns)]
    subfolders = [
        e
        for e in entries
        if e.is_dir
        and e.info.st_dev == folder.dev  # never into another filesystem
        and (own is None or not own.claims(e.name))
    ]
    if not wanted and not subfolders:
        return ()
    try:
        fd = open_folder(folder) if opened is None else opened
    except (OSError, FileRefused):
        return ()
    try:
        known = probes.known(wanted, entries)
        files = [
            _classify_safely(fd, folder, entry, names, probes, known.get(entry.name))
            for entry in wanted
        ]
        here = mount_id(fd) if subfolders else None
        for entry in subfolders:
            found = _classify_checkpoint_folder(fd, folder, entry, names, probes, here, patterns)
            if found is not None:
                files.append(found)
        owner = os.fstat(fd).st_uid
    finally:
        if opened is None:
            os.close(fd)
    return tuple(_pin_best(files, owner))


def _pin_best(files: list[FileEntry], owner: int) -> list[FileEntry]:
    """The checkpoint folder the newest Trainer checkpoint names as its best stays complete.
    Only a checkpoint that counts (the run folder owner's, intact, resumable) may say which:
    another user's stray trainer_state.json must not take that protection away."""
    trainer = [
        f
        for f in files
        if f.layout is not None
        and f.layout.best is not None
        and f.step is not None
        and f.kind is Kind.FULL
        and f.problem is None
        and f.layout.resumable
        and f.uid == owner
    ]
    if not trainer:
        return files
    newest = max(trainer, key=lambda f: (f.step or 0, f.mtime_ns))
    best = newest.layout.best if newest.layout is not None else None
    why = f"best_model_checkpoint in {newest.name}/trainer_state.json"
    return [
        _replace(f, pinned=why)
        if f.name == best and f.layout is not None and f.pinned is None
        else f
        for f in files
    ]


def _classify_checkpoint_folder(
    dir_fd: int,
    folder: FolderRef,
    entry: Listed,
    names: set[str],
    probes: _Probes,
    mount: int | None,
    patterns: Sequence[str],
) -> FileEntry | None:
    """The subfolder ``entry`` as one checkpoint, when a layout recognises it (None when none
    does, or when it is a mount point: another filesystem, or a bind mount of this one).  Its
    names are listed here; what its files hold is read by ``probes.read``."""
    display = os.path.join(folder.display, entry.name)
    try:
        fd = os.open(entry.name, _OPEN_DIR, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (entry.info.st_dev, entry.info.st_ino):
            return None
        if mount_id(fd) != mount:
            return None
        listed = _list_at_most(fd, layouts.base.MAX_ENTRIES)
        if listed is None or layouts.recognise({e.name for e in listed}, patterns) is None:
            return None
        try:
            found = probes.read(fd, dir_fd, entry.name, display, info, names)
        except Exception as error:  # one folder must not stop the sweep
            log.exception("%s: unexpected error while reading it", display)
            found = {"problem": f"unreadable: {type(error).__name__}: {error}"}
        layout: FolderCheckpoint | None = found.get("layout")
        if layout is not None:
            found.update(_held_parts(fd, layout, display, probes))
    finally:
        os.close(fd)
    if entry.name + KEEP_SUFFIX in names:
        found.setdefault("pinned", f"pinned by {entry.name}{KEEP_SUFFIX}")
    size = layout.size if layout is not None else 0
    newest = layout.newest_ns if layout is not None else info.st_mtime_ns
    return FileEntry(
        entry.name,
        display,
        info.st_dev,
        info.st_ino,
        size,
        newest,
        1,
        info.st_uid,
        found.pop("kind", None),
        found.pop("problem", None),
        **found,
    )


def _held_parts(fd: int, layout: FolderCheckpoint, display: str, probes: _Probes) -> dict[str, Any]:
    """Whether a process holds any of the folder's files open (for writing: it is being
    saved; at all: a run may be resuming from it)."""
    in_use = False
    for part in layout.parts:
        try:
            opened = layouts.open_part(fd, part, display)
        except FileRefused:
            return {"problem": f"{part.name} changed while it was scanned"}
        try:
            held = probes.writers.held(opened, os.fstat(opened))
        finally:
            os.close(opened)
        if held == "writing":
            return {"problem": f"{part.name} is open for writing by a process", "writing": True}
        in_use = in_use or held == "open"
    return {"in_use": in_use}


def _folder_symlink_targets(folder: FolderRef, entries: list[Listed]) -> set[tuple[int, int]]:
    """(dev, ino) of what every symlink in this folder points at, whatever its name: stat
    only, nothing opened."""
    links = [entry for entry in entries if entry.is_symlink]
    if not links:
        return set()
    try:
        fd = open_folder(folder)
    except (OSError, FileRefused):
        return set()
    targets = set()
    try:
        for entry in links:
            try:
                info = os.stat(entry.name, dir_fd=fd, follow_symlinks=True)
            except OSError:
                continue
            targets.add((info.st_dev, info.st_ino))
    finally:
        os.close(fd)
    return targets


def _replace(file: FileEntry, **changes: object) -> FileEntry:
    import dataclasses

    return dataclasses.replace(file, **changes)  # type: ignore[arg-type]


def _classify_safely(
    dir_fd: int,
    folder: FolderRef,
    entry: Listed,
    names: set[str],
    probes: _Probes,
    known: _Known | None = None,
) -> FileEntry:
    """One file that breaks the classifier in an unforeseen way is reported, never fatal."""
    try:
        return _classify_file(dir_fd, folder, entry, names, probes, known)
    except MemoryError:  # past the worker's address-space limit: the file asks too much
        display = os.path.join(folder.display, entry.name)
        log.warning("%s: %s", display, MEMORY_REFUSAL)
        return _entry(entry.name, display, entry.info, {"problem": MEMORY_REFUSAL})
    except OSError as error:  # an I/O error reading it: one line, no traceback
        display = os.path.join(folder.display, entry.name)
        reason = f"unreadable: {error.strerror or error}"
        log.error("%s: %s", display, reason)
        return _entry(entry.name, display, entry.info, {"problem": reason})
    except (Exception, RecursionError) as error:  # one bad file must not stop the sweep
        display = os.path.join(folder.display, entry.name)
        log.exception("%s: unexpected error while reading it", display)
        reason = f"unreadable: {type(error).__name__}: {error}"
        return _entry(entry.name, display, entry.info, {"problem": reason})


def _classify_file(
    dir_fd: int,
    folder: FolderRef,
    entry: Listed,
    names: set[str],
    probes: _Probes,
    known: _Known | None = None,
) -> FileEntry:
    """``known``: the cache's key and answer for the file as the folder's listing saw it
    (looked up for the whole folder at once), used if the opened file is still that file."""
    display = os.path.join(folder.display, entry.name)
    info = entry.info
    found: dict[str, Any] = {}
    if entry.is_symlink:
        found.update(symlink=True, problem="a symlink: never followed")
        return _entry(entry.name, display, info, found)
    if entry.name + KEEP_SUFFIX in names:
        found["pinned"] = f"pinned by {entry.name}{KEEP_SUFFIX}"
    try:
        fd, opened = open_regular(entry.name, dir_fd, display)
    except FileRefused as error:
        found["problem"] = error.reason
        return _entry(entry.name, display, info, found)
    try:
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            found["problem"] = "replaced while scanning"
            return _entry(entry.name, display, info, found)
        info = opened
        sparse = sparse_problem(opened)
        if sparse is not None:
            found["problem"] = sparse
            return _entry(entry.name, display, info, found)
        if "pinned" not in found and _flock_held(fd):
            found["pinned"] = "pinned by a shared flock"
        held = probes.writers.held(fd, opened)
        if held == "writing":
            found.update(problem="open for writing by a process", writing=True)
        else:
            found["in_use"] = held == "open"
            if known is not None and _identity(opened) == _identity(entry.info):
                key, cached = known
            else:  # changed since it was listed: asked again, as it is now
                key = probes.cache_key(dir_fd, entry.name, opened, names)
                cached = probes.cache.get(key) if probes.cache is not None else None
            if cached is not None:
                found.update(cached)
            else:
                read = probes.read(fd, dir_fd, entry.name, display, opened, names)
                if read.get("problem") == MEMORY_REFUSAL:
                    log.warning("%s: %s", display, MEMORY_REFUSAL)
                found.update(read)
                if probes.cache is not None:
                    probes.cache.put(key, read)
        return _entry(entry.name, display, info, found)
    finally:
        os.close(fd)


def _entry(name: str, display: str, info: os.stat_result, found: dict[str, Any]) -> FileEntry:
    return FileEntry(
        name,
        display,
        info.st_dev,
        info.st_ino,
        info.st_size,
        info.st_mtime_ns,
        info.st_nlink,
        info.st_uid,
        found.pop("kind", None),
        found.pop("problem", None),
        ctime_ns=info.st_ctime_ns,
        **found,
    )


_Read = Callable[[int, int, str, str, os.stat_result, set[str]], dict[str, Any]]


def _read_here(
    fd: int, dir_fd: int, name: str, display: str, info: os.stat_result, names: set[str]
) -> dict[str, Any]:
    """What the open file's directory and pickle say (and its copy's, beside it in ``dir_fd``),
    read in this process: only in one that reads under an address-space limit."""
    if stat.S_ISDIR(info.st_mode):
        return _read_checkpoint_folder(fd, name, display)
    found: dict[str, Any] = {}
    _read_checkpoint(fd, dir_fd, name, display, info, names, found)
    return found


class FileReader:
    """Reads the files a scan reaches in a worker process of its own under an address-space
    limit (``memory_limit`` bytes more than it starts with; 0: none), so that what a hostile
    file makes the unpickler allocate lands there, never in the scanning process.  The daemon
    keeps one: its worker is exec'd once (a fork would copy the daemon's threads mid-step) and
    reused file after file; a file that kills it is refused, and the next file gets a new one.
    Threads share it; reads are one at a time."""

    def __init__(self, memory_limit: int, should_stop: Callable[[], bool] = lambda: False) -> None:
        warn_if_memory_unlimited(memory_limit)
        self.memory_limit = memory_limit
        self._worker = _reading_worker(memory_limit)
        self._should_stop = should_stop
        self._lock = threading.Lock()
        # The folder listing the worker holds, and which worker holds it: a folder's names go
        # over once, not with each of its files.
        self._names: set[str] | None = None
        self._names_in = 0

    def __call__(
        self, fd: int, dir_fd: int, name: str, display: str, info: os.stat_result, names: set[str]
    ) -> dict[str, Any]:
        with self._lock:
            worker = self._worker.ensure_started()
            send = names is not self._names or worker != self._names_in
            task = (name, display, info, names if send else None)
            try:
                found = self._worker.call(task, (fd, dir_fd), self._should_stop)
            except Stopped:
                self._names = None
                return {"problem": "not read: sweeper is stopping"}
            if isinstance(found, WorkerDied):
                self._names = None
                log.warning("%s: reading it failed (%s); refused", display, found.how)
                return {"problem": f"refused: reading it failed ({found.how})"}
            self._names, self._names_in = names, worker
            return found

    def set_memory_limit(self, memory_limit: int) -> None:
        """Read under ``memory_limit`` from the next file on (in a new worker)."""
        with self._lock:
            if memory_limit != self.memory_limit:
                warn_if_memory_unlimited(memory_limit)
                self._worker.close()
                self._worker = _reading_worker(memory_limit)
                self.memory_limit = memory_limit

    def close(self) -> None:
        """End the worker (the next read starts another)."""
        self._worker.close()


def _reading_worker(memory_limit: int) -> ExecWorker[_ReadTask, dict[str, Any]]:
    return ExecWorker(_read_in_worker, functools.partial(limit_reading_memory, memory_limit))


_ReadTask = tuple[str, str, os.stat_result, "set[str] | None"]
_reader_names: set[str] = set()


def _read_in_worker(task: _ReadTask, fds: list[int]) -> dict[str, Any]:
    """A :class:`FileReader`'s worker: read one file, sent open with its folder."""
    global _reader_names
    name, display, info, names = task
    if names is not None:
        _reader_names = names
    fd, dir_fd = fds
    try:
        return _read_here(fd, dir_fd, name, display, info, _reader_names)
    except MemoryError:
        return {"problem": MEMORY_REFUSAL}


def _read_checkpoint(
    fd: int,
    dir_fd: int,
    name: str,
    display: str,
    info: os.stat_result,
    names: set[str],
    found: dict[str, Any],
) -> None:
    """Fill ``found`` with what the file's directory and pickle say."""
    own = is_sweeper_output(name)
    found["own_output"] = own
    try:
        checkpoint = torchzip.open_checkpoint(fd, display)
    except FileRefused as error:
        found["problem"] = error.reason
        return
    found.update(
        kind=checkpoint.kind,
        epoch=checkpoint.epoch,
        step=checkpoint.step,
        metric=headline_metric(checkpoint.metrics),
        metrics=checkpoint.metrics + checkpoint.inner_metrics,
    )
    if checkpoint.kind is Kind.UNREDUCIBLE:
        found["problem"] = f"cannot reduce it: {checkpoint.description.reason}"
        return
    if own:
        try:
            source = torchzip.read_provenance(fd, checkpoint.archive, display)
        except FileRefused:
            source = None
        here = source is not None and source.folder == folder_identity(dir_fd)
        if source is not None and here and name == output_name(source.name, Mode.INFERENCE):
            found["source_name"] = source.name
    if checkpoint.kind is not Kind.FULL or own:
        return
    provenance = torchzip.provenance_of(checkpoint, name, info.st_mtime_ns, folder_identity(dir_fd))
    try:
        # The copy's size alone (its pickle counted, not written) unless a copy is there to
        # judge: the whole plan, CRCs and all, is what an existing copy is compared with.
        output_bytes = torchzip.output_size(checkpoint, Mode.INFERENCE, provenance)
    except FileRefused as error:
        found["problem"] = error.reason
        return
    expansion = expansion_problem(info, output_bytes)
    if expansion is not None:
        found["problem"] = expansion
        return
    copy_name = output_name(name, Mode.INFERENCE)
    copy = CopyState(copy_name, CopyStatus.NONE)
    if copy_name in names:
        plan = torchzip.plan_output(checkpoint, Mode.INFERENCE, provenance)
        copy = _copy_state(dir_fd, copy_name, plan, provenance, info, display, names)
    found.update(output_bytes=output_bytes, copy=copy)


def _read_checkpoint_folder(fd: int, name: str, display: str) -> dict[str, Any]:
    """What a checkpoint folder's layout says of it (its JSON files and weight headers read;
    never a pickle)."""
    layout = layouts.describe_folder(fd, name, display)
    if layout is None:
        return {"problem": "not a checkpoint folder"}
    found: dict[str, Any] = {
        "layout": layout,
        "step": layout.step,
        "epoch": layout.epoch,
        "metrics": layout.metrics,
        "metric": headline_metric(layout.metrics),
    }
    if layout.kind is Kind.UNREDUCIBLE:
        found.update(kind=Kind.UNREDUCIBLE, problem=f"cannot reduce it: {layout.problem}")
    elif layout.kind is Kind.OTHER:
        found["problem"] = f"{layout.layout} checkpoint folder: {layout.problem}"
    else:
        found["kind"] = layout.kind
        if layout.kind is Kind.FULL:  # its weights, kept in place, are its inference copy
            found["copy"] = CopyState(name, CopyStatus.CURRENT)
    return found


def headline_metric(metrics: tuple[tuple[str, float], ...]) -> tuple[str, float] | None:
    for name, value in metrics:
        if name == "best_val_acc":
            return (name, value)
    return metrics[0] if metrics else None


def _copy_state(
    dir_fd: int,
    name: str,
    plan: torchzip.OutputPlan,
    provenance: torchzip.Provenance,
    source: os.stat_result,
    display: str,
    names: set[str],
) -> CopyState:
    """Whether the file under the copy's name is this version's copy, sweeper's copy of an
    earlier version of the same file (stale), or something sweeper must not overwrite."""
    copy_display = os.path.join(os.path.dirname(display), name)
    try:
        fd, info = open_regular(name, dir_fd, copy_display)
    except FileRefused as error:
        return CopyState(name, CopyStatus.FOREIGN, error.reason)
    try:
        return _judge_copy(fd, info, name, copy_display, plan, provenance, source, names)
    finally:
        os.close(fd)


def _judge_copy(
    fd: int,
    info: os.stat_result,
    name: str,
    display: str,
    plan: torchzip.OutputPlan,
    provenance: torchzip.Provenance,
    source: os.stat_result,
    names: set[str],
) -> CopyState:
    identity = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def state(status: CopyStatus, problem: str | None = None) -> CopyState:
        return CopyState(name, status, problem, info.st_size, identity)

    if info.st_uid != source.st_uid:
        return state(CopyStatus.FOREIGN, "owned by another user")
    if info.st_nlink != 1:
        return state(CopyStatus.FOREIGN, f"has {info.st_nlink} hard links")
    try:
        archive = torchzip.read_archive(fd, display)
        made_from = torchzip.read_provenance(fd, archive, display)
    except FileRefused as error:
        return state(CopyStatus.FOREIGN, error.reason)
    if made_from is None:  # written before copies named their source, or not by sweeper
        if torchzip.same_content(archive, torchzip.without_provenance(plan)):
            return state(CopyStatus.CURRENT)
        return state(CopyStatus.FOREIGN, "names no source: not written by sweeper")
    if made_from.same_version(provenance) and torchzip.same_content(archive, plan):
        return state(CopyStatus.CURRENT)  # (made here, or in a folder since copied: the same)
    if made_from.name != provenance.name:
        return state(CopyStatus.FOREIGN, f"a copy of {made_from.name!r}")
    try:
        aside = superseded_name(provenance.name, made_from, names)
    except FileRefused as error:
        return state(CopyStatus.FOREIGN, error.reason)
    return CopyState(
        name,
        CopyStatus.STALE,
        "made from an earlier version of this file",
        info.st_size,
        identity,
        made_here=made_from.folder == provenance.folder,
        aside=aside,
        # probed only here: a pin matters only to a stale copy (it is then kept aside)
        pinned=name + KEEP_SUFFIX in names or _flock_held(fd),
    )


def _flock_held(fd: int) -> bool:
    """True when another process holds a flock on the file (a user's pin, as systemd-tmpfiles
    honours it).  Probing takes and drops a non-blocking exclusive lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


class ScanCache:
    """What parsing a file found, by identity, for a long-running daemon: a checkpoint whose
    inode, size, mtime and ctime are unchanged, with its copy's unchanged too, is not parsed
    again on every rescan.  Entries not met by a full scan are dropped (``prune``)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[object, ...], dict[str, Any]] = {}
        self._seen: set[tuple[object, ...]] = set()

    def get(self, key: tuple[object, ...]) -> dict[str, Any] | None:
        found = self._entries.get(key)
        if found is not None:
            self._seen.add(key)
        return found

    def get_many(self, keys: list[tuple[object, ...]]) -> list[dict[str, Any] | None]:
        return [self.get(key) for key in keys]

    def put(self, key: tuple[object, ...], found: dict[str, Any]) -> None:
        self._entries[key] = found
        self._seen.add(key)

    def prune(self) -> None:
        self._entries = {k: v for k, v in self._entries.items() if k in self._seen}
        self._seen = set()


# What keeps classification results across scans: the daemon's in-memory one, or the
# persistent one (sweeper.scan_cache) sweeps, timers and the daemon share.
Cache = ScanCache | PersistentCache


# A file's key in the scan cache, and what the cache holds under it (None: not known).
_Known = tuple[tuple[object, ...], dict[str, Any] | None]


def _cache_key(
    name: str, info: os.stat_result, copy: os.stat_result | None
) -> tuple[object, ...]:
    """A file's key in the scan cache: its name, its identity and its copy's (None: none)."""
    return (name, _identity(info), None if copy is None else _identity(copy))


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class _Probes:
    writers: _OpenForWriting
    cache: Cache | None
    read: _Read = _read_here  # what reads a file's contents: here, or a FileReader's worker

    def known(self, wanted: list[Listed], entries: list[Listed]) -> dict[str, _Known]:
        """The cache's key and answer for each file of ``wanted`` by its listed identity and
        its copy's (from ``entries``, the same listing), in one lookup for the folder."""
        if self.cache is None or not wanted:
            return {}
        infos = {entry.name: entry.info for entry in entries}
        keys = [
            _cache_key(e.name, e.info, infos.get(output_name(e.name, Mode.INFERENCE)))
            for e in wanted
        ]
        answers = self.cache.get_many(keys)
        return {str(key[0]): (key, found) for key, found in zip(keys, answers, strict=True)}

    def cache_key(
        self, dir_fd: int, name: str, info: os.stat_result, names: set[str]
    ) -> tuple[object, ...]:
        if self.cache is None:
            return ()
        copy_name = output_name(name, Mode.INFERENCE)
        if copy_name not in names:
            return _cache_key(name, info, None)
        try:
            return _cache_key(name, info, os.stat(copy_name, dir_fd=dir_fd, follow_symlinks=False))
        except OSError:
            return (name, _identity(info), (-1,))  # listed, and gone: no answer can match


class _OpenForWriting:
    """Whether any process holds a file open: for writing, or at all.

    First choice is a lease (``F_SETLEASE``): the kernel grants a read lease only while no one
    has the file open for writing, and a write lease only while no one else has it open at all.
    Where leases are refused (not the owner and no CAP_LEASE, network filesystems) it falls
    back to one scan of ``/proc/*/fdinfo`` per sweep.
    """

    def __init__(self) -> None:
        self._proc: tuple[set[tuple[int, int]], set[tuple[int, int]]] | None = None

    def held(self, fd: int, info: os.stat_result) -> str | None:
        """ "writing", "open" (by some other process, for reading), or None."""
        # A write lease is granted only while no other open file description exists: the
        # usual answer in one probe.  Refused, a read lease tells a writer from a reader.
        anyone = lease_conflict(fd, fcntl.F_WRLCK)
        if anyone is False:
            return None
        if anyone:
            writer = lease_conflict(fd, fcntl.F_RDLCK)
            if writer is not None:
                return "writing" if writer else "open"
        if self._proc is None:  # leases refused here: ask /proc, once per sweep
            self._proc = opened_by_processes(exclude_self=True)
        opened, writing = self._proc
        key = (info.st_dev, info.st_ino)
        return "writing" if key in writing else "open" if key in opened else None
