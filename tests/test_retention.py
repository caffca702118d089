"""Retention end to end: which full checkpoints stay, through the real ``sweeper sweep``.

One section per failure of the retention issue (restarted runs, rolling names, stale copies,
a corrupt newest file, a plan gone stale before its deletions, foreign files), then files held
open for reading and the keep rules (``keep_best``, ``keep_every``, ``keep_inference``).  Each
CLI scenario also checks the accounting: the dry run's expected bytes equal what the real sweep
reclaimed, the ledger's outcome total and the tree's drop in apparent size, and a second sweep
finds nothing to do.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import (
    flip_byte,
    full_checkpoint,
    overwrite,
    record_span,
    temp_files,
    tiny_model,
)
from conftest import CliRun
from test_sweep import PATTERNS, Sweeper, assert_copy_matches, by_name, inference, make_run, planned
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
)

from sweeper import extract as extract_module
from sweeper.execute import execute_plan
from sweeper.inventory import scan
from sweeper.ledger import AppendEach
from sweeper.policy import Action, Rules

MINUTE_NS = 60 * 1_000_000_000
NO_AGE = "min_age_seconds=0"


@pytest.fixture
def sweeper(tmp_path: Path, run_sweeper: Callable[..., CliRun]) -> Sweeper:
    return Sweeper(tmp_path, run_sweeper)


def sweep_and_account(
    sweeper: Sweeper, *args: str, code: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Dry run, real sweep, second sweep, all with ``args``.

    The dry run changes nothing; its ``expected_reclaimed_bytes`` equals what the real sweep
    reclaimed, the ledger's outcome total for that sweep and the tree's drop in apparent size;
    the dry run planned the same action for every file the real sweep did; the second sweep has
    no outcomes and reclaims nothing; each exits ``code``.  Returns (dry run, real sweep)."""
    before = snapshot(sweeper.root)
    plan = sweeper("--dry-run", "--json", *args).json()
    assert snapshot(sweeper.root) == before
    known = len(ledger_lines(sweeper.ledger)) if sweeper.ledger.exists() else 0
    size_before = apparent_size(sweeper.root)

    done = sweeper("--json", *args)  # exit ``code``: 1 when the tree holds refused files
    assert done.returncode == code, done.stderr
    result: dict[str, Any] = done.json()

    size_after = apparent_size(sweeper.root)
    records = ledger_lines(sweeper.ledger)[known:]
    run_ids = {record["run_id"] for record in records}
    assert len(run_ids) == (1 if records else 0)
    assert all(outcome["ok"] for outcome in result["outcomes"]), result["outcomes"]
    assert plan["counts"] == result["counts"]
    planned_actions = {e["path"]: e["action"] for e in plan["entries"]}
    for outcome in result["outcomes"]:
        assert planned_actions[outcome["path"]] == outcome["action"]
    expected = plan["expected_reclaimed_bytes"]
    assert expected == sum(entry["reclaimed_bytes"] for entry in plan["entries"])
    assert result["expected_reclaimed_bytes"] == expected
    assert result["reclaimed_bytes"] == expected
    assert outcome_total(records, run_ids.pop() if run_ids else None) == expected
    assert size_before - size_after == expected

    again_done = sweeper("--json", *args)
    assert again_done.returncode == code, again_done.stderr
    again = again_done.json()
    assert again["outcomes"] == []
    assert again["reclaimed_bytes"] == again["expected_reclaimed_bytes"] == 0
    assert apparent_size(sweeper.root) == size_after
    return plan, result


def kept_full(folder: Path) -> set[str]:
    """The full checkpoints left in ``folder`` (every name that is not a copy)."""
    return {name for name in names(folder) if "_inference." not in name}


def copies(folder: Path) -> set[str]:
    return {name for name in names(folder) if "_inference." in name}


def save_checkpoint(
    path: Path, *, epoch: int, mtime_ns: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``torch.save`` a full checkpoint (tiny model seeded ``epoch``) with ``extra`` top-level
    keys such as ``best_val_acc``; returns what was saved."""
    checkpoint = full_checkpoint(epoch=epoch, model=tiny_model(epoch), extra=extra)
    torch.save(checkpoint, path)
    set_mtime(path, mtime_ns)
    return checkpoint


# ---------------------------------------------------------------------------------------------
# 1. A restarted run: both orderings keep their newest.


def test_restarted_run_keeps_the_newest_by_epoch_and_the_newest_written(sweeper: Sweeper) -> None:
    """An earlier run's epochs 8-10 (a day old) and a restarted run's epochs 1-3 (this hour)
    share a folder.  keep_full=2 keeps the two newest by stored epoch (old_epoch10, 9) *and*
    the two most recently written (restart_epoch3, 2); the reason of restart_epoch2 names the
    restart.  Only old_epoch8 and restart_epoch1 are deleted, each after its copy."""
    run = sweeper.root / "run"
    run.mkdir()
    saved = {}
    for epoch in (8, 9, 10):
        name = f"old_epoch{epoch}.pt"
        saved[name] = save_full(run / name, epoch=epoch, seed=epoch, mtime_ns=days_ago(1) + epoch)
    now = time.time_ns()
    for epoch in (1, 2, 3):
        name = f"restart_epoch{epoch}.pt"
        mtime = now - (50 - 10 * epoch) * MINUTE_NS  # 40, 30 and 20 minutes ago
        saved[name] = save_full(run / name, epoch=epoch, seed=100 + epoch, mtime_ns=mtime)

    plan, result = sweep_and_account(sweeper, NO_AGE)

    entries = by_name(plan["entries"])
    assert {name for name, e in entries.items() if e["action"] == "delete"} == {
        "old_epoch8.pt",
        "restart_epoch1.pt",
    }
    reason = entries["restart_epoch2.pt"]["reason"]
    assert "restart: epochs start over at 1 after epoch 10" in reason
    assert "one of the 2 most recently written" in reason
    assert "(epoch 9)" in entries["old_epoch9.pt"]["reason"]
    assert result["counts"]["delete"] == 2
    assert kept_full(run) == {
        "old_epoch9.pt",
        "old_epoch10.pt",
        "restart_epoch2.pt",
        "restart_epoch3.pt",
    }
    assert copies(run) == {inference(name) for name in saved}
    for name, checkpoint in saved.items():
        assert_copy_matches(run / inference(name), checkpoint)


# ---------------------------------------------------------------------------------------------
# 2. Rolling names are never deleted and never take a keep_full slot.


def test_rolling_names_are_kept_with_a_copy_and_take_no_slot(sweeper: Sweeper) -> None:
    """best_model.pt (an old epoch, the oldest mtime) and last.pt (the newest epoch, written
    last) sit beside epoch_1..4.pt.  Neither is deleted, both get a copy, and neither takes a
    keep_full slot: had last.pt counted, it would have been first by epoch and by mtime and
    pushed epoch_3 out of keep_full=2."""
    run = sweeper.root / "run"
    saved = make_run(run, {f"epoch_{n}.pt": n for n in (1, 2, 3, 4)})
    saved["best_model.pt"] = save_full(run / "best_model.pt", epoch=2, seed=2, mtime_ns=days_ago(9))
    saved["last.pt"] = save_full(run / "last.pt", epoch=4, seed=4, mtime_ns=days_ago(0.5))

    plan, _ = sweep_and_account(sweeper, "--keep-full", "2", NO_AGE)

    assert kept_full(run) == {"best_model.pt", "last.pt", "epoch_3.pt", "epoch_4.pt"}
    assert copies(run) == {inference(name) for name in saved}
    for name, checkpoint in saved.items():
        assert_copy_matches(run / inference(name), checkpoint)
    entries = by_name(plan["entries"])
    for name in ("best_model.pt", "last.pt"):
        assert entries[name]["action"] == "extract"
        assert "rolling name" in entries[name]["reason"]
    assert entries["epoch_1.pt"]["action"] == entries["epoch_2.pt"]["action"] == "delete"


# ---------------------------------------------------------------------------------------------
# 3. Copies name their source: stale ones are refreshed, foreign ones never overwritten.


def test_rewritten_rolling_checkpoint_gets_its_copy_refreshed(sweeper: Sweeper) -> None:
    """After a sweep made best_model_inference.pt, training overwrites best_model.pt with a
    later epoch.  The next dry run plans a refresh (writing the new copy's bytes, deleting the
    old copy's); the real sweep puts a new file in its place (a new inode, no temporary left)
    holding the new weights, and records a "refresh" in the ledger."""
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    first = save_full(run / "best_model.pt", epoch=2, seed=2, mtime_ns=days_ago(1))
    assert sweeper.json(NO_AGE)["failures"] == 0
    copy = run / "best_model_inference.pt"
    assert_copy_matches(copy, first)
    old_copy = os.stat(copy)

    newer = save_full(run / "best_model.pt", epoch=3, seed=33)
    plan, result = sweep_and_account(sweeper, NO_AGE)

    entry = by_name(plan["entries"])["best_model.pt"]
    assert entry["action"] == "refresh"
    assert "stale" in entry["reason"]
    assert entry["bytes_deleted"] == old_copy.st_size
    assert entry["bytes_written"] == os.stat(copy).st_size
    assert [o["path"] for o in result["outcomes"]] == [os.fspath(run / "best_model.pt")]
    assert result["outcomes"][0]["detail"] == "refreshed"
    assert os.stat(copy).st_ino != old_copy.st_ino
    assert temp_files(run) == []
    assert_copy_matches(copy, newer)
    refreshes = [r for r in ledger_lines(sweeper.ledger) if r["action"] == "refresh"]
    assert [r["path"] for r in refreshes] == [os.fspath(run / "best_model.pt")]
    assert refreshes[0]["output"] == os.fspath(copy)


def test_training_rerun_into_the_same_folder_refreshes_and_demotes_again(sweeper: Sweeper) -> None:
    """A run is swept (e1, e2 demoted, e3 kept), then trained again into the same folder:
    e1..e3 are rewritten with new weights while the old copies are still there.  Every stale
    copy is refreshed, and e1, e2 are demoted again rather than kept full for ever."""
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    assert sweeper.json("--keep-full", "1", NO_AGE)["counts"]["delete"] == 2
    assert kept_full(run) == {"e3.pt"}

    rerun = {}
    now = time.time_ns()
    for epoch in (1, 2, 3):
        name = f"e{epoch}.pt"
        rerun[name] = save_full(
            run / name, epoch=epoch, seed=50 + epoch, mtime_ns=now - (4 - epoch) * MINUTE_NS
        )
    plan, _ = sweep_and_account(sweeper, "--keep-full", "1", NO_AGE)

    entries = by_name(plan["entries"])
    assert entries["e3.pt"]["action"] == "refresh"
    for name in ("e1.pt", "e2.pt"):
        assert entries[name]["action"] == "delete"
        assert "kept aside as another version's copy" in entries[name]["reason"]
    # The first run's copies are all that is left of its epochs: kept under their own names.
    superseded = {name for name in names(run) if ".superseded-" in name}
    assert len(superseded) == 3
    assert names(run) == {"e3.pt", *(inference(name) for name in rerun), *superseded}
    for name, checkpoint in rerun.items():
        assert_copy_matches(run / inference(name), checkpoint)
    for name in superseded:  # the old weights, not the rerun's
        old = torch.load(run / name, weights_only=True)["model_state_dict"]
        new = rerun[name.split(".superseded-")[0] + ".pt"]["model_state_dict"]
        assert any(not torch.equal(old[key], new[key]) for key in new)


def test_a_users_file_under_the_copys_name_is_never_overwritten(sweeper: Sweeper) -> None:
    """A user saved their own dict as epoch_1_inference.pt: sweeper did not write it, so it is
    left byte for byte, and epoch_1.pt, which would be demoted, stays full instead."""
    run = sweeper.root / "run"
    make_run(run, {f"epoch_{n}.pt": n for n in (1, 2, 3)})
    mine = run / "epoch_1_inference.pt"
    torch.save({"model_state_dict": tiny_model(7).state_dict(), "note": "mine"}, mine)
    set_mtime(mine, days_ago(3))
    before = snapshot(run)[b"epoch_1_inference.pt"]

    plan, _ = sweep_and_account(sweeper, "--keep-full", "1", NO_AGE)

    entry = by_name(plan["entries"])["epoch_1.pt"]
    assert entry["action"] == "keep"
    assert "not this checkpoint's copy" in entry["reason"]
    assert snapshot(run)[b"epoch_1_inference.pt"] == before
    assert kept_full(run) == {"epoch_1.pt", "epoch_3.pt"}  # epoch_2 is the control: demoted
    assert copies(run) == {inference(f"epoch_{n}.pt") for n in (1, 2, 3)}


def test_a_copy_carried_in_from_another_folder_is_never_overwritten(sweeper: Sweeper) -> None:
    """Runs share names (e1.pt): a copy sweeper made in run a, moved into run b, names a's
    e1.pt, not b's.  It may be all that is left of a's epoch 1, so b's sweep must not write over
    it with b's weights: it is kept aside, untouched, and b's e1.pt gets a copy of its own."""
    a, b = sweeper.root / "a", sweeper.root / "b"
    make_run(a, {f"e{n}.pt": n for n in (1, 2, 3)})
    b.mkdir()
    base = days_ago(2)
    for n in (1, 2, 3):  # b holds other weights under the same names
        save_full(b / f"e{n}.pt", epoch=n, seed=10 + n, mtime_ns=base + n)
    done = sweeper("--keep-full", "1", NO_AGE)  # demotes a's e1 and e2, and b's
    assert done.returncode == 0, done.stderr
    for n in (1, 2):  # b's copies and full files are gone; a's copy of e1 is moved in
        (b / f"e{n}_inference.pt").unlink()
    os.rename(a / "e1_inference.pt", b / "e1_inference.pt")
    b_e1 = save_full(b / "e1.pt", epoch=1, seed=21, mtime_ns=base + 1)  # b's e1 again
    save_full(b / "e2.pt", epoch=2, seed=22, mtime_ns=base + 2)
    before = snapshot(b)[b"e1_inference.pt"]

    plan, _ = sweep_and_account(sweeper, "--keep-full", "1", NO_AGE)

    entry = by_name([e for e in plan["entries"] if "/b/" in e["path"]])["e1.pt"]
    assert entry["action"] == "delete"
    assert "stale e1_inference.pt kept aside as another version's copy" in entry["reason"]
    (aside,) = [name for name in snapshot(b) if b".superseded-" in name]
    assert aside.endswith(b"_inference.pt")
    assert snapshot(b)[aside] == before  # the very file, bytes and inode, under a new name
    assert kept_full(b) == {"e3.pt"}
    assert_copy_matches(b / "e1_inference.pt", b_e1)


# ---------------------------------------------------------------------------------------------
# 4. A corrupt newest file justifies no deletion.


def save_large(path: Path, *, epoch: int, mtime_ns: int) -> dict[str, Any]:
    """A full checkpoint whose model holds a 64 KiB weight, big enough to zero 4 KiB inside."""
    model = tiny_model(epoch)
    torch.manual_seed(1000 + epoch)
    state = {**model.state_dict(), "proj.weight": torch.randn(128, 128)}
    checkpoint = full_checkpoint(epoch=epoch, model=model, model_state=state)
    torch.save(checkpoint, path)
    set_mtime(path, mtime_ns)
    return checkpoint


def largest_data_record(path: Path) -> tuple[int, int]:
    """(offset, size) of the biggest tensor data record of a checkpoint."""
    with zipfile.ZipFile(path) as archive:
        biggest = max(
            (i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size
        )
    suffix = "/data/" + biggest.filename.rpartition("/data/")[2]
    return record_span(path, suffix)


@pytest.mark.parametrize("damage", ["one flipped byte", "4 KiB of zeros"])
def test_corrupt_newest_checkpoint_does_not_justify_deletions(
    sweeper: Sweeper, damage: str
) -> None:
    """e3, the newest, has damaged tensor data that its directory and pickle do not show (and
    torch.load accepts).  With keep_full=1 it must not be the one kept: it is skipped for its
    CRC, e2 stays full as the newest intact checkpoint, and only e1 is deleted."""
    run = sweeper.root / "run"
    run.mkdir()
    for epoch in (1, 2, 3):
        mtime = days_ago(2) + epoch
        if damage == "one flipped byte":
            save_full(run / f"e{epoch}.pt", epoch=epoch, seed=epoch, mtime_ns=mtime)
        else:
            save_large(run / f"e{epoch}.pt", epoch=epoch, mtime_ns=mtime)
    newest = run / "e3.pt"
    mtime = os.stat(newest).st_mtime_ns
    if damage == "one flipped byte":
        offset, size = record_span(newest, "/data/0")
        assert size > 0
        flip_byte(newest, offset + size // 2)
    else:
        offset, size = largest_data_record(newest)
        assert size >= 3 * 4096
        overwrite(newest, offset + 4096, bytes(4096))
    set_mtime(newest, mtime)
    torch.load(newest, weights_only=False)  # our own file; the damage is invisible to torch
    before = snapshot(run)[b"e3.pt"]

    plan, _ = sweep_and_account(sweeper, "--keep-full", "1", NO_AGE)

    entries = by_name(plan["entries"])
    assert entries["e3.pt"]["action"] == "skip"
    assert "CRC" in entries["e3.pt"]["reason"]
    assert "the newest intact full checkpoint" in entries["e2.pt"]["reason"]
    assert entries["e1.pt"]["action"] == "delete"
    assert snapshot(run)[b"e3.pt"] == before
    assert names(run) == {"e2.pt", "e3.pt", "e1_inference.pt", "e2_inference.pt"}


# ---------------------------------------------------------------------------------------------
# 5. The plan goes stale before its deletions run.


@pytest.mark.parametrize("change", ["truncated", "rewritten", "deleted"])
def test_deletions_wait_for_the_file_that_justified_them(tmp_path: Path, change: str) -> None:
    """Planned with keep_full=1, e1 and e2 are deleted because e3 is kept.  If e3 is truncated,
    rewritten or deleted between the plan and its execution, neither is deleted: their
    outcomes fail naming e3.pt, nothing is deleted and nothing half-written is left."""
    run = tmp_path / "root" / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    plan = planned(
        scan([os.fspath(tmp_path / "root")], PATTERNS), Rules(keep_full=1, min_age_seconds=0)
    )
    assert plan.count(Action.DELETE) == 2
    before = snapshot(run)
    newest = run / "e3.pt"
    if change == "truncated":
        os.truncate(newest, newest.stat().st_size // 2)
    elif change == "rewritten":
        save_full(newest, epoch=3, seed=99)
    else:
        newest.unlink()
    ledger = tmp_path / "ledger.jsonl"

    report = execute_plan(plan, AppendEach(os.fspath(ledger)), run_id="stale")

    outcomes = {os.path.basename(o.entry.path): o for o in report.outcomes}
    why = "is gone" if change == "deleted" else "changed since it was scanned"
    for name in ("e1.pt", "e2.pt"):
        assert not outcomes[name].ok
        assert "e3.pt" in outcomes[name].detail and why in outcomes[name].detail
        assert snapshot(run)[name.encode()] == before[name.encode()]
    assert not outcomes["e3.pt"].ok  # its copy is not made from a file that changed
    assert "e3_inference.pt" not in names(run)
    assert temp_files(run) == []
    records = ledger_lines(ledger)
    assert not any(r["action"] in ("delete", "delete-intent") for r in records)
    assert outcome_total(records) == report.reclaimed_bytes <= 0


# ---------------------------------------------------------------------------------------------
# 6. Files that are not the run's own never count and are never deleted.


@pytest.mark.parametrize("foreign", ["hard link", "another owner"])
def test_foreign_files_never_count_and_are_never_deleted(
    sweeper: Sweeper, tmp_path: Path, foreign: str
) -> None:
    """A file storing epoch 99 that is not the run's own: a hard link to another folder's
    checkpoint, or a file of another uid in a folder root owns.  Had it counted, it would have
    taken the one keep_full slot and e3 would have been demoted; instead e3 stays full, e1 and
    e2 are deleted, and the foreign file is left as it was (with a copy beside it, except for
    the hard link: a copy per link would let one file fill the disk)."""
    if foreign == "another owner" and os.geteuid() != 0:
        pytest.skip("needs root to hand a file to another user")
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    intruder = run / "e99.pt"
    if foreign == "hard link":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        save_full(elsewhere / "e99.pt", epoch=99, seed=99, mtime_ns=days_ago(0.5))
        os.link(elsewhere / "e99.pt", intruder)
    else:
        save_full(intruder, epoch=99, seed=99, mtime_ns=days_ago(0.5))
        os.chown(intruder, 54321, 54321)
        assert os.stat(run).st_uid == os.geteuid() == 0
    before = snapshot(run)[b"e99.pt"]

    plan, _ = sweep_and_account(sweeper, "--keep-full", "1", NO_AGE)

    entry = by_name(plan["entries"])["e99.pt"]
    linked = foreign == "hard link"  # linked elsewhere: no copy (one per link could fill a disk)
    assert entry["action"] == ("keep" if linked else "extract")
    assert ("hard links" if linked else "not the folder's owner") in entry["reason"]
    assert "the newest intact full checkpoint" in by_name(plan["entries"])["e3.pt"]["reason"]
    assert kept_full(run) == {"e3.pt", "e99.pt"}
    assert snapshot(run)[b"e99.pt"] == before
    theirs = () if linked else (99,)
    assert copies(run) == {inference(f"e{n}.pt") for n in (1, 2, 3, *theirs)}


@pytest.mark.parametrize("how", ["another owner", "a hard link"])
def test_a_copy_that_is_not_the_owners_own_proves_nothing(
    sweeper: Sweeper, tmp_path: Path, how: str
) -> None:
    """Someone else's file under the copy's name (same bytes: a teammate ran ``sweeper extract``
    on the group-readable checkpoint), or a hard link to the copy that outlives it: neither may
    justify deleting the owner's full checkpoint, since it can be taken away again."""
    if how == "another owner" and os.geteuid() != 0:
        pytest.skip("needs root to hand a file to another user")
    run = sweeper.root / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    done = sweeper._run("extract", run / "e1.pt")
    assert done.returncode == 0, done.stderr
    copy = run / "e1_inference.pt"
    if how == "another owner":
        os.chown(copy, 2000, 2000)
    else:
        (tmp_path / "elsewhere").mkdir()
        os.link(copy, tmp_path / "elsewhere" / "mine.pt")
    before = snapshot(run)[b"e1_inference.pt"]

    plan, _ = sweep_and_account(sweeper, "--keep-full", "1", NO_AGE)

    entry = by_name(plan["entries"])["e1.pt"]
    assert entry["action"] == "keep"
    why = "owned by another user" if how == "another owner" else "has 2 hard links"
    assert f"not this checkpoint's copy ({why}); never overwritten" in entry["reason"]
    assert kept_full(run) == {"e1.pt", "e3.pt"}  # e2 is the control: demoted
    assert snapshot(run)[b"e1_inference.pt"] == before


def test_thinning_never_touches_copies_collected_from_other_folders(sweeper: Sweeper) -> None:
    """Copies a user gathered into a folder of their own (``sweeper extract -o``) name sources
    in other folders: keep_inference thins only copies made in the folder it sweeps."""
    final = sweeper.root / "final"
    final.mkdir()
    for run_name, epoch in (("runA", 10), ("runB", 20), ("runC", 30)):
        folder = sweeper.root / run_name
        folder.mkdir()
        save_full(folder / f"epoch_{epoch}.pt", epoch=epoch, mtime_ns=days_ago(1))
        target = final / f"{run_name}_inference.pt"
        done = sweeper._run("extract", folder / f"epoch_{epoch}.pt", "-o", target)
        assert done.returncode == 0, done.stderr
        (folder / f"epoch_{epoch}.pt").unlink()
        folder.rmdir()
    before = snapshot(final)

    thin = (NO_AGE, "keep_inference.all=false", "keep_inference.last=1")
    plan = sweeper("--dry-run", "--json", *thin).json()
    result = sweeper.json(*thin)

    assert plan["counts"]["delete"] == 0 and result["outcomes"] == []
    assert snapshot(final) == before


def test_thinning_counts_only_on_verified_copies(sweeper: Sweeper) -> None:
    """keep_inference last=1 keeps the newest orphan copy and thins the rest; when that copy
    is corrupt it justifies nothing: it is skipped, and the next one is kept instead."""
    run = sweeper.root / "run"
    make_run(run, {f"e{n}.pt": n for n in range(1, 6)})
    assert sweeper.json("--keep-full", "2", NO_AGE)["counts"]["delete"] == 3
    corrupt = run / "e3_inference.pt"
    offset, _ = record_span(corrupt, "/data/0")
    stat_before = corrupt.stat()
    flip_byte(corrupt, offset + 1)
    os.utime(corrupt, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))

    plan, _ = sweep_and_account(
        sweeper, "--keep-full", "2", NO_AGE, "keep_inference.all=false", "keep_inference.last=1"
    )

    entries = by_name(plan["entries"])
    assert "CRC mismatch" in entries["e3_inference.pt"]["reason"]
    assert entries["e2_inference.pt"]["action"] == "skip"  # kept: now the newest good copy
    assert entries["e1_inference.pt"]["action"] == "delete"
    assert copies(run) == {inference(f"e{n}.pt") for n in (2, 3, 4, 5)}


def test_a_file_saved_under_the_name_during_the_deletion_is_not_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted trainer saves a new e1.pt (write to a temp, rename over) in the moment the
    deletion looks at e1.pt: the new file is not the one planned, so it is left alone."""
    run = tmp_path / "root" / "run"
    make_run(run, {"e1.pt": 1, "e2.pt": 2})
    plan = planned(scan([str(tmp_path / "root")], PATTERNS), Rules(keep_full=1, min_age_seconds=0))
    fresh = tmp_path / "fresh.pt"
    save_full(fresh, epoch=1, seed=77)
    saved = fresh.read_bytes()
    real = extract_module.open_elsewhere

    def trainer_saves_meanwhile(fd: int, info: os.stat_result) -> bool:
        if (run / "e1.pt").stat().st_ino == info.st_ino:
            os.replace(fresh, run / "e1.pt")
        return real(fd, info)

    monkeypatch.setattr(extract_module, "open_elsewhere", trainer_saves_meanwhile)
    report = execute_plan(plan, AppendEach(str(tmp_path / "ledger.jsonl")), run_id="race")

    (outcome,) = [o for o in report.outcomes if o.entry.name == "e1.pt"]
    assert not outcome.ok and "replaced since it was read" in outcome.detail
    assert (run / "e1.pt").read_bytes() == saved  # the trainer's new file is still there


def test_a_rerun_with_thinning_keeps_the_first_runs_copies_aside(sweeper: Sweeper) -> None:
    """Run A's copies of epochs 1-3 are stale once run B rewrites epoch_1..5.pt.  Thinning may
    drop B's copies it does not want (B's epochs 1 and 2 are deleted with no copy), but A's
    copies are all that is left of A's epochs: they are kept aside, now and in later sweeps."""
    run = sweeper.root / "run"
    make_run(run, {f"epoch_{n}.pt": n for n in (1, 2, 3)})
    assert sweeper.json("--keep-full", "5", NO_AGE)["counts"]["extract"] == 3
    first_run = {n: (run / f"epoch_{n}_inference.pt").read_bytes() for n in (1, 2, 3)}
    base = days_ago(1)
    for n in range(1, 6):
        save_full(run / f"epoch_{n}.pt", epoch=n, seed=60 + n, mtime_ns=base + n)
    thin = ("--keep-full", "2", NO_AGE, "keep_inference.all=false", "keep_inference.last=1")

    plan, _ = sweep_and_account(sweeper, *thin)

    entries = by_name(plan["entries"])
    for n in (1, 2):
        assert "no inference copy kept" in entries[f"epoch_{n}.pt"]["reason"]
        assert "kept aside as another version's copy" in entries[f"epoch_{n}.pt"]["reason"]
    aside = sorted(name for name in names(run) if ".superseded-" in name)
    assert len(aside) == 3
    assert sorted((run / name).read_bytes() for name in aside) == sorted(first_run.values())
    assert kept_full(run) == {"epoch_4.pt", "epoch_5.pt"}
    assert sweeper.json(*thin)["outcomes"] == []  # and a third sweep too: nothing is dropped


def test_thinning_counts_only_on_a_verified_checkpoint_it_demotes(sweeper: Sweeper) -> None:
    """keep_inference last=1 would keep the copy of e4, a checkpoint this sweep demotes, and
    drop the older copies; e4 is corrupt, so it justifies nothing: it is skipped and e3's copy
    is the one kept."""
    run = sweeper.root / "run"
    make_run(run, {f"e{n}.pt": n for n in range(1, 7)})
    for n in (1, 2, 3):  # orphan copies: their checkpoints were deleted long ago
        done = sweeper._run("extract", run / f"e{n}.pt")
        assert done.returncode == 0, done.stderr
        (run / f"e{n}.pt").unlink()
    offset, _ = record_span(run / "e4.pt", "/data/0")
    mtime = (run / "e4.pt").stat().st_mtime_ns
    flip_byte(run / "e4.pt", offset + 1)
    set_mtime(run / "e4.pt", mtime)
    thin = ("--keep-full", "2", NO_AGE, "keep_inference.all=false", "keep_inference.last=1")

    plan = sweeper("--dry-run", "--json", *thin).json()
    result = sweeper.json(*thin)

    entries = by_name(plan["entries"])
    assert entries["e4.pt"]["action"] == "skip" and "CRC mismatch" in entries["e4.pt"]["reason"]
    assert entries["e3_inference.pt"]["action"] == "skip"  # the newest good copy, kept
    assert {entries[f"e{n}_inference.pt"]["action"] for n in (1, 2)} == {"delete"}
    assert all(outcome["ok"] for outcome in result["outcomes"])
    assert copies(run) == {"e3_inference.pt", "e5_inference.pt", "e6_inference.pt"}


def test_a_checkpoint_is_not_dropped_on_the_strength_of_a_corrupt_copy(sweeper: Sweeper) -> None:
    """The copy keep_inference last=1 would keep is a corrupt orphan (epoch 9): demoting e1 and
    e2 without copies may not count on it; it is skipped and e2's copy is written instead."""
    run = sweeper.root / "run"
    make_run(run, {"e9.pt": 9})
    assert sweeper._run("extract", run / "e9.pt").returncode == 0
    (run / "e9.pt").unlink()
    corrupt = run / "e9_inference.pt"
    offset, _ = record_span(corrupt, "/data/0")
    mtime = corrupt.stat().st_mtime_ns
    flip_byte(corrupt, offset + 1)
    set_mtime(corrupt, mtime)
    base = days_ago(1)
    for n in (1, 2, 3, 4):  # a restarted run
        save_full(run / f"e{n}.pt", epoch=n, seed=n, mtime_ns=base + n)
    thin = ("--keep-full", "2", NO_AGE, "keep_inference.all=false", "keep_inference.last=1")

    plan = sweeper("--dry-run", "--json", *thin).json()
    result = sweeper.json(*thin)

    entries = by_name(plan["entries"])
    assert "CRC mismatch" in entries["e9_inference.pt"]["reason"]
    assert "inference copy written first" in entries["e2.pt"]["reason"]
    assert "no inference copy kept" in entries["e1.pt"]["reason"]
    assert all(outcome["ok"] for outcome in result["outcomes"])
    assert copies(run) == {"e9_inference.pt", *(f"e{n}_inference.pt" for n in (2, 3, 4))}


def test_a_pinned_copy_of_a_rolling_name_is_kept_aside_not_replaced(sweeper: Sweeper) -> None:
    """``touch best_model_inference.pt.keep`` pins the copy: when best_model.pt is rewritten,
    the fresh copy takes the name and the pinned one is kept under another."""
    run = sweeper.root / "run"
    make_run(run, {"best_model.pt": 3})
    assert sweeper.json(NO_AGE)["counts"]["extract"] == 1
    pinned = (run / "best_model_inference.pt").read_bytes()
    (run / "best_model_inference.pt.keep").touch()
    newer = save_full(run / "best_model.pt", epoch=7, seed=7, mtime_ns=days_ago(0.5))

    plan, _ = sweep_and_account(sweeper, NO_AGE)

    assert "kept aside" in by_name(plan["entries"])["best_model.pt"]["reason"]
    (aside,) = [name for name in names(run) if ".superseded-" in name]
    assert (run / aside).read_bytes() == pinned
    assert_copy_matches(run / "best_model_inference.pt", newer)


# ---------------------------------------------------------------------------------------------
# Files held open for reading.


def test_a_file_open_for_reading_is_not_deleted(sweeper: Sweeper) -> None:
    """e1 would be demoted with keep_full=1, but an evaluation job has it open for reading: it
    stays full (and gets its copy).  e2, the control, is deleted."""
    run = sweeper.root / "run"
    saved = make_run(run, {"e1.pt": 1, "e2.pt": 2, "e3.pt": 3})
    with held_by_another_process(run / "e1.pt", "read"):
        plan, result = sweep_and_account(sweeper, "--keep-full", "1", NO_AGE)

    for entries in (plan["entries"], result["outcomes"]):
        entry = by_name(entries)["e1.pt"]
        assert entry["action"] == "extract"
        assert "open by a process" in entry["reason"]
    assert by_name(result["outcomes"])["e2.pt"]["action"] == "delete"
    assert kept_full(run) == {"e1.pt", "e3.pt"}
    assert_copy_matches(run / "e1_inference.pt", saved["e1.pt"])


# ---------------------------------------------------------------------------------------------
# keep_best, keep_every and keep_inference: the rules are a union.


def test_keep_rules_are_a_union_and_each_reason_names_its_rules(sweeper: Sweeper) -> None:
    """Epochs 1..6 with best_val_acc peaking at epoch 4; keep_full=1, keep_best=1, keep_every=2.
    e6 is kept as the newest and as even, e4 as the best and as even, e2 as even only; e1, e3
    and e5 are kept by none and deleted.  Each kept file's reason names every rule keeping it."""
    run = sweeper.root / "run"
    run.mkdir()
    accuracy = {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.9, 5: 0.8, 6: 0.85}
    saved = {
        f"e{epoch}.pt": save_checkpoint(
            run / f"e{epoch}.pt",
            epoch=epoch,
            mtime_ns=days_ago(2) + epoch,
            extra={"best_val_acc": acc},
        )
        for epoch, acc in accuracy.items()
    }

    plan, _ = sweep_and_account(sweeper, "--keep-full", "1", "keep_best=1", "keep_every=2", NO_AGE)

    reasons = {name: e["reason"] for name, e in by_name(plan["entries"]).items()}
    best = "keep_best: best_val_acc=0.9, the highest"
    every = "keep_every: epoch divisible by 2"
    newest = "the newest intact full checkpoint"
    assert newest in reasons["e6.pt"] and every in reasons["e6.pt"]
    assert best not in reasons["e6.pt"]
    assert best in reasons["e4.pt"] and every in reasons["e4.pt"]
    assert newest not in reasons["e4.pt"]
    assert every in reasons["e2.pt"]
    assert best not in reasons["e2.pt"] and newest not in reasons["e2.pt"]
    for name in ("e1.pt", "e3.pt", "e5.pt"):
        assert by_name(plan["entries"])[name]["action"] == "delete"
        assert "kept by none of keep_best=1, keep_every=2" in reasons[name]
    assert kept_full(run) == {"e2.pt", "e4.pt", "e6.pt"}
    assert copies(run) == {inference(name) for name in saved}


def test_keep_inference_last_drops_older_copies(sweeper: Sweeper) -> None:
    """keep_inference.all=false, keep_inference.last=1, keep_full=1 on epochs 1..5: e5 stays
    full with its copy, e4 (the newest demoted) leaves its copy, and e1..e3 are deleted without
    one, their plan entries saying so."""
    run = sweeper.root / "run"
    saved = make_run(run, {f"e{n}.pt": n for n in range(1, 6)})
    args = ("--keep-full", "1", "keep_inference.all=false", "keep_inference.last=1", NO_AGE)

    plan, result = sweep_and_account(sweeper, *args)

    entries = by_name(plan["entries"])
    for name in ("e1.pt", "e2.pt", "e3.pt"):
        assert entries[name]["action"] == "delete"
        assert "no inference copy kept" in entries[name]["reason"]
        assert entries[name]["output"] is None and entries[name]["bytes_written"] == 0
    assert entries["e4.pt"]["action"] == "delete"
    assert "no inference copy kept" not in entries["e4.pt"]["reason"]
    assert names(run) == {"e5.pt", "e5_inference.pt", "e4_inference.pt"}
    assert_copy_matches(run / "e4_inference.pt", saved["e4.pt"])
    assert_copy_matches(run / "e5_inference.pt", saved["e5.pt"])
    assert result["counts"]["delete"] == 4
