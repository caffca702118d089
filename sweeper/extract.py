"""Extraction on disk: open safely, write atomically, verify, and only then replace or delete.

Everything here works relative to directory descriptors so that the sweep and the daemon, which
walk user-controlled trees, can never be redirected by a symlink swapped in mid-run.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sweeper import torchzip
from sweeper.errors import FileRefused, NotConfirmed
from sweeper.torchzip import Checkpoint, Mode

log = logging.getLogger(__name__)

TEMP_MARK = ".sweeper-tmp-"
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_FILE_TYPES = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFLNK: "a symlink",
}


# Extensions of more than one part: timm's ``checkpoint-3.pth.tar`` is a .pth.tar file.
_DOUBLE_EXTENSIONS = (".pth.tar",)


def split_extension(name: str) -> tuple[str, str]:
    """``epoch_3.pt`` -> (``epoch_3``, ``pt``); ``checkpoint-3.pth.tar`` -> (``checkpoint-3``,
    ``pth.tar``); a name without one -> (the name, ``pt``)."""
    for extension in _DOUBLE_EXTENSIONS:
        if name.endswith(extension) and len(name) > len(extension):
            return name[: -len(extension)], extension[1:]
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        return name, "pt"
    return stem, suffix


def output_name(source_name: str, mode: Mode) -> str:
    """``best_model.pt`` -> ``best_model_inference.pt`` (or ``_weights.pt``), as the seed guide's
    extract_weights.py names them; the source's extension is kept (``checkpoint-3.pth.tar`` ->
    ``checkpoint-3_inference.pth.tar``)."""
    stem, suffix = split_extension(source_name)
    return f"{stem}_{mode.value}.{suffix}"


_NAME_MAX = 255  # bytes, on every filesystem a checkpoint lives on


def superseded_name(source_name: str, made_from: torchzip.Provenance, taken: set[str]) -> str:
    """Where a stale copy of an earlier version of ``source_name`` is kept when a fresh copy
    takes its name: ``epoch_1.pt`` -> ``epoch_1.superseded-20261129T2145-1a2b3c4d_inference.pt``
    (the old version's mtime and pickle CRC; ``-2``, ``-3``... when ``taken`` holds it already):
    still sweeper's output, never the copy of a file of that name, never longer than NAME_MAX."""
    stem, suffix = split_extension(source_name)
    written = time.strftime("%Y%m%dT%H%M", time.gmtime(made_from.mtime_ns // 1_000_000_000))
    mark = f"superseded-{written}-{made_from.pickle_crc32:08x}"
    for number in range(1, 1000):
        tail = f".{mark}{'' if number == 1 else f'-{number}'}_{Mode.INFERENCE.value}.{suffix}"
        room = _NAME_MAX - len(os.fsencode(tail))
        name = _cut_bytes(stem, max(room, 1)) + tail
        if name not in taken:
            return name
    raise FileRefused(source_name, "no free name to keep its stale copy under")


def is_sweeper_output(name: str) -> bool:
    stem = split_extension(name)[0] if "." in name else ""
    return stem.endswith(("_inference", "_weights"))


def is_sweeper_temp(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def _temp_name(target: str) -> str:
    """``.NAME.sweeper-tmp-XXXXXXXXXXXX``, NAME cut to 200 bytes (not characters: a name of
    80 CJK characters is 240 bytes) so the whole stays within NAME_MAX."""
    return f".{_cut_bytes(target, 200)}{TEMP_MARK}{secrets.token_hex(6)}"


def _cut_bytes(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes, at a character boundary when it is UTF-8
    (filesystems that enforce UTF-8 names refuse half a character)."""
    raw = os.fsencode(name)
    if len(raw) <= limit:
        return name
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return os.fsdecode(raw[:limit])
    return raw[:limit].decode("utf-8", "ignore")


def describe_mode(st_mode: int) -> str:
    return _FILE_TYPES.get(stat.S_IFMT(st_mode), "not a regular file")


def open_regular(name: str, dir_fd: int | None, display: str) -> tuple[int, os.stat_result]:
    """Open ``name`` for reading without following a symlink, blocking on a FIFO, or accepting
    anything but a regular file; returns the descriptor and its ``fstat``."""
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise FileRefused(display, "is a symlink; sweeper never follows symlinks") from None
        if error.errno == errno.ENXIO:  # a socket
            raise FileRefused(display, "not a regular file (a socket)") from None
        raise FileRefused(display, f"cannot open: {error.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FileRefused(display, f"not a regular file ({describe_mode(info.st_mode)})")
    return fd, info


# A file this big whose allocated blocks are under a quarter of its size is mostly holes:
# copying its records would write every hole out in full, on a disk root pays for.
_SPARSE_MIN_BYTES = 16 * 1024 * 1024
_SPARSE_RATIO = 4
_HEADROOM_BYTES = 1024 * 1024  # what a copy must leave free: the ledger's own minimum


def sparse_problem(info: os.stat_result) -> str | None:
    """Why a source is refused for being sparse, or None.  A user can make an 8 KB file that
    claims 1.5 GB of valid (zero) records; extracting it would turn root into a disk filler."""
    allocated = info.st_blocks * 512
    if info.st_size >= _SPARSE_MIN_BYTES and allocated * _SPARSE_RATIO < info.st_size:
        return (
            f"refused: a sparse file ({allocated} of {info.st_size} bytes allocated); "
            "its copy would write the holes out in full"
        )
    return None


def expansion_problem(info: os.stat_result, output_bytes: int) -> str | None:
    """Why a copy of ``output_bytes`` is refused for the file ``info`` describes, or None: root
    never writes more for a user than that user's file occupies on disk.  A real checkpoint
    occupies at least its size and its copy is a fraction of it; a file that claims records in
    its holes (or compresses to nothing) would make root fill the disk with them."""
    allocated = info.st_blocks * 512
    if output_bytes > allocated:
        return (
            f"refused: its copy ({output_bytes} bytes) would take more space than the file "
            f"itself occupies ({allocated} of {info.st_size} bytes allocated: a sparse file)"
        )
    return None


RESERVE_NOTE = " (root's reserve is not used)"


def _require_room(target: Located, size: int, *, frees: int = 0) -> None:
    """The copy must fit in the space left to ordinary users, with room for the ledger after
    it: root's reserved blocks are the system's, not a user's checkpoints'.  A copy written
    only to let its larger source be deleted right after (``frees``: the source's size, on
    the same filesystem) may borrow from the reserve: on a disk users filled, that is how
    space comes back."""
    try:
        vfs = os.fstatvfs(target.dir_fd)
    except OSError:
        return  # the write itself still fails cleanly on a full disk
    borrow = frees > size
    available = (vfs.f_bfree if borrow else vfs.f_bavail) * vfs.f_frsize
    if size + _HEADROOM_BYTES > available:
        raise FileRefused(
            target.display,
            f"disk full: the {size}-byte copy needs {size + _HEADROOM_BYTES} bytes free to users "
            f"and {available} are{'' if borrow else RESERVE_NOTE}; nothing written",
        )


@dataclass(frozen=True)
class ExtractResult:
    """What one extraction did; bytes are apparent file sizes."""

    source: str
    output: str
    mode: Mode
    bytes_in: int
    bytes_out: int
    bytes_deleted: int
    seconds: float
    epoch: int | None
    metrics: tuple[tuple[str, float], ...]
    # Of bytes_out, those whose blocks are the source's own (cloned on a filesystem that shares
    # blocks): they took no new space, and stay allocated when the source is deleted.
    bytes_shared: int = 0

    @property
    def reclaimed_bytes(self) -> int:
        """Net bytes freed, in apparent sizes: negative when a copy was written and nothing
        deleted.  Blocks shared with the source count as written here and as freed with the
        source: over the demotion the total is what the disk gains."""
        return self.bytes_deleted - self.bytes_out


@dataclass(frozen=True)
class FileIdentity:
    """The file a plan was made for: a different inode, size or mtime is a different file."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileIdentity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class Located:
    """A file named relative to an open directory, and the path used to talk about it."""

    dir_fd: int
    name: str
    display: str


def extract(
    source: Located,
    target: Located,
    mode: Mode,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    expected: FileIdentity | None = None,
    delete_source: bool = False,
    replace: bool = True,
    replacing: FileIdentity | None = None,
    keep_aside: str | None = None,
    frees_after: int = 0,
) -> ExtractResult:
    """Write ``target`` from ``source``: temp file -> fsync -> verify -> rename -> fsync dir.

    The output appears only complete and verified (every record's CRC and every tensor's dtype,
    shape, stride, offset and storage sharing checked against the source), and records which
    version of which file it was made from (:class:`torchzip.Provenance`).  ``replacing`` is
    the stale copy a refresh replaces: the rename goes ahead only while the target name still
    holds that very file, and with ``keep_aside`` that file is first renamed to that name
    (never over an existing one) instead of being overwritten (``replace=False`` never
    replaces anything).  With
    ``delete_source`` the source is unlinked only after that, and only if the name still
    refers to the very file that was read.  ``expected`` is the file the caller listed; a
    different (or since modified) file under that name is refused.  ``frees_after`` is what the
    caller deletes right after (the source's size): such a copy may borrow root's reserve on a
    full disk (see ``_require_room``).  Any failure leaves no temp file and the source
    untouched.
    """
    started = time.monotonic()
    fd, info = open_regular(source.name, source.dir_fd, source.display)
    try:
        if expected is not None and FileIdentity.of(info) != expected:
            raise FileRefused(source.display, "changed since it was scanned; not touched")
        sparse = sparse_problem(info)
        if sparse is not None:
            raise FileRefused(source.display, sparse)
        checkpoint = torchzip.open_checkpoint(fd, source.display)
        provenance = torchzip.provenance_of(
            checkpoint, source.name, info.st_mtime_ns, folder_identity(source.dir_fd)
        )
        plan = torchzip.plan_output(checkpoint, mode, provenance)
        expansion = expansion_problem(info, plan.total_size)
        if expansion is not None:
            raise FileRefused(source.display, expansion)
        frees = info.st_size if delete_source else frees_after
        # Blocks are shared only within one filesystem; there, whether they can be is learnt
        # by trying, and the room needed is known once the clones are done.
        share = os.fstat(target.dir_fd).st_dev == info.st_dev
        if not share:
            _require_room(target, plan.total_size, frees=frees)
        shared = _write_verified(
            fd,
            checkpoint,
            plan,
            mode,
            info,
            target,
            should_stop,
            replace,
            replacing,
            keep_aside,
            share=share,
            frees=frees,
        )
    finally:
        os.close(fd)
    deleted = 0
    if delete_source:  # after closing: our own descriptor would count as the file being open
        delete_if_same(source, FileIdentity.of(info))
        deleted = info.st_size
    return ExtractResult(
        source.display,
        target.display,
        mode,
        info.st_size,
        plan.total_size,
        deleted,
        time.monotonic() - started,
        checkpoint.epoch,
        checkpoint.metrics,
        shared,
    )


def _write_verified(
    source_fd: int,
    checkpoint: Checkpoint,
    plan: torchzip.OutputPlan,
    mode: Mode,
    source_info: os.stat_result,
    target: Located,
    should_stop: Callable[[], bool],
    replace: bool,
    replacing: FileIdentity | None,
    keep_aside: str | None,
    *,
    share: bool,
    frees: int,
) -> int:
    """Write, verify and put in place the copy; returns the bytes it shares with the source."""
    temp = _temp_name(target.name)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        out = os.open(temp, flags, 0o600, dir_fd=target.dir_fd)
    except OSError as error:
        raise FileRefused(target.display, f"cannot create output: {error.strerror}") from None
    _mark_temp(out)
    linked = os.fstat(out)
    try:
        try:

            def make_room(unshared: int, shared: int) -> None:
                if share:  # the blocks shared free nothing when the source goes
                    _require_room(target, unshared, frees=max(0, frees - shared))
                _reserve(out, plan.total_size)  # allocates only the holes between the clones

            written = torchzip.write_output(
                source_fd, checkpoint, plan, out, should_stop, share=share, make_room=make_room
            )
            _copy_ownership(out, source_info, target.display)
            # The fsync waits on the disk and the verification on the CPU: run them side by
            # side.  The rename below waits for both.
            syncing = _Fsync(out)
            try:
                torchzip.verify_output(
                    out, plan, checkpoint, mode, target.display, written.read_back
                )
            finally:
                syncing.wait()
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FileRefused(
                    target.display,
                    f"disk full: no room for the {plan.total_size}-byte output; nothing written",
                ) from None
            raise FileRefused(target.display, f"write failed: {error.strerror}") from None
        _refuse_non_file_target(target)
        if replacing is not None:
            _require_target(target, replacing)
            if keep_aside is None:
                os.rename(temp, target.name, src_dir_fd=target.dir_fd, dst_dir_fd=target.dir_fd)
            else:
                move_aside(target, keep_aside, replacing)
                _link_no_replace(temp, target)
        elif replace:
            os.rename(temp, target.name, src_dir_fd=target.dir_fd, dst_dir_fd=target.dir_fd)
        else:
            _link_no_replace(temp, target)
        with contextlib.suppress(OSError):  # in place: no longer a temporary file
            os.removexattr(out, TEMP_XATTR)
    except BaseException:
        _remove_quietly(temp, target.dir_fd)
        raise
    finally:
        os.close(out)
    try:
        os.fsync(target.dir_fd)
    except OSError as error:
        # The copy's name may not survive a crash: it must not be counted on.  Take it back
        # (only the very file just linked); if even that fails, say so -- the caller leaves the
        # intent open for start-up reconciliation, which confirms it or abandons it.
        # A copy that replaced a stale one outright is left in place: taking it back would
        # leave no copy at all, so it too is left to reconciliation.
        reason = f"not confirmed on disk (fsync of its folder: {error.strerror})"
        if replacing is not None and keep_aside is None:
            raise NotConfirmed(target.display, reason + "; left in place") from None
        try:
            _unlink_if(target, linked)
        except (OSError, FileRefused):
            raise NotConfirmed(target.display, reason + "; left in place") from None
        with contextlib.suppress(OSError):
            os.fsync(target.dir_fd)
        raise FileRefused(target.display, reason + "; removed") from None
    return written.shared_bytes


def _unlink_if(target: Located, made: os.stat_result) -> None:
    """Unlink ``target`` only while its name holds the file ``made`` describes (dev, inode)."""
    now = os.stat(target.name, dir_fd=target.dir_fd, follow_symlinks=False)
    if (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
        raise FileRefused(target.display, "replaced since it was written")
    os.unlink(target.name, dir_fd=target.dir_fd)


def confirm_on_disk(copy: Located) -> None:
    """fsync an existing copy and its folder before a deletion counts on it: a copy whose
    durability was never confirmed (written by a run that crashed, or whose folder fsync
    failed) must not be the only thing left of a checkpoint after a power loss.  Cheap when
    it is already on disk."""
    fd, _ = open_regular(copy.name, copy.dir_fd, copy.display)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(copy.dir_fd)


def _require_target(target: Located, expected: FileIdentity) -> None:
    """The stale copy a refresh was planned for must still be the file at the target name."""
    try:
        now = os.stat(target.name, dir_fd=target.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise FileRefused(target.display, "vanished before it could be refreshed") from None
    if not stat.S_ISREG(now.st_mode) or FileIdentity.of(now) != expected:
        raise FileRefused(target.display, "changed since it was scanned; not replaced")


def move_aside(target: Located, aside: str, expected: FileIdentity) -> None:
    """Rename the stale copy at ``target`` to ``aside`` (same folder) while the name still holds
    the very file planned, never over a file that already has that name.  A crash right after
    leaves the copy's name free: the next sweep writes the copy again."""
    _require_target(target, expected)
    try:
        _rename_no_replace(target.dir_fd, target.name, aside)
    except FileExistsError:
        raise FileRefused(
            target.display, f"{aside} exists; the stale copy was not moved aside"
        ) from None


def _link_no_replace(temp: str, target: Located) -> None:
    """Put the temp file in place only if nothing holds the name (a user's file that appeared
    since the scan is never replaced)."""
    try:
        _rename_no_replace(target.dir_fd, temp, target.name)
    except FileExistsError:
        raise FileRefused(target.display, "appeared since the scan; not replaced") from None


_RENAME_NOREPLACE = 1
_renameat2: Callable[..., int] | None = None


def _rename_no_replace(dir_fd: int, old: str, new: str, new_dir_fd: int | None = None) -> None:
    """rename(2) that fails with FileExistsError rather than replace ``new``: renameat2 with
    RENAME_NOREPLACE, one atomic step; where the filesystem or libc lacks it, link then unlink
    (a crash between leaves a second link to a sweeper temp name, which the next sweep sees).
    ``new`` is in ``new_dir_fd`` when given (same filesystem), else in ``dir_fd``."""
    global _renameat2
    if _renameat2 is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _renameat2 = getattr(libc, "renameat2", None) or (lambda *args: -2)
    to_fd = dir_fd if new_dir_fd is None else new_dir_fd
    result = _renameat2(dir_fd, os.fsencode(old), to_fd, os.fsencode(new), _RENAME_NOREPLACE)
    if result == 0:
        return
    error = ctypes.get_errno() if result == -1 else errno.ENOSYS
    if error == errno.EEXIST:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new)
    if error not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        raise OSError(error, os.strerror(error), old)
    os.link(old, new, src_dir_fd=dir_fd, dst_dir_fd=to_fd, follow_symlinks=False)
    os.unlink(old, dir_fd=dir_fd)


class _Fsync:
    """fsync(fd) on a helper thread; ``wait()`` re-raises its error in the caller."""

    def __init__(self, fd: int) -> None:
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, args=(fd,), name="fsync", daemon=True)
        self._thread.start()

    def _run(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as error:
            self._error = error

    def wait(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error


def _reserve(fd: int, size: int) -> None:
    """Claim the space up front so a full disk fails before any byte is written."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _copy_ownership(fd: int, source: os.stat_result, display: str) -> None:
    """The output belongs to whoever owned the source, with its permission bits (setuid, setgid
    and sticky dropped: a checkpoint never needs them)."""
    try:
        os.fchown(fd, source.st_uid, source.st_gid)
    except PermissionError:
        log.warning("%s: cannot give the output the source's owner; it stays yours", display)
    os.fchmod(fd, stat.S_IMODE(source.st_mode) & 0o777)


def _refuse_non_file_target(target: Located) -> None:
    try:
        existing = os.stat(target.name, dir_fd=target.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(existing.st_mode):
        raise FileRefused(target.display, "output path is a directory")


def _remove_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def verify_existing_copy(source: Located, copy: Located, expected: FileIdentity) -> None:
    """Prove ``copy`` is exactly the inference copy extraction would write from ``source``:
    same records and CRCs (read in full), same tensors and metadata, made from this very
    version of the source (or, for copies written before copies named their source, naming
    none).  Raises FileRefused."""
    fd, info = open_regular(source.name, source.dir_fd, source.display)
    try:
        if FileIdentity.of(info) != expected:
            raise FileRefused(source.display, "changed since it was scanned; not touched")
        checkpoint = torchzip.open_checkpoint(fd, source.display)
        provenance = torchzip.provenance_of(
            checkpoint, source.name, info.st_mtime_ns, folder_identity(source.dir_fd)
        )
        copy_fd, copy_info = open_regular(copy.name, copy.dir_fd, copy.display)
        try:
            # Only the checkpoint owner's own copy proves it replaceable: another user's file
            # with the same bytes could be taken away again once the checkpoint is gone.
            if copy_info.st_uid != info.st_uid or copy_info.st_nlink != 1:
                raise FileRefused(copy.display, "not the checkpoint owner's own single-link copy")
            archive = torchzip.read_archive(copy_fd, copy.display)
            recorded = torchzip.read_provenance(copy_fd, archive, copy.display)
            if recorded is None:  # written before copies named their source
                plan = torchzip.without_provenance(torchzip.plan_output(checkpoint, Mode.INFERENCE))
            elif recorded.same_version(provenance):  # (perhaps made in a folder since copied)
                plan = torchzip.plan_output(checkpoint, Mode.INFERENCE, recorded)
            else:
                raise FileRefused(copy.display, "made from another version of its source")
            torchzip.verify_output(copy_fd, plan, checkpoint, Mode.INFERENCE, copy.display)
        finally:
            os.close(copy_fd)
    finally:
        os.close(fd)


def is_copy_of(target: Located, source: Located, mode: Mode) -> FileIdentity | None:
    """The identity of ``target`` when it is a copy sweeper made, in ``mode``'s own name, from
    a file named as ``source`` in its folder (any version): the one existing file ``sweeper
    extract`` rewrites without ``--force``.  None otherwise."""
    if target.name != output_name(source.name, mode):
        return None
    try:
        fd, info = open_regular(target.name, target.dir_fd, target.display)
    except FileRefused:
        return None
    try:
        made_from = torchzip.read_provenance(
            fd, torchzip.read_archive(fd, target.display), target.display
        )
    except FileRefused:
        return None
    finally:
        os.close(fd)
    if (
        made_from is None
        or made_from.name != source.name
        or made_from.folder != folder_identity(source.dir_fd)
    ):
        return None
    return FileIdentity.of(info)


def folder_identity(dir_fd: int) -> tuple[int, int]:
    info = os.fstat(dir_fd)
    return (info.st_dev, info.st_ino)


def source_state(dir_fd: int, made_from: torchzip.Provenance) -> str:
    """Whether the file a copy names as its source (in the copy's folder) is still the version
    the copy was made from: "current", "stale" (rewritten since), "gone", or "elsewhere" (the
    copy was made in another folder)."""
    if made_from.folder is not None and made_from.folder != folder_identity(dir_fd):
        return "elsewhere"
    try:
        fd, info = open_regular(made_from.name, dir_fd, made_from.name)
    except FileRefused:
        return "gone"
    try:
        if (info.st_size, info.st_mtime_ns) != (made_from.size, made_from.mtime_ns):
            return "stale"
        archive = torchzip.read_archive(fd, made_from.name)
        pickle_record = archive.records.get("data.pkl")
    except FileRefused:
        return "stale"
    finally:
        os.close(fd)
    current = pickle_record is not None and pickle_record.crc32 == made_from.pickle_crc32
    return "current" if current else "stale"


def delete_if_same(source: Located, expected: FileIdentity) -> None:
    """Unlink ``source`` if its name still refers to the very file ``expected`` describes (same
    inode, size and mtime) with exactly one link, that no process holds open (for reading
    too: a resuming run may be loading it), then fsync the directory.

    Callers must already have proven the file replaceable: its inference copy written (or found)
    and verified, the files that justify the deletion re-checked, and the intent recorded in
    the ledger.
    """
    _require_unused(source, expected)
    os.unlink(source.name, dir_fd=source.dir_fd)
    try:
        os.fsync(source.dir_fd)
    except OSError as error:
        # Done in memory either way, and a deletion lost in a crash only brings the file back:
        # the deletion is recorded as done.
        log.warning("%s: deleted; fsync of its folder failed: %s", source.display, error.strerror)


def trash_if_same(source: Located, expected: FileIdentity, trash_fd: int, key: str) -> None:
    """Move ``source`` into the trash folder ``trash_fd`` as ``key`` (one rename on the same
    filesystem, never over a file) on exactly the conditions :func:`delete_if_same` unlinks
    it; then fsync both folders.  Owner, mode and mtime travel with the inode."""
    _require_unused(source, expected)
    try:
        _rename_no_replace(source.dir_fd, source.name, key, trash_fd)
    except FileExistsError:
        raise FileRefused(source.display, f"{key} is taken in the trash; not moved") from None
    moved = os.stat(key, dir_fd=trash_fd, follow_symlinks=False)
    if FileIdentity.of(moved) != expected:  # swapped in at the last moment: it goes back
        _rename_no_replace(trash_fd, key, source.name, source.dir_fd)
        raise FileRefused(source.display, "replaced as it was moved; put back, not trashed")
    try:
        os.fsync(trash_fd)
        os.fsync(source.dir_fd)
    except OSError as error:
        # Moved either way; a move lost in a crash leaves the file where it was.
        log.warning("%s: moved; fsync of the folders failed: %s", source.display, error.strerror)


def _require_unused(source: Located, expected: FileIdentity) -> None:
    """Raise FileRefused unless ``source`` is still ``expected``, one link, open nowhere."""
    try:
        fd, now = open_regular(source.name, source.dir_fd, source.display)
    except FileRefused as error:
        if error.reason.endswith("No such file or directory"):
            raise FileRefused(source.display, "vanished before it could be deleted") from None
        raise
    try:
        if (now.st_dev, now.st_ino) != (expected.dev, expected.ino):
            raise FileRefused(source.display, "replaced since it was read; not deleted")
        if now.st_nlink != 1:
            raise FileRefused(source.display, f"has {now.st_nlink} hard links; not deleted")
        if FileIdentity.of(now) != expected:
            raise FileRefused(source.display, "modified since it was read; not deleted")
        if open_elsewhere(fd, now):
            raise FileRefused(source.display, "open by a process; not deleted")
    finally:
        os.close(fd)
    # The open-file probe takes time: look once more, right before the unlink, in case a
    # trainer has just saved a new file under this name.
    try:
        last = os.stat(source.name, dir_fd=source.dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise FileRefused(source.display, "vanished before it could be deleted") from None
    if FileIdentity.of(last) != expected or last.st_nlink != 1:
        raise FileRefused(source.display, "replaced since it was read; not deleted")


def lease_conflict(fd: int, lease: int) -> bool | None:
    """Try the lease ``lease`` on ``fd`` and drop it: True when another open file description
    prevents it (for ``F_RDLCK``: one open for writing; for ``F_WRLCK``: any other), False when
    granted, None where leases are refused (not the owner and no CAP_LEASE, network
    filesystems)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, lease)
    except OSError as error:
        return True if error.errno in (errno.EAGAIN, errno.EBUSY) else None
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def open_elsewhere(fd: int, info: os.stat_result) -> bool:
    """Whether any other open file description refers to the file ``fd`` has open (this one
    aside), for reading or writing: by a write lease, else by every process's descriptors in
    /proc."""
    conflict = lease_conflict(fd, fcntl.F_WRLCK)
    if conflict is not None:
        return conflict
    return (info.st_dev, info.st_ino) in opened_by_processes(exclude_self=True)[0]


def opened_by_processes(*, exclude_self: bool) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(dev, ino) of every file some process can be seen holding open, from /proc: (open at
    all, open for writing)."""
    opened: set[tuple[int, int]] = set()
    writing: set[tuple[int, int]] = set()
    own = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and not (exclude_self and p == own)]
    except OSError:
        return opened, writing
    for pid in pids:
        base = f"/proc/{pid}"
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            continue
        for number in fds:
            try:
                with open(f"{base}/fdinfo/{number}", encoding="ascii") as info:
                    flags = next(
                        (int(line.split()[1], 8) for line in info if line.startswith("flags:")), 0
                    )
                target = os.stat(f"{base}/fd/{number}")
            except (OSError, ValueError, IndexError):
                continue
            if not stat.S_ISREG(target.st_mode):
                continue
            opened.add((target.st_dev, target.st_ino))
            if flags & (os.O_WRONLY | os.O_RDWR):
                writing.add((target.st_dev, target.st_ino))
    return opened, writing


# Set on every temporary file sweeper creates: the proof that a leftover ``.*.sweeper-tmp-*``
# is sweeper's own (a user's file of that name has no reason to carry it, and cannot be given
# it by anyone but its owner or root).
TEMP_XATTR = "user.sweeper.temp"


def _mark_temp(fd: int) -> None:
    with contextlib.suppress(OSError):  # no user xattrs here: such a temp is never cleaned up
        os.setxattr(fd, TEMP_XATTR, b"1")


def remove_stale_temps(dir_fd: int, older_than: float, now: float) -> list[tuple[str, int]]:
    """Remove sweeper's own temp files left by a crash: a name carrying TEMP_MARK, a regular
    file, untouched for ``older_than`` seconds, and marked with :data:`TEMP_XATTR` (a user's
    file that merely has such a name is left alone).  Returns (name, size) of each removed."""
    removed = []
    for entry in os.scandir(dir_fd):
        if not is_sweeper_temp(entry.name):
            continue
        try:
            fd = os.open(entry.name, _OPEN_FILE, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or now - info.st_mtime < older_than:
                continue
            try:
                ours = os.getxattr(fd, TEMP_XATTR) == b"1"
            except OSError:
                ours = False
        finally:
            os.close(fd)
        now_there = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
        if ours and (now_there.st_dev, now_there.st_ino) == (info.st_dev, info.st_ino):
            _remove_quietly(entry.name, dir_fd)
            removed.append((entry.name, info.st_size))
    return removed
