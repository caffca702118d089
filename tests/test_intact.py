"""Intact means verified: the files a deletion counts on are read in full, once per identity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checkpoints import flip_byte, record_span, save_full_checkpoint
from trees import days_ago, save_full, set_mtime

from sweeper import torchzip
from sweeper.extract import superseded_name
from sweeper.intact import Verifier, verify_run
from sweeper.inventory import RunFolder, scan
from sweeper.plan import plan_run
from sweeper.policy import Action, Rules

RULES = Rules(keep_full=1, min_age_seconds=0)


def _bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as io_stats:
        return int(next(line for line in io_stats if line.startswith("rchar:")).split()[1])


def _run(root: Path) -> RunFolder:
    (run,) = scan([str(root)], ["*.pt"]).runs
    return run


def test_a_kept_file_is_read_in_full_once_per_identity(tmp_path: Path) -> None:
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs Linux I/O accounting in /proc/self/io")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_full_checkpoint(run_dir / "e2.pt", epoch=2, model=torch.nn.Linear(512, 512))
    save_full_checkpoint(run_dir / "e1.pt", epoch=1)
    for name in ("e1.pt", "e2.pt"):
        set_mtime(run_dir / name, days_ago(1) + int(name[1]))
    size = (run_dir / "e2.pt").stat().st_size
    verifier = Verifier()

    scanned = _run(tmp_path)
    before = _bytes_read_by_this_process()
    verified = verify_run(scanned, RULES, now_ns=days_ago(0), verifier=verifier)
    first = _bytes_read_by_this_process() - before
    rescanned = _run(tmp_path)
    before = _bytes_read_by_this_process()
    again = verify_run(rescanned, RULES, now_ns=days_ago(0), verifier=verifier)
    second = _bytes_read_by_this_process() - before

    files = {f.name: f for f in verified.files}
    assert files["e2.pt"].verified and not files["e1.pt"].verified  # e1 justifies nothing
    assert first >= size * 0.9  # the kept file's records were read
    assert second < 4096  # remembered: nothing re-read
    assert {f.name: f.verified for f in again.files} == {"e1.pt": False, "e2.pt": True}

    save_full_checkpoint(run_dir / "e2.pt", epoch=2, model=torch.nn.Linear(512, 512))
    rewritten = _run(tmp_path)
    before = _bytes_read_by_this_process()
    verify_run(rewritten, RULES, now_ns=days_ago(0), verifier=verifier)
    assert _bytes_read_by_this_process() - before >= size * 0.9  # a new version: read again


def test_a_corrupt_newest_is_found_and_the_next_one_justifies_instead(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for epoch in (1, 2, 3):
        save_full(run_dir / f"e{epoch}.pt", epoch=epoch, seed=epoch, mtime_ns=days_ago(1) + epoch)
    offset, _ = record_span(run_dir / "e3.pt", "/data/0")
    flip_byte(run_dir / "e3.pt", offset + 1)
    set_mtime(run_dir / "e3.pt", days_ago(1) + 3)

    run = verify_run(_run(tmp_path), RULES, now_ns=days_ago(0), verifier=Verifier())
    plan = {entry.name: entry for entry in plan_run(run, RULES, now_ns=days_ago(0))}

    assert plan["e3.pt"].action is Action.SKIP and "CRC mismatch" in plan["e3.pt"].reason
    assert plan["e2.pt"].action is Action.EXTRACT
    assert plan["e1.pt"].action is Action.DELETE
    assert [need.name for need in plan["e1.pt"].needs] == ["e2.pt"]


def test_unverified_files_never_justify_a_deletion_in_the_plan(tmp_path: Path) -> None:
    """Planning without the verification step (a caller that forgot it) deletes nothing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for epoch in (1, 2):
        save_full(run_dir / f"e{epoch}.pt", epoch=epoch, mtime_ns=days_ago(1) + epoch)

    plan = {entry.name: entry for entry in plan_run(_run(tmp_path), RULES, now_ns=days_ago(0))}

    assert plan["e1.pt"].action is Action.EXTRACT
    assert "not deleted: e2.pt, which it counts on, is not verified" in plan["e1.pt"].reason


@pytest.mark.parametrize("name", ["", ".", "..", "../../etc/passwd", "a/b", "a\u0000b", "/abs.pt"])
def test_a_copy_naming_anything_but_a_file_name_names_nothing(name: str) -> None:
    """A crafted source record cannot send sweeper to another path (inspect opens the named
    source to say whether the copy is current)."""
    record = json.dumps({"source": name, "size": 1, "mtime_ns": 1, "pickle_crc32": 1})
    assert torchzip.Provenance.decode(record.encode()) is None
    good = json.dumps({"source": "best_model.pt", "size": 1, "mtime_ns": 1, "pickle_crc32": 1})
    assert torchzip.Provenance.decode(good.encode()) is not None


def test_superseded_names_never_collide_and_fit_the_filesystem() -> None:
    """Re-runs of the same code often repeat a pickle CRC; names may already be long."""
    made_from = torchzip.Provenance("epoch_1.pt", 10, 1_800_000_000 * 10**9, 0xAE8FB2BA)
    first = superseded_name("epoch_1.pt", made_from, set())
    assert first == "epoch_1.superseded-20270115T0800-ae8fb2ba_inference.pt"
    second = superseded_name("epoch_1.pt", made_from, {first})
    assert second not in (first, "") and second.endswith("-2_inference.pt")
    long_name = "\u4e2d" * 80 + ".pt"  # 243 bytes of UTF-8
    aside = superseded_name(long_name, made_from, set())
    assert len(os.fsencode(aside)) <= 255 and aside.endswith("_inference.pt")
