"""The dry run checks what the real run needs: a real sweep as a real process of a uid that is
not root, on a tree where that uid may write in some folders and not in others, and cannot read
one file.  The dry run's figure is what the real run then reclaims, and nothing fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, CliRun, run_cli, untimed
from trees import save_full, snapshot

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="hands folders to another uid and runs sweeper as it"
)

USER = 54331  # a uid with no passwd entry: nothing on the machine is its own but what we give

# The command runs once as root as a dry run with its output thrown away (the interpreter's own
# files may be closed to the test uid: this loads every module a sweep needs, and changes
# nothing), then as the uid, with no groups and no capabilities: the kernel checks every access
# against the uid alone.  Forked workers inherit it.
_AS_USER = """
import contextlib, os, sys
from sweeper.cli import main
uid, argv = int(sys.argv[1]), sys.argv[2:]
with open(os.devnull, "w") as devnull:
    with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        main([*argv, "--dry-run"] if "--dry-run" not in argv else argv)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sys.exit(main(argv))
"""


def sweeper_as(uid: int, *args: str | os.PathLike[str]) -> CliRun:
    command = [sys.executable, "-c", _AS_USER, str(uid), *(os.fspath(arg) for arg in args)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("JOURNAL_STREAM", None)
    done = subprocess.run(
        command, cwd="/", env=env, capture_output=True, text=True, timeout=180, check=False
    )
    return CliRun(done.returncode, done.stdout, untimed(done.stderr))


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder other uids can traverse (tmp_path's parents are closed to them)."""
    folder = Path(tempfile.mkdtemp(prefix="sweeper-preflight-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def old_run(folder: Path, owner: int) -> None:
    folder.mkdir(parents=True)
    for epoch in (1, 2, 3):
        path = folder / f"epoch_{epoch}.pt"
        save_full(path, epoch=epoch, mtime_ns=10**18 + epoch)
        os.chown(path, owner, owner)
    os.chown(folder, owner, owner)


def by_path(result: dict[str, Any], key: str = "entries") -> dict[str, dict[str, Any]]:
    return {entry["path"]: entry for entry in result[key]}


def test_the_dry_run_predicts_what_a_user_without_rights_can_do(shared: Path) -> None:
    root = shared / "root"
    theirs, mine = root / "theirs", root / "mine"
    old_run(theirs, 0)  # root's run: the user may read it, not write in it
    old_run(mine, USER)
    secret = mine / "epoch_0.pt"  # root's file in the user's folder, closed to the user
    save_full(secret, epoch=0, mtime_ns=10**18)
    secret.chmod(0o600)
    state = shared / "state"
    state.mkdir()
    os.chown(state, USER, USER)
    options = ["--ledger", state / "ledger.jsonl", "min_age_seconds=0", "--json"]
    before = snapshot(theirs)

    dry = sweeper_as(USER, "sweep", root, *options, "--dry-run")

    assert dry.returncode == 1, dry.stderr  # a refused file and a folder it may not write in
    plan = dry.json()
    entries = by_path(plan)
    for epoch in (1, 2, 3):
        entry = entries[str(theirs / f"epoch_{epoch}.pt")]
        assert (entry["action"], entry["reason"]) == ("skip", f"skipped: cannot write in {theirs}")
        assert entry["reclaimed_bytes"] == 0
    assert entries[str(secret)]["action"] == "skip"
    assert "Permission denied" in entries[str(secret)]["reason"]
    assert {entries[str(mine / f"epoch_{e}.pt")]["action"] for e in (1, 2, 3)} == {
        "extract",
        "delete",
    }
    expected = plan["expected_reclaimed_bytes"]
    assert expected > 0

    swept = sweeper_as(USER, "sweep", root, *options)

    assert swept.returncode == 1, swept.stderr
    result = swept.json()
    assert result["failures"] == 0, swept.stderr  # nothing it tried failed
    assert "Permission denied" not in swept.stderr
    assert result["reclaimed_bytes"] == expected
    assert snapshot(theirs) == before
    assert not (mine / "epoch_1.pt").exists() and (mine / "epoch_1_inference.pt").exists()
    assert secret.exists()

    # The text plan says the same, and its exit status too.
    text = sweeper_as(USER, "sweep", root, "--ledger", state / "ledger.jsonl", "--dry-run")
    assert text.returncode == 1
    assert f"cannot write in {theirs}" in text.stdout


def test_a_sticky_folder_lets_a_user_delete_only_their_own(shared: Path) -> None:
    """In a sticky folder (like /tmp) a user may create files but unlink only their own."""
    root = shared / "root"
    run = root / "run"
    old_run(run, 0)
    run.chmod(0o1777)
    state = shared / "state"
    state.mkdir()
    os.chown(state, USER, USER)

    dry = sweeper_as(
        USER, "sweep", root, "--ledger", state / "l.jsonl", "min_age_seconds=0", "--json",
        "--dry-run",
    )  # fmt: skip

    entries = by_path(dry.json())
    assert entries[str(run / "epoch_1.pt")]["action"] == "skip"
    assert "sticky" in entries[str(run / "epoch_1.pt")]["reason"]
    assert entries[str(run / "epoch_3.pt")]["action"] == "extract"  # creating is allowed


def test_root_on_a_read_only_mount_is_told_before_it_tries(
    tmp_path: Path, mount_tmpfs: Callable[..., Path]
) -> None:
    """Outside the units' ReadWritePaths= (or on a read-only export) even root cannot write:
    the plan says so, and the sweep neither fails nor records failures."""
    mount = mount_tmpfs(64 * 1024 * 1024)
    old_run(mount / "run", 0)
    remounted = subprocess.run(
        ["mount", "-o", "remount,ro", str(mount)], capture_output=True, check=False
    )
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount read-only: {remounted.stderr.decode().strip()}")
    ledger = tmp_path / "state" / "ledger.jsonl"
    options = ["--ledger", ledger, "min_age_seconds=0", "--json"]

    dry = run_cli("sweep", mount, *options, "--dry-run")
    swept = run_cli("sweep", mount, *options)

    for done in (dry, swept):
        assert done.returncode == 1, done.stderr
    entries = by_path(dry.json())
    assert {e["reason"] for e in entries.values()} == {f"skipped: cannot write in {mount / 'run'}"}
    assert swept.json()["failures"] == 0 and swept.json()["outcomes"] == []
    assert "Read-only file system" not in swept.stderr
    assert not ledger.exists() or ledger.stat().st_size == 0  # nothing done, nothing failed


def test_a_checkpoint_folder_the_user_cannot_write_in_is_planned_as_a_skip(shared: Path) -> None:
    """A demotion deletes inside the checkpoint folder: the user's own Trainer run, with one
    checkpoint folder closed to writing, is planned as a skip there, and the real run reclaims
    exactly what the dry run said."""
    from folder_layouts import write

    run = shared / "out"
    write("hf", run)
    for path in [run, *run.rglob("*")]:
        os.chown(path, USER, USER, follow_symlinks=False)
    (run / "checkpoint-4").chmod(0o555)
    state = shared / "state"
    state.mkdir()
    os.chown(state, USER, USER)
    args = ("sweep", run, "--ledger", state / "ledger.jsonl", "keep_full=2", "min_age_seconds=0")
    plan = sweeper_as(USER, *args, "--dry-run", "--json")
    entries = {Path(p).name: e for p, e in by_path(plan.json()).items()}
    assert entries["checkpoint-4"]["action"] == "skip"
    assert entries["checkpoint-4"]["reason"].startswith("skipped: cannot write in ")
    done = sweeper_as(USER, *args, "--json")
    assert done.json()["reclaimed_bytes"] == plan.json()["expected_reclaimed_bytes"]
    assert (run / "checkpoint-4" / "optimizer.pt").exists()
