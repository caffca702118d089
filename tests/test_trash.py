"""The undo window: demoted checkpoints held in sweeper's trash, restored, or purged.

Real trees in tmp_path (and a tmpfs for disk pressure), the real CLI as a process; kill points
through ``fault_driver.py`` as ``test_faults.py`` uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, CliRun, run_cli
from daemon_harness import RESCAN_SECONDS, SETTLE_SECONDS, Daemon, NotifySocket
from test_pressure import MiB, fill_to, save_sized
from trees import (
    DAY_NS,
    days_ago,
    ledger_lines,
    open_intents,
    outcome_total,
    run_fault_driver,
    save_full,
)

from sweeper.journal import markers_of
from sweeper.pressure import measure

TRASH = ".sweeper-trash"
UID = 4321  # a user who is not sweeper's


def tree_bytes(top: Path) -> int:
    """Every file's apparent size below ``top``, the trash's held files included (they still
    take space) and its manifest entries left out (sweeper's bookkeeping, as the ledger is)."""
    total = 0
    for folder, _, files in os.walk(top):
        for name in files:
            if Path(folder).name == TRASH and name.endswith((".json", ".tmp")):
                continue
            total += os.lstat(os.path.join(folder, name)).st_size
    return total


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tree:
    """A root holding one run folder of three epochs (owned by a user, not by sweeper), the
    CLI pointed at it and a ledger in tmp_path."""

    def __init__(self, top: Path, run: Callable[..., CliRun], undo: int = 3600) -> None:
        self.root = top / "root"
        self.run_folder = self.root / "run"
        self.run_folder.mkdir(parents=True)
        self.ledger = top / "state" / "ledger.jsonl"
        self._run = run
        self.undo = undo
        self.epochs = [self.run_folder / f"epoch{n}.pt" for n in (1, 2, 3)]
        for n, path in enumerate(self.epochs, 1):
            save_full(path, epoch=n, seed=n, mtime_ns=days_ago(4 - n))
        for path in (self.run_folder, *self.epochs):
            os.chown(path, UID, UID)
        os.chmod(self.epochs[0], 0o640)

    def sweep(self, *args: str) -> CliRun:
        return self._run(
            "sweep", self.root, "keep_full=1", "min_age_seconds=0", f"undo_seconds={self.undo}",
            "--ledger", self.ledger, *args,
        )  # fmt: skip

    def cli(self, command: str, *args: str | os.PathLike[str]) -> CliRun:
        return self._run(command, *args, f"roots=[{self.root}]", "--ledger", self.ledger)

    @property
    def trash(self) -> Path:
        return self.root / TRASH

    def manifests(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.trash.glob("*.json"))]


@pytest.fixture
def tree(tmp_path: Path, run_sweeper: Callable[..., CliRun]) -> Tree:
    return Tree(tmp_path, run_sweeper)


def test_a_trashed_checkpoint_is_restored_byte_identical_with_owner_mode_and_mtime(
    tree: Tree,
) -> None:
    first = tree.epochs[0]
    before = {p: (digest(p), os.stat(p)) for p in tree.epochs}
    start = tree_bytes(tree.root)
    planned = json.loads(tree.sweep("--dry-run", "--json").stdout)
    trashed = [e for e in planned["entries"] if e.get("trash")]
    assert [Path(e["path"]).name for e in trashed] == ["epoch1.pt", "epoch2.pt"]
    assert all(e["bytes_deleted"] == 0 and e["undo_seconds"] == 3600 for e in trashed)

    done = tree.sweep("--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["reclaimed_bytes"] == planned["expected_reclaimed_bytes"]
    # nothing freed yet: the ledger, the tree and the plan agree (the copies were written)
    assert start - tree_bytes(tree.root) == result["reclaimed_bytes"] < 0
    assert outcome_total(ledger_lines(tree.ledger)) == result["reclaimed_bytes"]
    assert not first.exists() and not tree.epochs[1].exists() and tree.epochs[2].exists()
    info = os.stat(tree.trash)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (os.geteuid(), 0o700)
    assert [m["path"] for m in tree.manifests()] == [str(p) for p in tree.epochs[:2]]
    actions = [r["action"] for r in ledger_lines(tree.ledger)]
    assert actions.count("trash") == 2 and "delete" not in actions

    listed = tree.cli("trash", "--json")
    assert listed.returncode == 0, listed.stderr
    held = listed.json()["held"]
    assert [h["path"] for h in held] == [str(p) for p in tree.epochs[:2]]
    assert all(h["purge_after"] - h["trashed"] == 3600 for h in held)
    text = tree.cli("trash").stdout
    assert str(first) in text and "held: 2 files" in text

    # a sweep never treats what the trash holds as checkpoints
    again = json.loads(tree.sweep("--dry-run", "--json").stdout)
    assert not [e for e in again["entries"] if TRASH in e["path"]]
    assert again["counts"]["delete"] == 0

    restored = tree.cli("restore", first)
    assert restored.returncode == 0, restored.stderr
    assert f"restored: {first}" in restored.stdout
    now = os.stat(first)
    was = before[first][1]
    assert digest(first) == before[first][0]
    assert (now.st_uid, now.st_gid, now.st_mode, now.st_mtime_ns) == (
        was.st_uid, was.st_gid, was.st_mode, was.st_mtime_ns,
    )  # fmt: skip
    assert [m["path"] for m in tree.manifests()] == [str(tree.epochs[1])]
    assert [r["action"] for r in ledger_lines(tree.ledger)][-1] == "restore"
    assert outcome_total(ledger_lines(tree.ledger)) == start - tree_bytes(tree.root)

    twice = tree.cli("restore", first)
    assert twice.returncode == 1 and "not held in the trash" in twice.stderr


def test_restore_refuses_a_taken_name_or_a_gone_folder(tree: Tree) -> None:
    swept = tree.sweep()
    assert swept.returncode == 0, swept.stderr
    assert "into the trash: 2 files" in swept.stdout
    second = tree.epochs[1]
    second.write_bytes(b"a new file under the old name")
    taken = tree.cli("restore", second)
    assert taken.returncode == 1 and "the name is taken" in taken.stderr
    assert second.read_bytes() == b"a new file under the old name"
    assert len(tree.manifests()) == 2

    os.rename(tree.run_folder, tree.root / "moved")
    tree.run_folder.mkdir()
    gone = tree.cli("restore", tree.epochs[0])
    assert gone.returncode == 1 and "its folder is gone" in gone.stderr
    assert len(tree.manifests()) == 2


def test_restore_by_run_id(tree: Tree) -> None:
    done = tree.sweep("--json")
    assert done.returncode == 0, done.stderr
    (run_id,) = {r["run_id"] for r in ledger_lines(tree.ledger) if r["action"] == "trash"}
    restored = tree.cli("restore", "--run-id", run_id)
    assert restored.returncode == 0, restored.stderr
    assert all(p.exists() for p in tree.epochs)
    assert tree.manifests() == []
    none = tree.cli("restore", "--run-id", "0123456789ab")
    assert none.returncode == 1 and "nothing held in the trash from run" in none.stderr


def _age_trash(tree: Tree) -> None:
    """Move every held file's purge time into the past (the clock is the only thing faked)."""
    for path in tree.trash.glob("*.json"):
        entry = json.loads(path.read_text())
        entry["purge_after"] = entry["trashed"] - 1
        path.write_text(json.dumps(entry))


def test_the_trash_is_purged_after_the_window_and_counted_then(tree: Tree) -> None:
    assert tree.sweep().returncode == 0
    start = tree_bytes(tree.root)
    counted = outcome_total(ledger_lines(tree.ledger))
    plan = json.loads(tree.sweep("--dry-run", "--json").stdout)
    assert "purges" not in plan  # the window has not passed
    _age_trash(tree)
    plan = json.loads(tree.sweep("--dry-run", "--json").stdout)
    sizes = [m["identity"][2] for m in tree.manifests()]
    assert [p["bytes"] for p in plan["purges"]] == sizes
    assert plan["expected_reclaimed_bytes"] == sum(sizes)
    assert "purge: " in tree.sweep("--dry-run").stdout

    done = tree.sweep("--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["reclaimed_bytes"] == sum(sizes) == start - tree_bytes(tree.root)
    assert [p["ok"] for p in result["purges"]] == [True, True]
    assert outcome_total(ledger_lines(tree.ledger)) - counted == sum(sizes)
    assert list(tree.trash.iterdir()) == []
    assert [r["action"] for r in ledger_lines(tree.ledger)].count("purge") == 2


def test_a_real_window_passes(tmp_path: Path, run_sweeper: Callable[..., CliRun]) -> None:
    tree = Tree(tmp_path, run_sweeper, undo=1)
    assert tree.sweep().returncode == 0
    assert len(tree.manifests()) == 2
    held = tree.cli("trash", "--json").json()["held"]
    wait = max(h["purge_after"] for h in held)
    time.sleep(max(0.0, wait - time.time()) + 0.05)
    assert tree.sweep().returncode == 0
    assert tree.manifests() == [] and list(tree.trash.iterdir()) == []


def test_the_daemon_trashes_then_purges_after_the_window(tmp_path: Path) -> None:
    tree = Tree(tmp_path, run_cli, undo=2)
    notify = NotifySocket(tmp_path / "notify.sock")
    settings = [
        f"settle_seconds={SETTLE_SECONDS}", "min_age_seconds=0", f"rescan_seconds={RESCAN_SECONDS}",
        "keep_full=1", "undo_seconds=2", str(tree.root),
    ]  # fmt: skip
    daemon = Daemon(tmp_path, settings, notify=notify, ledger=tree.ledger)
    try:
        daemon.wait_ready()
        assert [m["name"] for m in tree.manifests()] == ["epoch1.pt", "epoch2.pt"]
        assert not tree.epochs[0].exists()
        daemon.wait_until(lambda: tree.manifests() == [], "the trash to be purged")
        daemon.wait_until(
            lambda: [r["action"] for r in ledger_lines(tree.ledger)].count("purge") == 2,
            "the purges' records",
        )
        records = ledger_lines(tree.ledger)
        purged = sum(r["reclaimed_bytes"] for r in records if r["action"] == "purge")
        assert purged == sum(r["file_id"][2] for r in records if r["action"] == "trash")
        assert list(tree.trash.iterdir()) == [] and tree.epochs[2].exists()
    finally:
        daemon.stop()
        notify.close()


@pytest.mark.parametrize("kind", ["symlink", "foreign", "mode"])
def test_a_trash_that_is_not_sweepers_own_is_refused(tree: Tree, tmp_path: Path, kind: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_bytes(b"x")
    if kind == "symlink":
        tree.trash.symlink_to(elsewhere)
    else:
        tree.trash.mkdir()
        os.chmod(tree.trash, 0o700 if kind == "foreign" else 0o755)
        if kind == "foreign":
            os.chown(tree.trash, UID, UID)
    done = tree.sweep("--json")
    assert done.returncode == 1
    assert "refused as the trash" in done.stderr
    assert all(p.exists() for p in tree.epochs)  # nothing moved
    assert sorted(os.listdir(elsewhere)) == ["precious"]
    if kind != "symlink":
        assert os.listdir(tree.trash) == []
    listed = tree.cli("trash")
    assert listed.returncode == 1 and "refused as the trash" in listed.stderr
    assert outcome_total(ledger_lines(tree.ledger)) == -sum(
        r["bytes_written"] for r in ledger_lines(tree.ledger) if r["action"] == "extract"
    )


def test_files_planted_in_a_refused_trash_are_never_purged(tree: Tree, tmp_path: Path) -> None:
    """A user who replaces the trash with their own folder, manifests and all, gets nothing
    purged: the folder fails the check before anything in it is read."""
    assert tree.sweep().returncode == 0
    _age_trash(tree)
    os.rename(tree.trash, tmp_path / "sweepers")
    shutil.copytree(tmp_path / "sweepers", tree.trash)
    os.chown(tree.trash, UID, UID)
    planted = sorted(os.listdir(tree.trash))
    done = tree.sweep("--json")
    assert done.returncode == 1 and "refused as the trash" in done.stderr
    assert sorted(os.listdir(tree.trash)) == planted


def test_under_pressure_the_trash_is_purged_first_oldest_first(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    disk = mount_tmpfs(64 * MiB)
    run = disk / "run"
    run.mkdir()
    paths = [run / f"epoch{n}.pt" for n in (1, 2, 3, 4)]
    for n, path in enumerate(paths, 1):
        save_sized(path, 724, epoch=n, days=5 - n)
    ledger = tmp_path / "ledger.jsonl"
    args = ("sweep", disk, "keep_full=1", "min_age_seconds=0", "undo_seconds=3600")
    first = run_sweeper(*args, "--ledger", ledger, "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["counts"]["delete"] == 3
    held = sorted(json.loads(p.read_text())["trashed"] for p in (disk / TRASH).glob("*.json"))
    assert len(held) == 3
    fill_to(disk, measure(str(disk)).total_bytes // 20)  # 5%: about 6.4 MiB short of 15%

    plan = json.loads(run_sweeper(*args, "--ledger", ledger, "--dry-run", "--json").stdout)
    purged = [p for p in plan["purges"]]
    assert [p["trashed"] for p in purged] == held[: len(purged)]  # oldest first
    assert len(purged) == 2  # each frees about 6 MiB: two reach the target, not three
    assert all("under disk pressure" in p["reason"] for p in purged)
    done = run_sweeper(*args, "--ledger", ledger, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["reclaimed_bytes"] == sum(p["bytes"] for p in purged)
    assert len(list((disk / TRASH).glob("*.json"))) == 1
    assert paths[3].exists()


def test_under_pressure_demotions_delete_at_once(
    mount_tmpfs: Callable[..., Path], tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """A byte moved into the trash frees nothing: on a filesystem under pressure the undo window
    gives way."""
    disk = mount_tmpfs(64 * MiB)
    run = disk / "run"
    run.mkdir()
    for n in (1, 2, 3):
        save_sized(run / f"epoch{n}.pt", 724, epoch=n, days=4 - n)
    ledger = tmp_path / "ledger.jsonl"
    assert run_sweeper("sweep", disk, "keep_full=3", "--ledger", ledger).returncode == 0
    fill_to(disk, measure(str(disk)).total_bytes // 20)
    done = run_sweeper(
        "sweep", disk, "keep_full=3", "min_age_seconds=0", "undo_seconds=3600",
        "--ledger", ledger, "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["counts"]["delete"] == 2 and result["reclaimed_bytes"] > 0
    assert not (disk / TRASH).exists()


# -- kill -9 -------------------------------------------------------------------------------


def test_killed_between_trash_and_manifest_nothing_is_lost_or_double_counted(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """Killed (as SIGKILL) at every call that writes while a sweep moves two checkpoints into
    the trash, then run again: each checkpoint is in its folder or held in the trash under a
    manifest entry, never both nor neither; the ledger's total equals the bytes freed; every
    intent is closed."""
    template = tmp_path / "template"
    tree = Tree(template, run_sweeper)
    os.chmod(tree.epochs[0], 0o600)
    assert (
        run_sweeper(
            "sweep", tree.root, "keep_full=3", "min_age_seconds=0", "--ledger", tree.ledger
        ).returncode
        == 0
    )  # the copies exist: the faulted run only moves files
    start = tree_bytes(tree.root)
    counted = outcome_total(ledger_lines(tree.ledger))
    args = [
        "sweep", "{root}", "--ledger", "{ledger}", "keep_full=1", "min_age_seconds=0",
        "undo_seconds=3600", "--json",
    ]  # fmt: skip
    only = ["open", "write", "fsync", "rename", "renameat2", "unlink", "mkdir", "link"]
    points = [p for p in run_fault_driver(tmp_path, template, ["kill"], args, only) if p["hit"]]
    assert len(points) > 15
    sizes = {p.name: p.stat().st_size for p in tree.epochs}
    for point in points:
        top = Path(point["tree"])
        where = f"kill at call {point['point']}"
        assert point["rerun"] == 0, f"{where}: {(top / 'rerun.log').read_text()}"
        run, trash = top / "root" / "run", top / "root" / TRASH
        manifests = [json.loads(p.read_text()) for p in trash.glob("*.json")]
        held = {m["name"] for m in manifests if (trash / m["key"]).exists()}
        assert len(held) == len(manifests), f"{where}: a manifest entry without its file"
        assert {p.name for p in trash.iterdir() if not p.name.endswith(".json")} == {
            m["key"] for m in manifests
        }, where  # no file without its manifest entry
        for name, size in sizes.items():
            here = (run / name).exists()
            assert here != (name in held), f"{where}: {name} here={here} held={name in held}"
            if name in held:
                (entry,) = [m for m in manifests if m["name"] == name]
                assert (trash / entry["key"]).stat().st_size == size
        assert held == {"epoch1.pt", "epoch2.pt"}, where  # the rerun finished the job
        records = ledger_lines(top / "state" / "ledger.jsonl")
        assert outcome_total(records) - counted == start - tree_bytes(top / "root") == 0, where
        assert not open_intents(records), where
        assert markers_of(top / "state" / "ledger.jsonl") == [], where


def test_killed_between_purge_steps_nothing_is_lost_or_double_counted(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """The trash holds two files whose window has passed; a sweep purging them is killed at
    every call that writes, then run again: both are purged exactly once in the ledger, the
    ledger's total equals the bytes freed, and nothing else is touched."""
    tree = Tree(tmp_path / "base", run_sweeper)
    assert tree.sweep().returncode == 0
    _age_trash(tree)
    args = [
        "sweep", str(tree.root), "--ledger", str(tree.ledger), "keep_full=1",
        "min_age_seconds=0", "undo_seconds=3600", "--json",
    ]  # fmt: skip
    sizes = sum(m["identity"][2] for m in tree.manifests())
    point = 1
    hits = 0
    states: set[str] = set()
    while True:
        start = tree_bytes(tree.root)
        counted = outcome_total(ledger_lines(tree.ledger))
        seen = len(ledger_lines(tree.ledger))
        runner = (
            "import sys, fault_driver\n"
            "fault_driver.ONLY = frozenset(sys.argv[3].split(','))\n"
            "code, calls = fault_driver._run(sys.argv[4:], sys.argv[1], int(sys.argv[2]), 'kill')\n"
            "print(code, calls)\n"
        )
        only = "unlink,fsync"  # the ledger's appends fsync: each record is a point too
        done = subprocess.run(
            [sys.executable, "-c", runner, str(tmp_path / "faulted.log"), str(point), only, *args],
            env={**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{Path(__file__).parent}"},
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        code, calls = (int(n) for n in done.stdout.split())
        hit = code == 137 or calls >= point
        left = ledger_lines(tree.ledger)[seen:]
        intents = {r["output"] for r in left if r["action"] == "purge-intent"}
        intents -= {r["output"] for r in left if r["action"] == "purge"}
        for output in intents:  # killed between a purge's intent and its outcome
            states.add("file gone" if not Path(output).exists() else "file held")
        rerun = tree.sweep("--json")
        assert rerun.returncode == 0, f"kill at {point}: {rerun.stderr}"
        records = ledger_lines(tree.ledger)
        where = f"kill at call {point}"
        assert outcome_total(records) - counted == start - tree_bytes(tree.root) == sizes, where
        assert [r["action"] for r in records[seen:]].count("purge") == 2, where
        assert not open_intents(records), where
        assert list(tree.trash.iterdir()) == [], where
        assert tree.epochs[2].exists(), where
        if not hit:
            break
        hits += 1
        point += 1
        # The next point starts again from two held files (fault_driver's copies of a template
        # would not do: a copy is another inode, not the file a manifest entry names).
        for path in tree.epochs[:2]:
            save_full(path, epoch=int(path.stem[-1]), seed=7, mtime_ns=days_ago(3) - DAY_NS)
            os.chown(path, UID, UID)
        assert tree.sweep().returncode == 0
        _age_trash(tree)
        sizes = sum(m["identity"][2] for m in tree.manifests())
    assert hits > 6
    assert states == {"file gone", "file held"}  # killed before and after the unlink


# ---------------------------------------------------------------------------------------------
# What an adversarial review found


def test_a_trash_another_sweep_is_moving_into_is_not_tidied(tree: Tree) -> None:
    """A sweep of another ledger over the same root, between a manifest entry and its move:
    the shared flock the mover holds keeps ``tidy`` from removing the live entry."""
    import fcntl

    from sweeper import trash

    assert tree.sweep().returncode == 0
    fd = os.open(tree.trash, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (tree.trash / "live.json").write_text("{}")  # an entry whose file is still on its way
        fcntl.flock(fd, fcntl.LOCK_SH)
        other = os.open(tree.trash, os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert trash.tidy(other) == []
        finally:
            os.close(other)
        assert (tree.trash / "live.json").exists()
    finally:
        os.close(fd)
    other = os.open(tree.trash, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert trash.tidy(other) == ["live"]  # once no one moves: a crash's leftover, tidied
    finally:
        os.close(other)


def test_a_root_inside_another_never_sweeps_its_trash(tree: Tree) -> None:
    """Nested roots: the outer root's sweep never walks the inner root folder's trash, even
    with patterns that match its keys."""
    assert tree.sweep().returncode == 0
    held = sorted(p.name for p in tree.trash.iterdir())
    outer = tree.root.parent
    done = tree._run(
        "sweep", outer, "keep_full=1", "min_age_seconds=0", 'patterns=["*"]',
        "--ledger", outer / "other" / "ledger.jsonl", "--dry-run", "--json",
    )  # fmt: skip
    assert all(TRASH not in entry["path"] for entry in done.json()["entries"]), done.stdout
    assert sorted(p.name for p in tree.trash.iterdir()) == held


def test_restore_finds_a_path_given_relative_to_a_relative_root(tree: Tree) -> None:
    """A root given relative to the working folder records relative paths; restore finds
    the file by the path a user gives, relative or absolute."""
    top = tree.root.parent
    done = run_cli(
        "sweep", "root", "keep_full=1", "min_age_seconds=0", f"undo_seconds={tree.undo}",
        "--ledger", tree.ledger, cwd=top,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not tree.epochs[0].exists()
    restored = run_cli(
        "restore", os.path.relpath(tree.epochs[0], top), "roots=[root]", "--ledger", tree.ledger,
        cwd=top,
    )  # fmt: skip
    assert restored.returncode == 0, restored.stderr
    assert tree.epochs[0].exists()
