"""Runs ``sweeper sweep`` once per filesystem call, with a fault at that call, then once cleanly.

Not a test module: ``tests/test_faults.py`` starts it as a subprocess and checks the trees it
leaves.  It imports sweeper once, then forks one real process per run, so a matrix of hundreds
of points takes seconds.  In the faulted process the ``os`` functions that touch the disk (and
the ``renameat2`` sweeper calls through ctypes, and ``fcntl.ioctl``, which clones shared blocks)
count their calls; call number N either kills the process on the spot (``kill``: ``os._exit``,
no ``finally``, no ``atexit``, as SIGKILL) or fails with ``ENOSPC`` or ``EIO`` without doing
anything.  Only the main process is faulted, not
the classifier workers it forks.

Usage: ``python fault_driver.py SPEC.json``; SPEC holds ``template`` (a folder with ``root/``
and ``state/``), ``work`` (where each point's tree goes), ``modes`` and ``args`` (the sweep's
arguments, with ``{root}`` and ``{ledger}`` filled in), and optionally ``only``: the names of
the calls to count and fault (all of them when absent).  Prints one JSON object per point.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from typing import Any

import sweeper.config
import sweeper.execute
import sweeper.extract
import sweeper.intact
import sweeper.journal
import sweeper.report
from sweeper import cli

# The calls that change the disk or wait on it: where a kill or a full disk can strike.
CHANGES = (
    "open", "write", "pwrite", "fsync", "rename", "unlink", "link", "ftruncate",
    "posix_fallocate", "copy_file_range", "mkdir", "fchown", "fchmod", "setxattr", "removexattr",
)  # fmt: skip
# EIO can also strike a read.
CALLS = {"kill": CHANGES, "ENOSPC": CHANGES, "EIO": (*CHANGES, "read", "pread", "preadv")}
# ``kill-after:NAME`` kills at the first call after the first NAME call returned (a state to
# hand to another process, e.g. the daemon: a copy linked into place, its record not written).
AFTER = "kill-after:"
KILLED = 137
ONLY: frozenset[str] | None = None  # SPEC's "only"


def _install(point: int, mode: str, main_pid: int) -> list[int]:
    """Wrap the calls; returns the live call counter ([count])."""
    count = [0]
    after = mode[len(AFTER) :] if mode.startswith(AFTER) else None
    armed = [False]

    def faulting(real: Callable[..., Any], name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if os.getpid() == main_pid:
                count[0] += 1
                if armed[0] or (count[0] == point and mode == "kill"):
                    os._exit(KILLED)
                if count[0] == point and after is None:
                    number = errno.ENOSPC if mode == "ENOSPC" else errno.EIO
                    raise OSError(number, os.strerror(number))
            result = real(*args, **kwargs)
            if name == after and os.getpid() == main_pid:
                armed[0] = True
            return result

        return call

    for name in CALLS.get(mode, CHANGES):
        if ONLY is None or name in ONLY:
            setattr(os, name, faulting(getattr(os, name), name))
    if ONLY is None or "ioctl" in ONLY:  # FICLONERANGE writes too (sweeper.extents)
        fcntl.ioctl = faulting(fcntl.ioctl, "ioctl")
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and (ONLY is None or "renameat2" in ONLY):
        counted = faulting(renameat2, "renameat2")

        def renameat2_call(*args: Any) -> int:
            try:
                return int(counted(*args))
            except OSError as error:  # as the C call reports it
                ctypes.set_errno(error.errno or errno.EIO)
                return -1

        sweeper.extract._renameat2 = renameat2_call
    return count


def _run(args: list[str], out: str, point: int = 0, mode: str = "") -> tuple[int, int]:
    """One sweep in a forked process; (exit status, calls made) -- calls only when not killed."""
    counter_path = out + ".calls"
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            count = _install(point, mode, os.getpid()) if point else [0]
            try:
                code = cli.main(args)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 2
            except BaseException:
                traceback.print_exc()
                code = 98
            with open(counter_path, "w") as file:
                file.write(str(count[0]))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    calls = -1
    if os.path.exists(counter_path):
        with open(counter_path) as file:
            calls = int(file.read())
        os.unlink(counter_path)
    return os.waitstatus_to_exitcode(status), calls


def main() -> int:
    global ONLY
    with open(sys.argv[1]) as file:
        spec = json.load(file)
    ONLY = frozenset(spec["only"]) if "only" in spec else None
    for mode in spec["modes"]:
        point = 1
        while True:
            tree = os.path.join(spec["work"], f"{mode}-{point}")
            shutil.copytree(spec["template"], tree, symlinks=True)
            ledger = os.path.join(tree, "state", "ledger.jsonl")
            fill = {"root": os.path.join(tree, "root"), "ledger": ledger}
            args = [arg.format(**fill) for arg in spec["args"]]
            faulted, calls = _run(args, os.path.join(tree, "faulted.log"), point, mode)
            if mode.startswith(AFTER):  # one run, left as it is for the caller
                print(json.dumps({"mode": mode, "tree": tree, "faulted": faulted}), flush=True)
                break
            rerun, _ = _run(args, os.path.join(tree, "rerun.log"))
            hit = faulted == KILLED or calls >= point
            print(json.dumps({"mode": mode, "point": point, "tree": tree, "hit": hit,
                              "faulted": faulted, "rerun": rerun}), flush=True)  # fmt: skip
            if not hit:
                shutil.rmtree(tree)
                break
            point += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
