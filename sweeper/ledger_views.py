"""Per-owner views of the ledger: each user's own records, readable by that user alone.

The ledger names every user's files, so it stays private to its owner (root under systemd).  So
that a user can still see what sweeper did to their files, a root writer appends every record about
a file owned by uid U (after the ledger line is written and fsynced) to that user's view as well::

    <ledger folder>/               0711 root  traversable, not listable
        ledger.jsonl               0600 root  every record
        ledger.jsonl.by-uid/       0711 root  traversable, not listable; only root adds entries
            1000/                  0500 uid 1000
                ledger.jsonl       0400 uid 1000  the same lines, for files uid 1000 owned

A view holds exactly the ledger's lines for that uid, so ``read_ledger`` reads it unchanged.  The
per-user folder keeps even a view's size and age from other users: they can see only that a folder
named for a uid exists.  The user owns their folder and view, so they may chmod, truncate or
replace what is inside: that can only spoil their own view, which is a convenience, not a record
(the ledger stays the proof).  What the writer guarantees in return is that root only ever writes
to a regular file owned by the record's uid, reached without following a symlink:

- every step is relative to an already opened folder, opened with ``O_NOFOLLOW``;
- the per-user folder and the view must be owned by the uid, anything else is refused; except
  what a creation cut short leaves: a root-owned per-user folder (only root adds entries to the
  views folder) is finished, and a root-owned file in the user's folder (which might also be a
  link the user made to a file of root's) is never given away but removed and made again;
- ``O_NONBLOCK`` on open, so neither a FIFO nor a lease the user takes on their view can hang it;
- a problem with a view is logged and never fails the ledger append, and so never the sweep.

Views are written only by a root writer (no one else can give a file to another user), and only
for records whose uid is not the ledger owner's: the owner reads the ledger itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from sweeper.errors import FileRefused

logger = logging.getLogger(__name__)

VIEWS_SUFFIX: Final = ".by-uid"
VIEW_NAME: Final = "ledger.jsonl"

VIEWS_DIR_MODE: Final = 0o711
USER_DIR_MODE: Final = 0o500
VIEW_FILE_MODE: Final = 0o400

_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_VIEW: Final = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def views_dir_for(ledger_path: str | os.PathLike[str]) -> str:
    """The folder that holds the per-owner views of ``ledger_path``."""
    return os.fspath(ledger_path) + VIEWS_SUFFIX


def view_path_for(ledger_path: str | os.PathLike[str], uid: int) -> str:
    """The view of ``ledger_path`` that holds the records of files owned by ``uid``."""
    return os.path.join(views_dir_for(ledger_path), str(uid), VIEW_NAME)


# --- writing --------------------------------------------------------------------------------------


def append_to_view(ledger_path: str, uid: int, line: bytes, *, ledger_owner: int) -> None:
    """Append ``line`` (one encoded ledger record about a file of ``uid``) to that uid's view.

    Call only after the line is durable in the ledger itself.  Never raises for a problem with
    the view: it is logged as a warning and the caller carries on.
    """
    if uid == ledger_owner or os.geteuid() != 0:
        return
    try:
        views = views_dir_for(ledger_path)
        with _open_views_dir(views) as views_fd, _user_dir(views_fd, views, uid) as user_fd:
            _append(user_fd, os.path.join(views, str(uid), VIEW_NAME), uid, line)
    except FileRefused as error:  # names the path it refused
        logger.warning("a ledger view was not updated (the ledger has the record): %s", error)
    except OSError as error:
        logger.warning(
            "a ledger view was not updated (the ledger has the record): %s: %s",
            view_path_for(ledger_path, uid),
            error.strerror or error,
        )


@contextlib.contextmanager
def _open_views_dir(path: str) -> Iterator[int]:
    """The views folder, made 0711 if missing; refused unless the writer's and closed to others."""
    created = _make_dir(path, None, VIEWS_DIR_MODE)
    fd = _open_no_follow(path, _OPEN_DIR, None, path)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise FileRefused(path, f"is owned by uid {info.st_uid}, not by the ledger's writer")
        if stat.S_IMODE(info.st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
            raise FileRefused(path, "is writable by others; sweeper writes no views into it")
        if stat.S_IMODE(info.st_mode) != VIEWS_DIR_MODE:
            # mkdir's mode went through the umask (0077 under the units), now or in a run that
            # stopped right after it: users must be able to pass through.
            os.fchmod(fd, VIEWS_DIR_MODE)
        if created:
            _fsync_dir(os.path.dirname(path) or ".")
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _user_dir(views_fd: int, views: str, uid: int) -> Iterator[int]:
    """The folder of ``uid``'s view, owned by that uid (0500), made if missing."""
    name = str(uid)
    shown = os.path.join(views, name)
    created = _make_dir(name, views_fd, USER_DIR_MODE)
    fd = _open_no_follow(name, _OPEN_DIR, views_fd, shown)
    try:
        info = os.fstat(fd)
        # Only the writer adds entries to the views folder, so a folder the writer owns is one
        # it made (now, or in a run stopped before the chown): finish it.
        if created or info.st_uid == os.geteuid():
            os.fchmod(fd, USER_DIR_MODE)
            os.fchown(fd, uid, -1)
            os.fsync(views_fd)
        elif info.st_uid != uid:
            raise FileRefused(shown, f"is owned by uid {info.st_uid}, not {uid}")
        yield fd
    finally:
        os.close(fd)


def _append(user_fd: int, shown: str, uid: int, line: bytes) -> None:
    fd = _open_view(user_fd, shown, uid)
    try:
        size = os.fstat(fd).st_size
        # The user may have left a line without its end: start ours on a line of its own.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(errno.EIO, f"short write: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_view(user_fd: int, shown: str, uid: int) -> int:
    """The view file in its user's folder, opened for appending: made 0400 and given to ``uid``
    if missing; refused unless it is a regular file ``uid`` owns."""
    for _ in range(2):
        try:
            fd = _open_no_follow(
                VIEW_NAME, _OPEN_VIEW | os.O_CREAT | os.O_EXCL, user_fd, shown, VIEW_FILE_MODE
            )
        except FileExistsError:
            fd = _open_no_follow(VIEW_NAME, _OPEN_VIEW, user_fd, shown)
        else:
            try:
                os.fchmod(fd, VIEW_FILE_MODE)
                os.fchown(fd, uid, -1)
                os.fsync(user_fd)
            except BaseException:
                os.close(fd)
                raise
            return fd
        try:
            info = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISREG(info.st_mode) and info.st_uid == uid:
            return fd
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(shown, "is not a regular file")
        if info.st_uid != os.geteuid():
            raise FileRefused(shown, f"is owned by uid {info.st_uid}, not {uid}")
        # Ours: a creation stopped before the chown, or a link the user made to a file of ours.
        # Never give it away; remove that name (only the user's folder changes) and start again.
        os.unlink(VIEW_NAME, dir_fd=user_fd)
    raise FileRefused(shown, "keeps reappearing owned by the writer")


def _make_dir(name: str, dir_fd: int | None, mode: int) -> bool:
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        return False
    return True


def _open_no_follow(
    name: str, flags: int, dir_fd: int | None, shown: str, mode: int = 0o777
) -> int:
    """Open ``name`` (relative to ``dir_fd``) without following a symlink there; ``shown`` is its
    full path, for messages."""
    try:
        return os.open(name, flags, mode, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileRefused(shown, "is a symlink; sweeper refuses to follow it") from None
        if error.errno == errno.ENOTDIR:
            raise FileRefused(shown, "is not a directory") from None
        if error.errno in (errno.EISDIR, errno.ENXIO):  # a directory, or a socket
            raise FileRefused(shown, "is not a regular file") from None
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerSource:
    """What a caller reads for ``sweeper ledger``: the whole ledger, or their own view of it.

    ``view_of`` is the caller's uid when ``path`` is their view, None for the whole ledger;
    ``exists`` says whether that view has been written yet.
    """

    ledger: str
    path: str
    view_of: int | None
    exists: bool


def source_for(ledger_path: str | os.PathLike[str], uid: int) -> LedgerSource:
    """The whole ledger for root, for its owner and while there is none; else ``uid``'s view.

    Raises ``FileRefused`` when the caller can reach neither (a folder above the ledger is closed
    to them).
    """
    ledger = os.fspath(ledger_path)
    whole = LedgerSource(ledger=ledger, path=ledger, view_of=None, exists=True)
    if uid == 0:
        return whole
    try:
        info = os.lstat(ledger)
    except FileNotFoundError:
        return whole  # nothing written yet: it reads as empty, as it always has
    except PermissionError:
        pass  # the ledger's folder is closed to the caller: their view may still be reachable
    else:
        if info.st_uid == uid:
            return whole
    view = view_path_for(ledger, uid)
    try:
        os.lstat(view)
    except FileNotFoundError:
        return LedgerSource(ledger=ledger, path=view, view_of=uid, exists=False)
    except PermissionError:
        raise FileRefused(
            ledger,
            "is private, and the folder of your own view of it is closed to you "
            f"(ask the admin to make the folders above {view} traversable, e.g. mode 0711)",
        ) from None
    return LedgerSource(ledger=ledger, path=view, view_of=uid, exists=True)
