"""Run-folder trees for sweep tests: real checkpoints in real folders, and ways to look at them.

Checkpoints come from :mod:`checkpoints` (tiny models, the real ``torch.save``).  What this module
adds is the tree around them: mtimes set on purpose, snapshots of a whole tree that never follow
a symlink, and other processes that hold a file open or flocked while a sweep runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import torch
from checkpoints import full_checkpoint, tiny_model

from sweeper.ledger import Action, encode_record, new_record

# One fixed "now" for tree building: old files sit far enough behind it that no min_age applies.
HOUR_NS = 3600 * 1_000_000_000
DAY_NS = 24 * HOUR_NS


def save_full(
    path: Path | bytes,
    *,
    epoch: int | None = None,
    step: int | None = None,
    seed: int = 0,
    mtime_ns: int | None = None,
) -> dict[str, Any]:
    """``torch.save`` a full training checkpoint of a tiny model seeded ``seed`` to ``path``.

    ``epoch``/``step`` are stored only when given (a checkpoint may hold neither); ``mtime_ns``
    sets its modification time.  Returns what was saved, so tests can compare tensors later.
    ``path`` may be bytes, for names that are not valid UTF-8."""
    checkpoint = full_checkpoint(epoch=0, model=tiny_model(seed))
    del checkpoint["epoch"]
    if epoch is not None:
        checkpoint["epoch"] = epoch
    if step is not None:
        checkpoint["global_step"] = step
    target = Path(os.fsdecode(path))
    torch.save(checkpoint, target)
    if mtime_ns is not None:
        set_mtime(target, mtime_ns)
    return checkpoint


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def days_ago(days: float) -> int:
    """An mtime (ns) ``days`` before the real clock: old enough for any min_age_seconds used."""
    return time.time_ns() - int(days * DAY_NS)


def truncate_to_half(path: Path) -> None:
    """Cut a checkpoint in two, as a crash or a full disk mid-``torch.save`` leaves it."""
    size = path.stat().st_size
    os.truncate(path, size // 2)


# ---------------------------------------------------------------------------------------------
# Looking at a whole tree.

Snapshot = dict[bytes, tuple[object, ...]]


def snapshot(top: Path) -> Snapshot:
    """Every entry below ``top`` (bytes paths, relative): type, size, mtime, inode, link count,
    and a content digest for regular files or the target for symlinks.  Never follows a
    symlink.  Compare two snapshots to prove nothing changed."""
    state: Snapshot = {}
    base = os.fsencode(top)
    for folder, dirs, files in os.walk(base, followlinks=False):
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            extra: object = None
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as file:
                    extra = hashlib.sha256(file.read()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                extra = os.readlink(path)
            state[os.path.relpath(path, base)] = (
                stat.S_IFMT(info.st_mode),
                info.st_size,
                info.st_mtime_ns,
                info.st_ino,
                info.st_nlink,
                extra,
            )
    return state


def apparent_size(top: Path) -> int:
    """Total apparent size of the regular files below ``top``; symlinks are not followed."""
    return sum(size for kind, size, *_ in snapshot(top).values() if kind == stat.S_IFREG)


def names(folder: Path) -> set[str]:
    return set(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# The ledger as a program reads it: strict JSON, one object per line.


def ledger_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the ledger parsed as strict JSON; fails on anything else."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), "ledger does not end with a newline"
    records = []
    for line in data.split(b"\n")[:-1]:
        obj = json.loads(line.decode("ascii"), parse_constant=_refuse_constant)
        assert isinstance(obj, dict), line
        records.append(obj)
    return records


def write_history(ledger: Path, count: int) -> None:
    """``count`` outcome records (and their intents) over ten days, three owners, two roots:
    written as the executor writes them, in one go."""
    start = datetime(2026, 11, 1, 12, tzinfo=timezone.utc)
    lines = []
    for number in range(count):
        common: dict[str, Any] = {
            "now": start + timedelta(hours=number * 240 / count),
            "path": f"/data/u{number % 3}/run/epoch{number}.pt",
            "owner": f"u{number % 3}",
            "uid": 1000 + number % 3,
            "run_id": f"run{number // 50}",
            "root": f"/data/u{number % 3}" if number % 2 else "/scratch",
        }
        lines.append(encode_record(new_record(action=Action.DELETE_INTENT, reason="old", **common)))
        lines.append(
            encode_record(
                new_record(
                    action=Action.DELETE,
                    reason="demoted: older than the 2 newest intact full checkpoints",
                    bytes_deleted=1000 + number,
                    reclaimed_bytes=1000 + number,
                    **common,
                )
            )
        )
    ledger.parent.mkdir(parents=True, exist_ok=True)
    with open(ledger, "ab") as file:
        file.write(b"".join(lines))
    os.chmod(ledger, 0o600)


def _refuse_constant(name: str) -> None:
    raise AssertionError(f"ledger holds {name}, which is not JSON")


def outcome_total(records: list[dict[str, Any]], run_id: str | None = None) -> int:
    """Sum of ``reclaimed_bytes`` over outcome records (intent records carry null)."""
    return sum(
        r["reclaimed_bytes"]
        for r in records
        if r["reclaimed_bytes"] is not None and (run_id is None or r["run_id"] == run_id)
    )


# ---------------------------------------------------------------------------------------------
# Other processes holding files.

_HOLDER = textwrap.dedent(
    """
    import fcntl, sys
    mode, path = sys.argv[1], sys.argv[2]
    file = open(path, "ab" if mode == "write" else "rb")
    if mode == "flock":
        fcntl.flock(file.fileno(), fcntl.LOCK_SH)
    print("ready", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin
    """
)


@contextlib.contextmanager
def held_by_another_process(path: Path, how: str) -> Iterator[subprocess.Popen[str]]:
    """Another real process holds ``path`` while the block runs: ``how`` is ``"write"`` (open
    for appending, as a training job mid-save), ``"read"`` (open for reading, as an evaluation
    job loading it) or ``"flock"`` (a shared flock, a user's pin)."""
    assert how in ("write", "read", "flock")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, how, os.fspath(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "ready\n"
        if how == "flock":
            _assert_flocked(path)
        yield holder
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()


def _assert_flocked(path: Path) -> None:
    """The holder's lock is really there: an exclusive non-blocking flock from here fails."""
    with open(path, "rb") as file:
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)
    raise AssertionError(f"{path} is not flocked by the holder")


def run_fault_driver(
    tmp_path: Path,
    template: Path,
    modes: list[str],
    args: list[str],
    only: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Every point of ``fault_driver.py`` over copies of ``template`` (``only``: the calls to
    strike, else every one), as it reported them."""
    from conftest import REPO_ROOT

    spec = tmp_path / "spec.json"
    work = tmp_path / "work"
    work.mkdir()
    settings: dict[str, Any] = {
        "template": str(template), "work": str(work), "modes": modes, "args": args,
    }  # fmt: skip
    if only is not None:
        settings["only"] = only
    spec.write_text(json.dumps(settings))
    driver = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("fault_driver.py")), str(spec)],
        env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{Path(__file__).parent}"},
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert driver.returncode == 0, driver.stderr
    return [json.loads(line) for line in driver.stdout.splitlines()]


_CLOSES = {
    "extract-intent": {"extract", "refresh", "fail", "abandon"},
    "delete-intent": {"delete", "fail", "abandon"},
    "trash-intent": {"trash", "fail", "abandon"},
    "purge-intent": {"purge", "fail", "abandon"},
}


def open_intents(records: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(run id, path, intent) of every intent in ``records`` no outcome closed."""
    left: set[tuple[str, str, str]] = set()
    for record in records:
        if record["action"] in _CLOSES:
            left.add((record["run_id"], record["path"], record["action"]))
        for kind, closing in _CLOSES.items():
            if record["action"] in closing:
                left.discard((record["run_id"], record["path"], kind))
    return left
