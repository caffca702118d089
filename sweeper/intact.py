"""Intact means verified: the full checkpoints a deletion counts on are read in full first.

Planning reads only each file's directory and pickle, and a bit-flipped tensor record passes
that (``torch.load`` accepts it silently too).  A file that justifies deleting others (one kept
by a keep rule) must have had every record's CRC checked.  This step does it lazily: it asks
the pure policy what it would delete, verifies only the unverified files those deletions count
on, marks any corrupt one unusable, and asks again, until every deletion rests on verified
files.  Results are remembered per file identity, so a daemon does not re-read kept files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections import OrderedDict

from sweeper import policy, torchzip
from sweeper.errors import FileRefused
from sweeper.extract import open_regular
from sweeper.formats import layouts
from sweeper.inventory import FileEntry, FolderRef, Inventory, RunFolder, open_folder
from sweeper.plan import Decided, to_candidates
from sweeper.policy import Rules
from sweeper.scan_cache import PersistentCache

log = logging.getLogger(__name__)

_Identity = tuple[int, int, int, int]


class Verifier:
    """Reads every record of a file and checks its CRC, once per file identity (device, inode,
    size, mtime): ``None`` when intact, else the problem in words."""

    def __init__(self, remember: int = 100_000, store: PersistentCache | None = None) -> None:
        self._known: OrderedDict[_Identity, str | None] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()  # the daemon's workers share one
        # The persistent scan cache: files found intact by an earlier run are not read again.
        self._store = store

    def check(self, folder: _OpenedOnce, file: FileEntry) -> str | None:
        identity = (file.dev, file.ino, file.size, file.mtime_ns)
        if file.layout is not None:  # a checkpoint folder: the identity of every part
            identity = (file.dev, file.ino, file.size, hash(file.layout.parts))
        with self._lock:
            if identity in self._known:
                self._known.move_to_end(identity)
                return self._known[identity]
        store = self._store if file.layout is None else None
        with_ctime = (*identity, file.ctime_ns)
        if store is not None and store.verified(*with_ctime):
            return None
        try:
            problem = _read_all_records(folder.fd(), file, identity)
        except _Unsettled as error:  # not the file that was scanned: say so, remember nothing
            return str(error)
        if problem is None and store is not None:
            store.mark_verified(*with_ctime)
        with self._lock:
            self._known[identity] = problem
            if len(self._known) > self._remember:
                self._known.popitem(last=False)
        return problem


class _Unsettled(Exception):
    pass


class _OpenedOnce:
    """A run folder opened on first need, and then once for all its files."""

    def __init__(self, folder: FolderRef) -> None:
        self._folder = folder
        self._fd: int | None = None

    def fd(self) -> int:
        if self._fd is None:
            try:
                self._fd = open_folder(self._folder)
            except (OSError, FileRefused) as error:
                reason = error.reason if isinstance(error, FileRefused) else error.strerror
                raise _Unsettled(f"cannot open its folder to verify it: {reason}") from None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_all_records(dir_fd: int, file: FileEntry, identity: _Identity) -> str | None:
    if file.layout is not None:
        return _read_folder(dir_fd, file, file.layout)
    try:
        fd, info = open_regular(file.name, dir_fd, file.display)
    except FileRefused as error:
        raise _Unsettled(error.reason) from None
    try:
        if (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns) != identity:
            raise _Unsettled("changed since it was scanned")
        archive = torchzip.read_archive(fd, file.display)
        torchzip.verify_records(fd, archive, file.display)
    except FileRefused as error:
        return error.reason
    except OSError as error:
        return f"read error while verifying: {error.strerror or error}"
    finally:
        os.close(fd)
    return None


def _read_folder(dir_fd: int, file: FileEntry, layout: layouts.FolderCheckpoint) -> str | None:
    """Every file that makes a checkpoint folder resumable, checked as far as its format
    allows (see ``layouts.verify_part``)."""
    try:
        fd = os.open(file.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as error:
        raise _Unsettled(f"cannot open it: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (file.dev, file.ino):
            raise _Unsettled("replaced since it was scanned")
        layouts.verify_parts(fd, (*layout.weights, *layout.training), file.display)
    except FileRefused as error:
        if error.reason == "changed since it was scanned":
            name = os.path.basename(error.path)
            raise _Unsettled(f"{name} changed since it was scanned") from None
        return f"{os.path.relpath(error.path, file.display)}: {error.reason}"
    except OSError as error:
        return f"read error while verifying: {error.strerror or error}"
    except Exception as error:  # (a hostile part): refused, never fatal to the sweep
        return f"unreadable: {type(error).__name__}: {error}"
    finally:
        os.close(fd)
    return None


def verify_run(run: RunFolder, rules: Rules, *, now_ns: int, verifier: Verifier) -> RunFolder:
    """``run`` with every full checkpoint that a planned deletion counts on verified: marked
    ``verified``, or made unusable (``problem``) when it is corrupt, so that planning ``run``
    never deletes a file because a corrupt one was counted as a newer intact copy."""
    return verified_decisions(run, rules, now_ns=now_ns, verifier=verifier)[0]


def verified_decisions(
    run: RunFolder, rules: Rules, *, now_ns: int, verifier: Verifier
) -> tuple[RunFolder, Decided | None]:
    """:func:`verify_run`, and the candidates and decisions it ended on when they are those of
    the run it returns (its last decision needed no file read): ``plan_run`` need not decide
    again."""
    files = {file.name: file for file in run.files}
    folder = _OpenedOnce(run.folder)
    decided: Decided | None = None
    changed = False
    try:
        while True:
            candidates = to_candidates(files.values())
            decisions = policy.decide(candidates, rules, now_ns=now_ns, folder_uid=run.owner_uid)
            todo = policy.needs_verification(candidates, decisions)
            if not todo:
                decided = (tuple(candidates), decisions)
                break
            corrupt = False
            changed = True
            for name in sorted(todo):
                file = files[name]
                problem = verifier.check(folder, file)
                if problem is None:
                    files[name] = dataclasses.replace(file, verified=True)
                else:
                    log.warning("%s: %s", file.display, problem)
                    files[name] = dataclasses.replace(file, problem=problem, kind=None)
                    corrupt = True
            if not corrupt:  # the same decisions, now resting on verified files
                break
    finally:
        folder.close()
    if changed:
        run = dataclasses.replace(run, files=tuple(files.values()))
    return run, decided


def verify_inventory(
    inventory: Inventory, rules: Rules, *, now_ns: int, verifier: Verifier
) -> Inventory:
    """:func:`verify_run` for every run folder of ``inventory``."""
    runs = tuple(verify_run(run, rules, now_ns=now_ns, verifier=verifier) for run in inventory.runs)
    return dataclasses.replace(inventory, runs=runs)
