"""What a plan needs of the filesystem, checked before anything is done: the dry run's figure
is then what the real run reclaims, and a folder sweeper may not write in is a plan entry, not
five failures.

Planning itself stays pure; this looks at the folders a plan would write in (with sweeper's
effective ids, as the real run will act) and turns the entries it could not carry out into
``skip`` entries that say why.  Also here: which skipped entries are *refused* files, the
ones a sweep's exit status counts (1).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable, Iterable, Iterator

from sweeper.inventory import FolderRef
from sweeper.plan import PlanEntry, SweepPlan
from sweeper.policy import Action

__all__ = ["FolderAccess", "check_entries", "check_plan", "is_refused", "refused_count"]

_WRITES = (Action.EXTRACT, Action.REFRESH, Action.DELETE)
CANNOT_WRITE = "skipped: cannot write in "
# Reasons of files sweeper could not read, refused when it did (a hostile or oversized pickle),
# or could not act on: a sweep that leaves any of them finishes with exit status 1.
_REFUSED = ("skipped: refused", "skipped: cannot open", "skipped: unreadable", CANNOT_WRITE)


class FolderAccess:
    """Whether this process, with its effective ids, may create and unlink files in a folder.

    One answer per folder per run (a cache keyed by the folder's identity).  ``access`` is
    ``os.access`` with effective ids, which also says no on a read-only mount.
    """

    def __init__(
        self,
        euid: int | None = None,
        access: Callable[[str], bool] | None = None,
    ) -> None:
        self._euid = os.geteuid() if euid is None else euid
        self._access = access or _may_write
        self._answers: dict[tuple[int, int], tuple[bool, int, int]] = {}

    def why_not(self, entry: PlanEntry) -> str | None:
        """Why ``entry`` could not be carried out in its folder, or None when it could.  A
        checkpoint folder's demotion deletes inside it (and its training subfolders)."""
        for folder in _folders_written(entry):
            writable, mode, owner = self._folder(folder)
            if not writable:
                return f"{CANNOT_WRITE}{folder.display}"
            if (
                entry.action is Action.DELETE
                and mode & stat.S_ISVTX
                and self._euid not in (0, owner, entry.uid)
            ):
                # A sticky folder (like /tmp): only the file's or the folder's owner may unlink.
                return f"{CANNOT_WRITE}{folder.display} (sticky; it may only delete its own files)"
        return None

    def _folder(self, folder: FolderRef) -> tuple[bool, int, int]:
        key = (folder.dev, folder.ino)
        answer = self._answers.get(key)
        if answer is None:
            try:
                info = os.stat(folder.display, follow_symlinks=False)
            except OSError:
                answer = (False, 0, -1)
            else:
                answer = (self._access(folder.display), info.st_mode, info.st_uid)
            self._answers[key] = answer
        return answer


def _folders_written(entry: PlanEntry) -> list[FolderRef]:
    if entry.layout is None or entry.action is not Action.DELETE:
        return [entry.folder]
    top = entry.folder
    inside = FolderRef(
        top.prefix,
        (*top.components, entry.name),
        entry.dev,
        entry.ino,
        os.path.join(top.display, entry.name),
    )
    below = [
        FolderRef(
            inside.prefix,
            (*inside.components, sub.name),
            sub.dev,
            sub.ino,
            os.path.join(inside.display, sub.name),
        )
        for sub in entry.layout.folders
    ]
    return [inside, *below]


def _may_write(path: str) -> bool:
    return os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids)


def check_entries(
    entries: Iterable[PlanEntry], access: FolderAccess | None = None
) -> Iterator[PlanEntry]:
    """``entries``, each one that writes or deletes where it may not turned into a ``skip``
    that says so (nothing written, deleted or reclaimed)."""
    access = access or FolderAccess()
    for entry in entries:
        if entry.action not in _WRITES:
            yield entry
            continue
        reason = access.why_not(entry)
        if reason is None:
            yield entry
            continue
        yield dataclasses.replace(
            entry,
            action=Action.SKIP,
            reason=reason,
            output=None,
            bytes_written=0,
            bytes_deleted=0,
            extract_first=False,
            needs=(),
            replaces=None,
            keep_as=None,
        )


def check_plan(plan: SweepPlan, access: FolderAccess | None = None) -> SweepPlan:
    """``plan`` with :func:`check_entries` applied."""
    return dataclasses.replace(plan, entries=tuple(check_entries(plan.entries, access)))


def is_refused(entry: PlanEntry) -> bool:
    """A file sweeper was meant to look at but could not read, refused, or could not act on."""
    return entry.action is Action.SKIP and entry.reason.startswith(_REFUSED)


def refused_count(entries: Iterable[PlanEntry]) -> int:
    return sum(1 for entry in entries if is_refused(entry))
