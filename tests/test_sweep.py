"""``sweeper sweep`` end to end: real run-folder trees in tmp_path, the real CLI as a process.

Every test passes ``--ledger`` into tmp_path, so nothing touches ~/.local/state.  Trees are
built with old mtimes (or ``min_age_seconds=0``) unless a test is about age.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import assert_same_tensors, flip_byte, record_span
from conftest import CliRun
from trees import (
    apparent_size,
    days_ago,
    held_by_another_process,
    ledger_lines,
    names,
    outcome_total,
    save_full,
    set_mtime,
    snapshot,
    truncate_to_half,
)

from sweeper.execute import execute_plan
from sweeper.intact import Verifier, verify_inventory
from sweeper.inventory import Inventory, scan
from sweeper.ledger import AppendEach
from sweeper.plan import SweepPlan, plan_sweep
from sweeper.policy import Action, Rules

REPO_ROOT = Path(__file__).resolve().parents[1]
PATTERNS = ("*.pt", "*.pth", "*.ckpt")


class Sweeper:
    """The CLI pointed at one tree and a ledger in tmp_path."""

    def __init__(self, tmp_path: Path, run: Callable[..., CliRun]) -> None:
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.ledger = tmp_path / "state" / "ledger.jsonl"
        self._run = run

    def __call__(self, *args: str | os.PathLike[str], env: dict[str, str] | None = None) -> CliRun:
        """``sweeper sweep ROOT ARGS --ledger LEDGER``; stderr never carries progress here."""
        done: CliRun = self._run("sweep", self.root, *args, "--ledger", self.ledger, env=env)
        assert "\r" not in done.stderr, done.stderr
        return done

    def json(self, *args: str) -> dict[str, Any]:
        done = self("--json", *args)
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = done.json()
        return result

    def ledger_cli(self, *args: str) -> CliRun:
        done: CliRun = self._run("ledger", "--ledger", self.ledger, *args)
        return done


@pytest.fixture
def sweeper(tmp_path: Path, run_sweeper: Callable[..., CliRun]) -> Sweeper:
    return Sweeper(tmp_path, run_sweeper)


def planned(inventory: Inventory, rules: Rules) -> SweepPlan:
    """Verify what the deletions count on, then plan: what ``sweeper sweep`` does in process."""
    now_ns = time.time_ns()
    verified = verify_inventory(inventory, rules, now_ns=now_ns, verifier=Verifier())
    return plan_sweep(verified, rules, now_ns=now_ns)


def make_run(folder: Path, epochs: dict[str, int], *, age_days: float = 2) -> dict[str, Any]:
    """Full checkpoints named as given, each storing its epoch; mtimes old, increasing with the
    epoch (so neither mtime nor name is what the tests below rely on, unless they set them)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name, epoch in epochs.items():
        saved[name] = save_full(
            folder / name, epoch=epoch, seed=epoch, mtime_ns=days_ago(age_days) + epoch
        )
    return saved


def by_name(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {os.path.basename(entry["path"]): entry for entry in entries}


def inference(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    return f"{stem}_inference.{suffix}"


def assert_copy_matches(copy: Path, saved: dict[str, Any]) -> None:
    """The inference copy loads with the safe loader and holds the original model's tensors."""
    loaded = torch.load(copy, weights_only=True)
    assert not any(key.startswith(("optimizer", "scheduler", "scaler", "rng")) for key in loaded)
    assert_same_tensors(saved["model_state_dict"], loaded["model_state_dict"])


# ---------------------------------------------------------------------------------------------
# Which files stay full.


def test_ordering_traps(sweeper: Sweeper) -> None:
    """Names, mtimes and restarts point different ways: a file stays full while it is among the
    N newest by stored epoch *or* among the N most recently written; names never decide."""
    names_trap = make_run(
        sweeper.root / "names",
        {
            "checkpoint_epoch_7.pt": 7,
            "checkpoint_epoch_8.pt": 8,
            "checkpoint_epoch_9.pt": 9,
            "checkpoint_epoch_10.pt": 10,
        },
    )
    # Written in reverse order of epoch: epoch 10 has the oldest mtime of the last three.
    for name, days in (
        ("checkpoint_epoch_7.pt", 5),
        ("checkpoint_epoch_8.pt", 1),
        ("checkpoint_epoch_10.pt", 3),
    ):
        set_mtime(sweeper.root / "names" / name, days_ago(days))
    # A restarted run: epoch 3 was rewritten after epoch 5 (resumed from epoch 2).
    make_run(sweeper.root / "restarted", {"run_e4.pt": 4, "run_e5.pt": 5})
    save_full(sweeper.root / "restarted" / "run_e3.pt", epoch=3, mtime_ns=days_ago(0.5))
    # Copied from elsewhere: every mtime fresh, in scrambled order.
    copied = sweeper.root / "copied"
    copied.mkdir()
    now = time.time_ns()
    for epoch, seconds_ago in ((1, 5), (2, 30), (3, 20)):
        save_full(copied / f"c{epoch}.pt", epoch=epoch, mtime_ns=now - seconds_ago * 10**9)

    result = sweeper.json("min_age_seconds=0")

    assert names(sweeper.root / "names") == {
        "checkpoint_epoch_8.pt",
        "checkpoint_epoch_9.pt",
        "checkpoint_epoch_10.pt",
        *(inference(f"checkpoint_epoch_{n}.pt") for n in (7, 8, 9, 10)),
    }
    assert names(sweeper.root / "restarted") == {
        "run_e3.pt",
        "run_e4.pt",
        "run_e5.pt",
        *(inference(f"run_e{n}.pt") for n in (3, 4, 5)),
    }
    assert names(copied) == {"c1.pt", "c2.pt", "c3.pt", *(inference(f"c{n}.pt") for n in (1, 2, 3))}
    outcomes = by_name(result["outcomes"])
    assert outcomes["checkpoint_epoch_7.pt"]["action"] == "delete"
    assert "(epoch 7)" in outcomes["checkpoint_epoch_7.pt"]["reason"]
    assert "(epoch 10)" in outcomes["checkpoint_epoch_10.pt"]["reason"]
    assert "most recently written" in outcomes["checkpoint_epoch_8.pt"]["reason"]
    assert "restart: epochs start over at 3 after epoch 5" in outcomes["run_e3.pt"]["reason"]
    assert all(outcome["ok"] for outcome in result["outcomes"])
    for name, saved in names_trap.items():
        assert_copy_matches(sweeper.root / "names" / inference(name), saved)


def test_truncated_newest_file_is_skipped_and_does_not_count(sweeper: Sweeper) -> None:
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    save_full(run / "e4.pt", epoch=4, mtime_ns=days_ago(1))
    truncate_to_half(run / "e4.pt")
    os.mkfifo(run / "e5.pt")  # opening it for reading would hang a careless scanner
    before = snapshot(run)

    result = sweeper.json("min_age_seconds=0")

    # The two newest *intact* (epochs 3 and 2) stay full; the truncated one is left as it was.
    after = snapshot(run)
    assert names(run) == {
        *("e2.pt", "e3.pt", "e4.pt", "e5.pt"),
        *(inference(f"e{n}.pt") for n in (1, 2, 3)),
    }
    assert after[b"e4.pt"] == before[b"e4.pt"] and after[b"e5.pt"] == before[b"e5.pt"]
    assert "e4.pt" not in by_name(result["outcomes"])  # outcomes list only what was acted on
    assert result["counts"] == {"extract": 2, "delete": 1, "refresh": 0, "keep": 0, "skip": 2}
    plan = sweeper("--dry-run", "--json", "min_age_seconds=0").json()
    assert by_name(plan["entries"])["e4.pt"]["reason"].startswith("skipped: truncated")
    assert "FIFO" in by_name(plan["entries"])["e5.pt"]["reason"]


@pytest.mark.parametrize("pin", ["none", "keep-file", "flock"])
def test_pins(sweeper: Sweeper, pin: str) -> None:
    """A pinned old checkpoint stays full (and still gets its copy).  "none" is the control:
    the same file is deleted when nothing pins it."""
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    if pin == "keep-file":
        (run / "e1.pt.keep").touch()
    if pin == "flock":
        with held_by_another_process(run / "e1.pt", "flock"):
            result = sweeper.json("min_age_seconds=0")
    else:
        result = sweeper.json("min_age_seconds=0")

    outcome = by_name(result["outcomes"])["e1.pt"]
    assert outcome["ok"]
    if pin == "none":
        assert outcome["action"] == "delete"
        assert not (run / "e1.pt").exists()
    else:
        assert outcome["action"] == "extract"
        assert "pinned by" in outcome["reason"]
        assert (run / "e1.pt").exists()
    assert (run / inference("e1.pt")).exists()
    assert "e2.pt" in names(run) and "e3.pt" in names(run)


def test_files_open_for_writing_are_neither_deleted_nor_extracted(sweeper: Sweeper) -> None:
    """The newest and the oldest checkpoint are both held open for writing by another process:
    neither is touched, and the newest does not count toward N."""
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3, "e4.pt": 4})
    before = snapshot(run)
    with (
        held_by_another_process(run / "e4.pt", "write"),
        held_by_another_process(run / "e1.pt", "write"),
    ):
        result = sweeper.json("min_age_seconds=0")
    after = snapshot(run)

    assert after[b"e1.pt"] == before[b"e1.pt"]
    assert after[b"e4.pt"] == before[b"e4.pt"]
    assert names(run) == {"e1.pt", "e2.pt", "e3.pt", "e4.pt", "e2_inference.pt", "e3_inference.pt"}
    assert result["counts"] == {"extract": 2, "delete": 0, "refresh": 0, "keep": 0, "skip": 2}
    assert set(by_name(result["outcomes"])) == {"e2.pt", "e3.pt"}


@pytest.mark.parametrize("link_name", ["best.pt", "latest"])
@pytest.mark.parametrize("where", ["same folder", "another run folder"])
def test_symlinks_are_never_followed_and_pin_their_target(
    sweeper: Sweeper, where: str, link_name: str
) -> None:
    """A symlink to an old full checkpoint: the link is never acted on, its target is never
    deleted (whatever the link is called, wherever under the roots it sits)."""
    run_a = sweeper.root / "run_a"
    run_b = sweeper.root / "run_b"
    make_run(run_a, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    make_run(run_b, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    link = (run_a if where == "same folder" else run_b) / link_name
    link.symlink_to(os.path.relpath(run_a / "e1.pt", link.parent))
    target_before = snapshot(run_a)[b"e1.pt"]

    result = sweeper.json("min_age_seconds=0")

    assert snapshot(run_a)[b"e1.pt"] == target_before
    assert os.readlink(link) == os.path.relpath(run_a / "e1.pt", link.parent)
    assert not (link.parent / inference(link_name)).exists()
    assert not (run_b / "e1.pt").exists()  # the control: unpinned, demoted
    paths = [entry["path"] for entry in result["outcomes"]]
    assert os.fspath(link) not in paths
    assert os.fspath(run_a / "e1.pt") in paths  # it still gets its inference copy


def test_symlinked_subfolder_is_never_entered(sweeper: Sweeper, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_run(outside / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    make_run(sweeper.root / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    (sweeper.root / "elsewhere").symlink_to(outside)
    before = snapshot(outside)

    result = sweeper.json("min_age_seconds=0")

    assert snapshot(outside) == before
    assert result["counts"]["delete"] == 1  # the real run folder was swept
    assert not any("elsewhere" in entry["path"] for entry in result["outcomes"])
    plan = sweeper("--dry-run", "--json", "min_age_seconds=0").json()
    assert not any("elsewhere" in entry["path"] for entry in plan["entries"])


def test_hard_linked_file_is_never_deleted(sweeper: Sweeper, tmp_path: Path) -> None:
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    os.link(run / "e1.pt", tmp_path / "someone_elses_copy.pt")

    plan = sweeper.json("--keep-full", "1", "min_age_seconds=0", "--dry-run")
    result = sweeper.json("--keep-full", "1", "min_age_seconds=0")

    (e1,) = [e for e in plan["entries"] if e["path"].endswith("/e1.pt")]
    assert e1["action"] == "keep"  # and no copy: one per link could fill the disk
    assert "2 hard links, some outside this folder" in e1["reason"]
    outcomes = by_name(result["outcomes"])
    assert "e1.pt" not in outcomes
    assert outcomes["e2.pt"]["action"] == "delete"  # the control
    assert names(run) == {"e1.pt", "e3.pt", *(inference(f"e{n}.pt") for n in (2, 3))}
    assert os.stat(run / "e1.pt").st_nlink == 2


def test_min_age_seconds(sweeper: Sweeper) -> None:
    run = sweeper.root / "run"
    run.mkdir()
    save_full(run / "e1.pt", epoch=1, mtime_ns=days_ago(2))
    save_full(run / "e2.pt", epoch=2, mtime_ns=time.time_ns() - 100 * 1_000_000_000)
    save_full(run / "e3.pt", epoch=3)

    result = sweeper.json("--keep-full", "1", "min_age_seconds=600")

    outcomes = by_name(result["outcomes"])
    assert outcomes["e1.pt"]["action"] == "delete"
    assert outcomes["e2.pt"]["action"] == "extract"
    assert "younger than min_age_seconds=600" in outcomes["e2.pt"]["reason"]
    assert names(run) == {"e2.pt", "e3.pt", *(inference(f"e{n}.pt") for n in (1, 2, 3))}


# ---------------------------------------------------------------------------------------------
# Plan, execution and ledger agree.


def mixed_tree(root: Path) -> dict[Path, dict[str, Any]]:
    """Several run folders with work of every kind; returns what was saved, by path."""
    saved: dict[Path, dict[str, Any]] = {}
    for run, count in (("alice/run1", 4), ("alice/run2", 2), ("bob/sweep/run3", 3)):
        folder = root / run
        for name, checkpoint in make_run(
            folder, {f"ckpt_{n}.pt": n for n in range(1, count + 1)}
        ).items():
            saved[folder / name] = checkpoint
    (root / "bob" / "notes.txt").write_text("not a checkpoint")
    return saved


def test_dry_run_changes_nothing(sweeper: Sweeper, tmp_path: Path) -> None:
    mixed_tree(sweeper.root)
    before = snapshot(tmp_path)

    text = sweeper("--dry-run", "min_age_seconds=0")
    plan = sweeper("--dry-run", "--json", "min_age_seconds=0").json()

    assert text.returncode == 0, text.stderr
    assert snapshot(tmp_path) == before
    assert not sweeper.ledger.parent.exists()  # neither the ledger nor its lock file
    assert plan["dry_run"] is True
    assert plan["counts"]["delete"] == 3 and plan["counts"]["extract"] == 6
    assert plan["expected_reclaimed_bytes"] > 0
    assert "expected to reclaim" in text.stdout
    assert "KiB" in text.stdout


def test_plan_equals_actual_equals_ledger(sweeper: Sweeper) -> None:
    saved = mixed_tree(sweeper.root)
    odd = sweeper.root / "alice" / "run1" / "ckpt_1.pt"
    os.chmod(odd, 0o640)
    if os.geteuid() == 0:  # alice's own run folder and files: only the owner's files count
        for path in (odd.parent, *odd.parent.iterdir()):
            os.chown(path, 12345, 23456)
    odd_stat = os.stat(odd)
    size_before = apparent_size(sweeper.root)

    plan = sweeper("--dry-run", "--json", "min_age_seconds=0").json()
    result = sweeper.json("min_age_seconds=0")
    size_after = apparent_size(sweeper.root)

    records = ledger_lines(sweeper.ledger)
    (run_id,) = {record["run_id"] for record in records}
    assert plan["expected_reclaimed_bytes"] > 0
    assert plan["expected_reclaimed_bytes"] == sum(e["reclaimed_bytes"] for e in plan["entries"])
    assert result["expected_reclaimed_bytes"] == plan["expected_reclaimed_bytes"]
    assert result["reclaimed_bytes"] == plan["expected_reclaimed_bytes"]
    assert outcome_total(records, run_id) == plan["expected_reclaimed_bytes"]
    assert size_before - size_after == plan["expected_reclaimed_bytes"]
    # Each delete was preceded by its copy and its intent, in that order.
    for entry in result["outcomes"]:
        actions = [r["action"] for r in records if r["path"] == entry["path"]]
        if entry["action"] == "delete":
            assert actions == ["extract-intent", "extract", "delete-intent", "delete"]
        else:
            assert actions == ["extract-intent", "extract"]
    # The copy of a deleted checkpoint keeps its owner, group and mode.
    copy = os.stat(odd.with_name(inference(odd.name)))
    assert (copy.st_uid, copy.st_gid) == (odd_stat.st_uid, odd_stat.st_gid)
    assert stat.S_IMODE(copy.st_mode) == 0o640
    # Every inference copy is a real, safe-to-load checkpoint of the original model.
    for path, checkpoint in saved.items():
        assert_copy_matches(path.with_name(inference(path.name)), checkpoint)

    again = sweeper.json("min_age_seconds=0")
    assert again["reclaimed_bytes"] == 0
    assert again["expected_reclaimed_bytes"] == 0
    assert again["outcomes"] == []
    assert apparent_size(sweeper.root) == size_after
    assert ledger_lines(sweeper.ledger) == records


def test_torn_ledger_last_line(sweeper: Sweeper) -> None:
    make_run(sweeper.root / "run1", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    assert sweeper("min_age_seconds=0").returncode == 0
    with sweeper.ledger.open("ab") as ledger:
        ledger.write(b'{"v":1,"time":"2026-01-0')  # a crash mid-append
    make_run(sweeper.root / "run2", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    size_before = apparent_size(sweeper.root)

    done = sweeper("--json", "min_age_seconds=0")

    assert done.returncode == 0, done.stderr
    assert "torn" in done.stderr
    assert done.json()["reclaimed_bytes"] == size_before - apparent_size(sweeper.root)
    data = sweeper.ledger.read_bytes()
    assert b'"2026-01-0\n{' in data  # the torn line was ended; the next record stands alone
    totals = sweeper.ledger_cli("--json")
    assert totals.returncode == 0
    assert "line" in totals.stderr and "skipped" in totals.stderr
    good = [json.loads(line) for line in data.splitlines() if not line.endswith(b"-0")]
    assert totals.json()["reclaimed_bytes"] == outcome_total(good)
    assert outcome_total(good) > 0


def start_sweep(*args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("JOURNAL_STREAM", None)
    return subprocess.Popen(
        [sys.executable, "-m", "sweeper", "sweep", *map(os.fspath, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_two_sweeps_at_once(sweeper: Sweeper) -> None:
    saved = mixed_tree(sweeper.root)
    size_before = apparent_size(sweeper.root)
    args = (sweeper.root, "--json", "min_age_seconds=0", "--ledger", sweeper.ledger)

    first, second = start_sweep(*args), start_sweep(*args)
    results = []
    for process in (first, second):
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
        results.append(json.loads(stdout))

    size_after = apparent_size(sweeper.root)
    # One did all the work (6 copies, 3 deletions); the other, waiting, then found none left.
    assert sorted(len(r["outcomes"]) for r in results) == [0, 9]
    assert sum(r["reclaimed_bytes"] for r in results) == size_before - size_after
    records = ledger_lines(sweeper.ledger)
    assert outcome_total(records) == size_before - size_after
    outputs = [r["output"] for r in records if r["action"] == "extract"]
    assert len(outputs) == len(set(outputs)) == len(saved)
    assert sum(r["action"] == "delete" for r in records) == 3
    assert not any(o["ok"] is False for r in results for o in r["outcomes"])
    for path in saved:
        assert path.with_name(inference(path.name)).exists()
    assert sorted(p.name for p in sweeper.root.rglob("ckpt_?.pt")) == sorted(
        ["ckpt_3.pt", "ckpt_4.pt", "ckpt_1.pt", "ckpt_2.pt", "ckpt_2.pt", "ckpt_3.pt"]
    )


# ---------------------------------------------------------------------------------------------
# A shared server is hostile ground.


@pytest.mark.parametrize(
    ("swapped", "target"),
    [
        ("run folder", "the moved folder itself"),
        ("run folder", "a decoy tree"),
        ("folder above the run", "the moved folder itself"),
        ("folder above the run", "a decoy tree"),
        ("the root itself", "a decoy tree"),
    ],
)
def test_folder_swapped_for_a_symlink_mid_sweep(tmp_path: Path, swapped: str, target: str) -> None:
    """Plan, then swap a folder for a symlink to a tree outside the roots, then execute: nothing
    outside the roots changes, and the entries under the swapped folder fail cleanly."""
    root = tmp_path / "root"
    make_run(root / "alice" / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    make_run(root / "bob" / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    roots = [os.fspath(root / "alice" / "run"), os.fspath(root / "bob")]
    if swapped != "the root itself":
        roots = [os.fspath(root)]
    plan = planned(scan(roots, PATTERNS), Rules(keep_full=1, min_age_seconds=0))
    assert plan.count(Action.DELETE) == 4

    outside = tmp_path / "outside"
    outside.mkdir()
    victim = root / "alice" if swapped == "folder above the run" else root / "alice" / "run"
    moved = outside / "moved"
    os.rename(victim, moved)
    if target == "a decoy tree":
        decoy = outside / "decoy"
        make_run(decoy / "run" if victim.name == "alice" else decoy, {"e1.pt": 1, "e2.pt": 2})
        victim.symlink_to(decoy)
    else:
        victim.symlink_to(moved)
    before = snapshot(outside)

    report = execute_plan(plan, AppendEach(str(tmp_path / "ledger.jsonl")), run_id="hostile")

    assert snapshot(outside) == before
    alice = [o for o in report.outcomes if "/alice/" in o.entry.path]
    bob = [o for o in report.outcomes if "/bob/" in o.entry.path]
    assert len(alice) == 3 and len(bob) == 3
    assert not any(o.ok for o in alice)
    assert all("cannot open its folder safely" in o.detail for o in alice)
    assert all(o.ok for o in bob)
    assert names(root / "bob" / "run") == {"e3.pt", *(inference(f"e{n}.pt") for n in (1, 2, 3))}
    records = ledger_lines(tmp_path / "ledger.jsonl")
    failed = {r["path"] for r in records if r["action"] == "fail"}
    assert failed == {o.entry.path for o in alice}
    assert outcome_total(records) == report.reclaimed_bytes


def test_output_path_turned_into_a_directory_mid_sweep(tmp_path: Path) -> None:
    """One file's extraction fails; the rest of the sweep completes."""
    run = tmp_path / "root" / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    plan = planned(
        scan([os.fspath(tmp_path / "root")], PATTERNS), Rules(keep_full=2, min_age_seconds=0)
    )
    (run / "e2_inference.pt").mkdir()

    report = execute_plan(plan, AppendEach(str(tmp_path / "ledger.jsonl")), run_id="dir")

    outcomes = {os.path.basename(o.entry.path): o for o in report.outcomes}
    assert not outcomes["e2.pt"].ok
    assert outcomes["e1.pt"].ok and outcomes["e3.pt"].ok
    assert report.failures == 1
    assert names(run) == {"e2.pt", "e3.pt", "e1_inference.pt", "e2_inference.pt", "e3_inference.pt"}
    assert (run / "e2_inference.pt").is_dir()
    assert [r["action"] for r in ledger_lines(tmp_path / "ledger.jsonl")].count("fail") == 1


# ---------------------------------------------------------------------------------------------
# Names, exit codes and output streams.


def test_non_utf8_and_newline_names(sweeper: Sweeper) -> None:
    run = sweeper.root / "run"
    run.mkdir()
    raw = [b"ep\xff\n%d.pt" % n for n in (1, 2, 3)]
    saved = {}
    for n, name in enumerate(raw, start=1):
        saved[name] = save_full(os.path.join(os.fsencode(run), name), epoch=n, mtime_ns=days_ago(1))

    # Strict stdout encoding: a raw undecodable name would crash the table.
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    text = sweeper("--dry-run", "min_age_seconds=0", env=strict)
    assert text.returncode == 0, text.stderr
    # header, the run folder, one line per file, summary, then the owners' totals (title,
    # header, one owner)
    assert len(text.stdout.splitlines()) == 1 + 1 + 3 + 1 + 3
    done = sweeper("min_age_seconds=0", env=strict)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 1 + 1 + 3 + 1

    listed = set(os.listdir(os.fsencode(run)))
    assert listed == {raw[1], raw[2], *(n.replace(b".pt", b"_inference.pt") for n in raw)}
    for name, checkpoint in saved.items():
        copy = os.path.join(os.fsencode(run), name.replace(b".pt", b"_inference.pt"))
        assert_copy_matches(Path(os.fsdecode(copy)), checkpoint)
    records = ledger_lines(sweeper.ledger)  # strict, one object per line
    assert len(records) == sweeper.ledger.read_bytes().count(b"\n") == 3 + 3 + 2
    paths = {base64.b64decode(r["path_b64"]) for r in records}
    assert paths == {os.path.join(os.fsencode(run), name) for name in raw}
    totals = sweeper.ledger_cli("--json")
    assert totals.returncode == 0 and totals.stderr == ""
    assert totals.json()["reclaimed_bytes"] == outcome_total(records)


def test_one_failed_file_exits_1_and_the_rest_completes(sweeper: Sweeper) -> None:
    """A checkpoint whose tensor bytes are corrupt looks intact to the scan (directory and
    pickle only); its extraction fails the CRC check and everything else still happens."""
    bad_run = sweeper.root / "bad"
    make_run(bad_run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    offset, size = record_span(bad_run / "e1.pt", "/data/0")
    assert size > 0
    mtime = os.stat(bad_run / "e1.pt").st_mtime_ns
    flip_byte(bad_run / "e1.pt", offset)
    set_mtime(bad_run / "e1.pt", mtime)
    good_run = sweeper.root / "good"
    make_run(good_run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    before = snapshot(bad_run)[b"e1.pt"]

    done = sweeper("--json", "min_age_seconds=0")

    assert done.returncode == 1, done.stderr
    result = done.json()
    assert result["failures"] == 1
    (failed,) = [o for o in result["outcomes"] if not o["ok"]]
    assert failed["path"] == os.fspath(bad_run / "e1.pt")
    assert snapshot(bad_run)[b"e1.pt"] == before
    assert not (bad_run / "e1_inference.pt").exists()
    assert names(good_run) == {"e2.pt", "e3.pt", *(inference(f"e{n}.pt") for n in (1, 2, 3))}
    assert "e2_inference.pt" in names(bad_run) and "e3_inference.pt" in names(bad_run)
    assert "e1.pt" in done.stderr
    fails = [r for r in ledger_lines(sweeper.ledger) if r["action"] == "fail"]
    assert [r["path"] for r in fails] == [os.fspath(bad_run / "e1.pt")]
    assert result["reclaimed_bytes"] == outcome_total(ledger_lines(sweeper.ledger))


def test_output_name_taken_by_a_directory_is_kept_not_failed(sweeper: Sweeper) -> None:
    """Seen at scan time, a directory where the copy would go makes the planner keep the file."""
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    (run / "e1_inference.pt").mkdir()

    result = sweeper.json("min_age_seconds=0")

    assert (run / "e1.pt").is_file() and (run / "e1_inference.pt").is_dir()
    plan = sweeper("--dry-run", "--json", "min_age_seconds=0").json()
    entry = by_name(plan["entries"])["e1.pt"]
    assert entry["action"] == "keep"
    assert "e1_inference.pt exists" in entry["reason"]
    assert result["failures"] == 0


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--keep-full", "0", "min_age_seconds=0"], "keep_full"),
        (["keep_full=0", "min_age_seconds=0"], "keep_full"),
        (["no_such_key=1", "min_age_seconds=0"], "no_such_key"),
        (["min_age_seconds=soon"], "min_age_seconds"),
        (["min_age_seconds=-1"], "min_age_seconds"),
    ],
)
def test_config_errors_exit_2_naming_the_key(sweeper: Sweeper, args: list[str], key: str) -> None:
    make_run(sweeper.root / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    before = snapshot(sweeper.root)

    done = sweeper(*args)

    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr_lines) == 1, done.stderr
    assert repr(key) in done.stderr
    assert snapshot(sweeper.root) == before
    assert not sweeper.ledger.exists()


@pytest.mark.parametrize("spelling", ["roots=[/]", "/", "roots=[/tmp/..]"])
def test_root_of_slash_is_refused(
    run_sweeper: Callable[..., CliRun], tmp_path: Path, spelling: str
) -> None:
    done = run_sweeper("sweep", spelling, "--ledger", tmp_path / "ledger.jsonl")
    assert done.returncode == 2
    assert len(done.stderr_lines) == 1 and "'roots'" in done.stderr
    assert not (tmp_path / "ledger.jsonl").exists()


@pytest.mark.parametrize("folder", ["back\\slash", "it's", "${oc.env:HOME}", "a: b #c", "x\\${y}"])
def test_ledger_path_is_taken_verbatim(
    run_sweeper: Callable[..., CliRun], tmp_path: Path, folder: str
) -> None:
    (tmp_path / "root" / "run").mkdir(parents=True)
    save_full(tmp_path / "root" / "run" / "e1.pt", epoch=1)
    ledger = tmp_path / folder / "ledger.jsonl"

    done = run_sweeper("sweep", tmp_path / "root", "--ledger", ledger)

    assert done.returncode == 0, done.stderr
    assert [r["action"] for r in ledger_lines(ledger)] == ["extract-intent", "extract"]
    assert sorted(os.listdir(tmp_path)) == sorted(["root", folder.split("/")[0]])


def test_unknown_option_after_a_root_is_still_a_usage_error(sweeper: Sweeper) -> None:
    done = sweeper("--json", "--no-such-option", "keep_full=2")
    assert done.returncode == 2
    assert "--no-such-option" in done.stderr
    assert done.stdout == ""


def test_progress_only_on_a_terminal(sweeper: Sweeper) -> None:
    """With stderr a terminal, progress appears there (and stdout stays data); the other tests
    show none when stderr is a pipe."""
    make_run(sweeper.root / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "sweeper", "sweep", os.fspath(sweeper.root), "--json"),
                *("min_age_seconds=0", "--ledger", os.fspath(sweeper.ledger)),
            ],
            stdout=subprocess.PIPE,
            stderr=terminal,
            text=True,
        )
        os.close(terminal)
        stdout, _ = process.communicate(timeout=60)
        stderr = b"".join(_drain(controller))
    finally:
        os.close(controller)
    assert process.returncode == 0
    assert b"\r" in stderr and b"sweeping" in stderr
    assert json.loads(stdout)["counts"]["delete"] == 1


def _drain(fd: int) -> Iterator[bytes]:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other side is closed
            return
        if not chunk:
            return
        yield chunk


def test_json_is_one_object_on_stdout(sweeper: Sweeper) -> None:
    make_run(sweeper.root / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    for args in (["--dry-run", "--json"], ["--json"], ["--json"]):
        done = sweeper(*args, "min_age_seconds=0")
        assert done.returncode == 0
        result = done.json()  # exactly one line, one object
        assert isinstance(result, dict)
        assert isinstance(result["expected_reclaimed_bytes"], int)
        assert "INFO" not in done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a folder to another user")
def test_a_literal_root_is_not_followed_through_a_users_symlink(tmp_path: Path) -> None:
    """Root sweeps /…/home/alice/results/checkpoints; alice owns her home and swaps `results`
    for a symlink to a folder outside the roots: nothing there may change."""
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    outside = tmp_path / "outside" / "checkpoints" / "run"
    outside.mkdir(parents=True)
    for epoch in (1, 2, 3):
        save_full(outside / f"epoch_{epoch}.pt", epoch=epoch)
    os.chown(home, 12345, 12345)
    os.symlink(tmp_path / "outside", home / "results")
    before = snapshot(tmp_path / "outside")

    root = str(home / "results" / "checkpoints")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeper",
            "sweep",
            root,
            "min_age_seconds=0",
            f"--ledger={tmp_path / 'ledger.jsonl'}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert snapshot(tmp_path / "outside") == before
    assert "matches no folder" in run.stdout + run.stderr


def test_a_ledger_that_takes_no_records_stops_the_sweep_before_any_action(
    sweeper: Sweeper, tmp_path: Path
) -> None:
    """No action is taken that could not be recorded: a ledger path that is a FIFO fails the
    sweep up front, in one line, with nothing written or deleted."""
    make_run(sweeper.root / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    sweeper.ledger.parent.mkdir(parents=True)
    os.mkfifo(sweeper.ledger)
    before = snapshot(sweeper.root)

    done = sweeper("min_age_seconds=0")

    assert done.returncode == 1
    (line,) = done.stderr_lines
    assert line.endswith(f"ledger {sweeper.ledger}: is not a regular file; no action taken")
    assert snapshot(sweeper.root) == before


def test_only_provable_stale_temps_are_cleaned_and_recorded(sweeper: Sweeper) -> None:
    """A crash mid-extraction leaves a fallocated temp, marked as sweeper's own: a sweep removes
    it (an hour old), even in a folder with nothing else to do, and records it.  A user's file
    that merely has such a name is never touched."""
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1})
    done = sweeper("min_age_seconds=0")  # e1's copy: the folder now has nothing to do
    assert done.returncode == 0, done.stderr
    copy = run / "e1_inference.pt"
    with pytest.raises(OSError):
        os.getxattr(copy, "user.sweeper.temp")  # a finished copy is no temp
    leftover = run / ".e1_inference.pt.sweeper-tmp-0123456789ab"
    leftover.write_bytes(b"\0" * 4096)
    os.setxattr(leftover, "user.sweeper.temp", b"1")
    users = run / ".notes.sweeper-tmp-mine"
    users.write_bytes(b"a user's file")
    two_hours_ago = time.time_ns() - 2 * 3600 * 10**9
    for path in (leftover, users):
        set_mtime(path, two_hours_ago)

    result = sweeper.json("min_age_seconds=0")

    assert result["outcomes"] == []
    assert not leftover.exists()
    assert users.read_bytes() == b"a user's file"
    (record,) = [r for r in ledger_lines(sweeper.ledger) if r["action"] == "remove-temp"]
    assert record["path"].endswith(leftover.name) and record["bytes_deleted"] == 4096
    assert record["reclaimed_bytes"] is None  # never counted as written: not in the totals


def test_a_ledger_on_a_full_disk_stops_the_sweep_before_any_action(
    sweeper: Sweeper, tmp_path: Path
) -> None:
    """A full disk opens a ledger fine and then fails its first record, after a copy was made:
    the sweep checks there is room for records before it acts."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    make_run(sweeper.root / "run", {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    state = sweeper.ledger.parent
    state.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", state]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (state / "filler").write_bytes(b"\0" * (2 * 1024 * 1024 - 256 * 1024))
        before = snapshot(sweeper.root)
        done = sweeper("min_age_seconds=0")
    finally:
        subprocess.run(["umount", state], check=True)

    assert done.returncode == 1
    (line,) = done.stderr_lines
    assert "no room for records" in line and line.endswith("no action taken")
    assert snapshot(sweeper.root) == before
