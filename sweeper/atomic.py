"""Small files sweeper rewrites whole (the daemon's status, the metrics textfile), each
appearing atomically: a temporary file in the same folder, fsynced, renamed over the old one,
and the folder fsynced.  A reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat

__all__ = ["remove_stale_temps", "write_atomically"]

_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _temp_prefix(path: str) -> tuple[str, str]:
    folder, name = os.path.split(path)
    return folder, f".{name}.tmp-"


def remove_stale_temps(path: str | os.PathLike[str]) -> int:
    """Remove the temporary files a writer of ``path`` killed mid-write left beside it (only
    regular files of this process's owner, by their exact name pattern); how many were removed.
    Call it only where no other writer of ``path`` can be at work (the daemon, at start, under
    its instance lock)."""
    folder, prefix = _temp_prefix(os.fspath(path))
    removed = 0
    try:
        names = [n for n in os.listdir(folder or ".") if n.startswith(prefix)]
    except OSError:
        return 0
    for name in names:
        temp = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            info = os.lstat(temp)
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                os.unlink(temp)
                removed += 1
    return removed


def write_atomically(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``, permission bits exactly ``mode`` (whatever the umask:
    the metrics must stay readable by node_exporter under the units' ``UMask=0077``)."""
    path = os.fspath(path)
    folder, prefix = _temp_prefix(path)
    # O_EXCL on a fresh random name: a symlink or file planted under the temp name is never
    # followed or reused.
    temp = os.path.join(folder, prefix + secrets.token_hex(4))
    fd = os.open(temp, _OPEN_NEW, 0o600)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    directory = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
