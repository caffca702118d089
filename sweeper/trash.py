"""The undo window: demoted checkpoints held in a trash folder before they are purged.

With ``undo_seconds`` above 0 a demoted full checkpoint is not unlinked: it is renamed (same
filesystem, one step, never over a file) into ``.sweeper-trash/`` at the top of its root
folder, beside a manifest entry (``KEY.json``: where it was, its owner, size and identity, when,
by which run), and unlinked once the window has passed.  ``sweeper restore`` renames it back.

The trash is sweeper's own: created with sweeper's owner and mode 0700, so no user can plant or
take anything in it, and opened relative to its root folder's descriptor without following a
symlink, then checked (owner, mode, same filesystem as its root) before every use.  A trash that
fails the check is refused: nothing is moved into it, purged from it or restored out of it.

Crash safety: a manifest entry is written (atomically) before its file is moved in and removed
after its file is purged or restored, so a manifest entry without its file is a step that never
happened or whose other half did (:func:`tidy` removes it; the file is where its folder or the
ledger says); the ledger's intents (``trash-intent``, ``purge-intent``) are reconciled by
:mod:`sweeper.journal` from the tree.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from sweeper.errors import FileRefused
from sweeper.extract import FileIdentity, _rename_no_replace
from sweeper.inventory import (
    TRASH_NAME,
    FolderRef,
    expand_root,
    open_below,
    open_folder,
    split_root,
)

__all__ = [
    "TRASH_NAME",
    "TrashItem",
    "drop_manifest",
    "held",
    "holds",
    "list_held",
    "new_key",
    "open_root_folder",
    "open_trash",
    "purge_item",
    "put_manifest",
    "restore_item",
    "tidy",
    "tidy_all",
    "trash_folders",
]

log = logging.getLogger(__name__)

_MANIFEST = ".json"
_TEMP = ".tmp"
_MODE = 0o700
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class TrashItem:
    """One file held in a trash folder, as its manifest entry says."""

    key: str  # its name in the trash (its manifest is KEY.json)
    top: str  # the root folder whose trash holds it
    root: str  # the configured root (ledger records name it)
    path: str  # where it was
    folder: tuple[str, ...]  # its folder's names below ``top``
    folder_id: tuple[int, int]  # that folder's (dev, ino)
    name: str
    uid: int
    identity: tuple[int, int, int, int]  # (dev, ino, size, mtime_ns)
    trashed: float  # Unix seconds
    purge_after: float  # Unix seconds
    run_id: str

    @property
    def size(self) -> int:
        return self.identity[2]

    @property
    def trash_path(self) -> str:
        return os.path.join(self.top, TRASH_NAME, self.key)

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> TrashItem:
        """Raises ValueError for anything but an entry this version wrote."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        try:
            item = cls(
                key=str(data["key"]),
                top=str(data["top"]),
                root=str(data["root"]),
                path=str(data["path"]),
                folder=tuple(str(part) for part in data["folder"]),
                folder_id=(int(data["folder_id"][0]), int(data["folder_id"][1])),
                name=str(data["name"]),
                uid=int(data["uid"]),
                identity=tuple(int(n) for n in data["identity"]),  # type: ignore[arg-type]
                trashed=float(data["trashed"]),
                purge_after=float(data["purge_after"]),
                run_id=str(data["run_id"]),
            )
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"unexpected content ({error})") from None
        names = (item.key, item.name, *item.folder)
        if len(item.identity) != 4 or any(_not_a_name(name) for name in names):
            raise ValueError("not a trash entry")
        return item


def _not_a_name(name: str) -> bool:
    return not name or "/" in name or "\0" in name or name in (".", "..")


def open_root_folder(folder: FolderRef, root: str) -> tuple[int, str]:
    """The root folder ``folder`` lies in (for the configured ``root``), opened below its
    trusted prefix without following a symlink: (descriptor, path).  The glob components of a
    root match exactly one name each, so the root folder is the first of ``folder``'s names."""
    prefix, rest = split_root(root)
    names = folder.components[: len(rest)]
    fd = os.open(prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return open_below(fd, names), os.path.join(prefix, *names)


def open_trash(top_fd: int, top: str, *, create: bool) -> int | None:
    """The trash folder of the root folder open as ``top_fd``, checked: sweeper's owner, mode
    0700, on the root folder's filesystem.  None when there is none (and ``create`` is False).
    Raises FileRefused for a trash that fails the check (a symlink, someone else's folder)."""
    display = os.path.join(top, TRASH_NAME)
    if create:
        try:
            os.mkdir(TRASH_NAME, _MODE, dir_fd=top_fd)
        except FileExistsError:
            pass
        else:
            os.fsync(top_fd)
    try:
        fd = os.open(TRASH_NAME, _OPEN_DIR, dir_fd=top_fd)
    except FileNotFoundError:
        return None
    except OSError as error:  # ELOOP: a symlink; ENOTDIR: not a folder
        raise FileRefused(display, f"refused as the trash: {error.strerror}") from None
    try:
        info, top_info = os.fstat(fd), os.fstat(top_fd)
        if info.st_uid != os.geteuid():
            raise FileRefused(display, f"refused as the trash: owned by uid {info.st_uid}")
        if stat.S_IMODE(info.st_mode) != _MODE:
            raise FileRefused(
                display, f"refused as the trash: mode {stat.S_IMODE(info.st_mode):o}, not 700"
            )
        if info.st_dev != top_info.st_dev:
            raise FileRefused(display, "refused as the trash: on another filesystem")
    except BaseException:
        os.close(fd)
        raise
    return fd


def new_key(identity: FileIdentity, now_ns: int) -> str:
    """A name in the trash no other file there has had: the inode and the moment."""
    return f"{identity.ino}-{now_ns}"


def put_manifest(trash_fd: int, item: TrashItem) -> None:
    """Write ``item``'s manifest entry atomically (temp -> fsync -> rename -> fsync the trash)
    -- before its file is moved in."""
    final = item.key + _MANIFEST
    temp = final + _TEMP
    data = json.dumps(item.to_json(), sort_keys=True).encode() + b"\n"
    fd = os.open(
        temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=trash_fd
    )
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, final, src_dir_fd=trash_fd, dst_dir_fd=trash_fd)
    os.fsync(trash_fd)


def drop_manifest(trash_fd: int, key: str) -> None:
    try:
        os.unlink(key + _MANIFEST, dir_fd=trash_fd)
    except FileNotFoundError:
        return
    os.fsync(trash_fd)


def holds(trash_fd: int, key: str) -> bool:
    """Whether anything is in the trash under ``key``."""
    try:
        os.stat(key, dir_fd=trash_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _present(trash_fd: int, item: TrashItem) -> bool:
    """Whether the trash holds ``item``'s very file under its key."""
    try:
        info = os.stat(item.key, dir_fd=trash_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) == item.identity[:2]


def held(trash_fd: int) -> Iterator[TrashItem]:
    """The items the trash holds: each manifest entry whose file is there, oldest first.
    Reads only."""
    items = []
    for entry in os.scandir(trash_fd):
        if not entry.name.endswith(_MANIFEST) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=trash_fd)
            try:
                raw = os.read(fd, 1 << 16)
            finally:
                os.close(fd)
            item = TrashItem.from_json(json.loads(raw))
        except (OSError, ValueError, RecursionError):
            continue
        if item.key + _MANIFEST == entry.name and _present(trash_fd, item):
            items.append(item)
    yield from sorted(items, key=lambda item: (item.trashed, item.key))


def tidy(trash_fd: int) -> list[str]:
    """Remove the manifest entries whose file is not in the trash (a crash came between writing
    one and moving its file in, or between purging or restoring a file and removing its entry)
    and leftover temporary entries; returns their keys.  Callers hold the action lock and have
    reconciled the journal first.  A trash another sweep is moving a file into (it holds a
    shared flock on it: another ledger's sweep over the same root) is left for later."""
    try:
        fcntl.flock(trash_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return []
    removed = []
    for entry in os.scandir(trash_fd):
        name = entry.name
        if name.endswith(_MANIFEST + _TEMP):
            os.unlink(name, dir_fd=trash_fd)
            removed.append(name)
            continue
        if not name.endswith(_MANIFEST):
            continue
        key = name[: -len(_MANIFEST)]
        try:
            os.stat(key, dir_fd=trash_fd, follow_symlinks=False)
        except FileNotFoundError:
            os.unlink(name, dir_fd=trash_fd)
            removed.append(key)
    if removed:
        os.fsync(trash_fd)
    return removed


def purge_item(trash_fd: int, item: TrashItem) -> None:
    """Unlink ``item``'s file if the trash still holds that very file, then its manifest entry.
    Callers record the intent in the ledger first."""
    if not _present(trash_fd, item):
        raise FileRefused(item.trash_path, "not in the trash any more; not purged")
    os.unlink(item.key, dir_fd=trash_fd)
    try:  # purged either way: what is left is a manifest entry the next run tidies
        os.fsync(trash_fd)
        drop_manifest(trash_fd, item.key)
    except OSError as error:
        log.warning("%s: purged; tidying its manifest entry failed: %s", item.path, error)


def restore_item(top_fd: int, trash_fd: int, item: TrashItem) -> None:
    """Move ``item``'s file back under its name, into the very folder it came from (reopened
    below the root folder without following a symlink), never over a file; then remove its
    manifest entry.  Owner, mode and mtime are the inode's own: a rename keeps them.

    Raises FileRefused when the folder is gone or replaced, or the name is taken."""
    if not _present(trash_fd, item):
        raise FileRefused(item.path, "not in the trash any more")
    start = os.dup(top_fd)
    try:
        fd = open_below(start, item.folder)
    except OSError as error:
        why = f"not restored: its folder is gone ({error.strerror})"
        raise FileRefused(item.path, why) from None
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != item.folder_id:
            raise FileRefused(item.path, "not restored: its folder is gone (replaced since)")
        try:
            _rename_no_replace(trash_fd, item.key, item.name, fd)
        except FileExistsError:
            raise FileRefused(item.path, "not restored: the name is taken") from None
        try:  # restored either way: what is left is a manifest entry the next run tidies
            os.fsync(fd)
            os.fsync(trash_fd)
            drop_manifest(trash_fd, item.key)
        except OSError as error:
            log.warning("%s: restored; tidying its manifest entry failed: %s", item.path, error)
    finally:
        os.close(fd)


def trash_folders(roots: tuple[str, ...]) -> Iterator[tuple[str, FolderRef]]:
    """(configured root, root folder) for every root folder the configured roots name now."""
    for root in roots:
        try:
            folders = list(expand_root(root))
        except OSError:
            continue
        for folder in folders:
            yield root, folder


def list_held(
    roots: tuple[str, ...],
) -> tuple[list[tuple[FolderRef, TrashItem]], list[tuple[str, str]]]:
    """Every item the trash folders of ``roots`` hold, with its root folder, oldest first; and
    (path, why) for each trash folder refused (see :func:`open_trash`).  Reads only."""
    found: list[tuple[FolderRef, TrashItem]] = []
    refused: list[tuple[str, str]] = []
    for _, top in trash_folders(roots):
        try:
            top_fd = open_folder(top)
        except (OSError, FileRefused):
            continue
        try:
            trash_fd = open_trash(top_fd, top.display, create=False)
            if trash_fd is None:
                continue
            try:
                found.extend((top, item) for item in held(trash_fd))
            finally:
                os.close(trash_fd)
        except FileRefused as error:
            refused.append((error.path, error.reason))
        except OSError as error:
            refused.append((os.path.join(top.display, TRASH_NAME), str(error.strerror)))
        finally:
            os.close(top_fd)
    found.sort(key=lambda pair: (pair[1].trashed, pair[1].key))
    return found, refused


def tidy_all(roots: tuple[str, ...]) -> None:
    """:func:`tidy` every trash folder of ``roots`` that passes its check.  Only under the action
    lock held exclusively, after the journal is reconciled: a run sharing the lock may be between
    writing a manifest entry and moving its file in."""
    for _, top in trash_folders(roots):
        try:
            top_fd = open_folder(top)
        except (OSError, FileRefused):
            continue
        try:
            trash_fd = open_trash(top_fd, top.display, create=False)
            if trash_fd is not None:
                try:
                    tidy(trash_fd)
                finally:
                    os.close(trash_fd)
        except (OSError, FileRefused):
            continue  # refused: said when it is listed
        finally:
            os.close(top_fd)
