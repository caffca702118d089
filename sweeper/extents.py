"""Shared extents: giving one file's blocks to another without copying them (``FICLONERANGE``),
and measuring how much of a file shares its blocks (``FIEMAP``).

XFS (``reflink=1``) and btrfs share blocks between files; ext4, tmpfs and NFS do not.  Whether a
pair of files can share is learnt by trying, never guessed from a filesystem's name: a clone the
filesystem cannot do raises :class:`CannotShare`, and the caller copies instead.  Nothing here
knows what the files hold.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

# linux/fs.h: _IOW(0x94, 13, struct file_clone_range) and _IOWR('f', 11, struct fiemap).
_FICLONERANGE = 0x4020940D
_FS_IOC_FIEMAP = 0xC020660B
_CLONE_RANGE = struct.Struct("=qQQQ")  # src_fd, src_offset, src_length, dest_offset
_FIEMAP = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
_EXTENT_SHARED = 0x2000
_EXTENTS_PER_CALL = 256

# What a filesystem (or a pair of files on different ones) answers when it cannot share blocks,
# or not these: EINVAL also says "not aligned to this filesystem's blocks".
_CANNOT_SHARE = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.ETXTBSY}
)


class CannotShare(Exception):
    """These two files cannot share blocks (another filesystem, or one that never shares)."""


def clone_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    """Make ``length`` bytes of ``dst_fd`` at ``dst_offset`` the very blocks of ``src_fd`` at
    ``src_offset`` (both offsets and the length multiples of :func:`block_size`): no data is
    read or written, and the blocks stay shared until one side is rewritten (copy on write).

    Raises :class:`CannotShare` where the filesystem cannot, ``OSError`` for real failures
    (``ENOSPC`` for the metadata, ``EIO``): the range is then left as it was, or a hole.
    """
    request = _CLONE_RANGE.pack(src_fd, src_offset, length, dst_offset)
    try:
        fcntl.ioctl(dst_fd, _FICLONERANGE, request)
    except OSError as error:
        if error.errno in _CANNOT_SHARE:
            raise CannotShare(error.strerror) from None
        raise


def block_size(fd: int) -> int:
    """The unit of sharing on ``fd``'s filesystem: its fundamental block size."""
    return os.fstatvfs(fd).f_frsize or 4096


def shared_bytes(fd: int) -> int:
    """Bytes of ``fd``'s data the filesystem reports as shared with another file (``FIEMAP``
    extents flagged ``SHARED``, cut to the file's size); 0 where FIEMAP is not supported."""
    size = os.fstat(fd).st_size
    shared = 0
    start = 0
    while start < size:
        request = bytearray(_FIEMAP.size + _EXTENT.size * _EXTENTS_PER_CALL)
        _FIEMAP.pack_into(
            request, 0, start, size - start, _FIEMAP_FLAG_SYNC, 0, _EXTENTS_PER_CALL, 0
        )
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, request)
        except OSError as error:
            if error.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EBADR):
                return 0
            raise
        mapped = _FIEMAP.unpack_from(request, 0)[3]
        if mapped == 0:
            break
        for index in range(mapped):
            fields = _EXTENT.unpack_from(request, _FIEMAP.size + index * _EXTENT.size)
            logical, length, flags = fields[0], fields[2], fields[5]
            if flags & _EXTENT_SHARED:
                shared += max(0, min(logical + length, size) - max(logical, start))
            start = max(start, logical + length)
            if flags & _EXTENT_LAST:
                return shared
    return shared
