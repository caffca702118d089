"""Kill-point and fault-injection matrix over a whole sweep.

``fault_driver.py`` runs ``sweeper sweep`` on copies of one tree, once for every filesystem call
the sweep makes: killed at that call (as SIGKILL would), or failing it with ENOSPC or EIO; then
runs it again without faults.  For every point this test checks what sweeper promises:

- no checkpoint is lost: every full checkpoint the tree held is still there or has its
  inference copy, which loads (``weights_only=True``) and holds its exact weights;
- after the clean run the tree is what an uninterrupted sweep leaves (same names);
- the ledger's totals equal the bytes actually freed (start-up reconciliation closes the
  intents a killed run left open), and every intent is closed;
- faults give one-line errors, never a traceback; the clean run exits 0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import TEMP_MARK, assert_same_tensors
from conftest import CliRun
from trees import (
    ledger_lines,
    open_intents,
    outcome_total,
    run_fault_driver,
    save_full,
    set_mtime,
    write_history,
)

from sweeper.journal import markers_of

ARGS = [
    "sweep", "{root}", "--ledger", "{ledger}", "min_age_seconds=0", "keep_full=1",
    "rolling_names=[best_model.pt]", "--json",
]  # fmt: skip
HOUR = 3_600_000_000_000


def _build_template(top: Path, run_sweeper: Any) -> dict[str, dict[str, Any]]:
    """Three epochs (two to be demoted), and a rolling name whose copy is stale: the sweep
    extracts, refreshes (keeping the stale copy aside) and deletes."""
    run = top / "root" / "run"
    run.mkdir(parents=True)
    (top / "state").mkdir()
    base = 1_700_000_000 * 1_000_000_000
    saved = {"best_model.pt": save_full(run / "best_model.pt", epoch=1, seed=9, mtime_ns=base)}
    args = [a.format(root=top / "root", ledger=top / "state" / "ledger.jsonl") for a in ARGS]
    first = run_sweeper(*args)
    assert first.returncode == 0, first.stderr
    assert (run / "best_model_inference.pt").exists()
    # The rolling name is rewritten (its copy is now stale) and three epochs appear.
    best = save_full(run / "best_model.pt", epoch=2, seed=10, mtime_ns=base + HOUR)
    saved["best_model.pt"] = best
    for epoch in (1, 2, 3):
        name = f"epoch{epoch}.pt"
        saved[name] = save_full(run / name, epoch=epoch, seed=epoch, mtime_ns=base + epoch * HOUR)
    set_mtime(run / "best_model.pt", base + HOUR)
    return saved


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if TEMP_MARK not in name:
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _check_point(
    point: dict[str, Any],
    saved: dict[str, dict[str, Any]],
    start_bytes: int,
    start_total: int,
    reference: set[str],
) -> None:
    tree = Path(point["tree"])
    where = f"{point['mode']} at call {point['point']}"
    faulted = (tree / "faulted.log").read_text(errors="replace")
    rerun = (tree / "rerun.log").read_text(errors="replace")
    assert "Traceback" not in faulted, f"{where}: {faulted}"
    assert point["rerun"] == 0, f"{where}: clean run exited {point['rerun']}: {rerun}"
    assert "Traceback" not in rerun, f"{where}: {rerun}"
    if point["mode"] != "kill":
        assert point["faulted"] in (0, 1, 2), f"{where}: exit {point['faulted']}: {faulted}"
    run = tree / "root" / "run"
    present = {name for name in os.listdir(run) if TEMP_MARK not in name}
    assert present == reference, where
    for name, checkpoint in saved.items():
        copy = run / name.replace(".pt", "_inference.pt")
        if not (run / name).exists():
            assert copy.exists(), f"{where}: {name} deleted without its copy"
        loaded = torch.load(copy, weights_only=True)
        assert_same_tensors(checkpoint["model_state_dict"], loaded["model_state_dict"])
    records = ledger_lines(tree / "state" / "ledger.jsonl")
    freed = start_bytes - _tree_bytes(tree / "root")
    counted = outcome_total(records) - start_total  # carry records hold compacted totals
    assert counted == freed, f"{where}: ledger {counted} != {freed}"
    left = open_intents(records)
    assert not left, f"{where}: intents left open: {left}"
    assert markers_of(tree / "state" / "ledger.jsonl") == [], where


@pytest.mark.parametrize(
    ("modes", "compacting"), [(["kill"], False), (["ENOSPC", "EIO"], False), (["kill"], True)]
)
def test_every_filesystem_call_of_a_sweep_can_fail_or_be_killed(
    tmp_path: Path, run_sweeper: Any, modes: list[str], compacting: bool
) -> None:
    template = tmp_path / "template"
    saved = _build_template(template, run_sweeper)
    args = ARGS
    if compacting:  # the ledger is past its limit: the sweep compacts it first
        write_history(template / "state" / "ledger.jsonl", 3000)
        args = [*ARGS, f"ledger_max_bytes={2**20}"]
    start_bytes = _tree_bytes(template / "root")
    start_total = outcome_total(ledger_lines(template / "state" / "ledger.jsonl"))

    # The reference: the same sweep, uninterrupted.
    clean = tmp_path / "clean"
    shutil.copytree(template, clean, symlinks=True)
    filled = [a.format(root=clean / "root", ledger=clean / "state" / "ledger.jsonl") for a in args]
    done: CliRun = run_sweeper(*filled)
    assert done.returncode == 0, done.stderr
    reference = set(os.listdir(clean / "root" / "run"))
    assert reference == {
        "best_model.pt", "best_model_inference.pt", "epoch3.pt",
        "epoch1_inference.pt", "epoch2_inference.pt", "epoch3_inference.pt",
        "best_model.superseded-20231114T2213-ae8fb2ba_inference.pt",
    }  # fmt: skip
    summary = json.loads(done.stdout)
    assert summary["counts"]["delete"] == 2 and summary["counts"]["refresh"] == 1

    points = run_fault_driver(tmp_path, template, modes, args)
    for mode in modes:
        hit = [p for p in points if p["mode"] == mode and p["hit"]]
        assert len(hit) > 50, f"{mode}: only {len(hit)} calls faulted"
    for point in points:
        if point["hit"]:
            _check_point(point, saved, start_bytes, start_total, reference)
    if compacting:
        assert (clean / "state" / "ledger.jsonl.1").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoint folders: a demotion is several unlinks, each of which can be the last.


def _digests(top: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(top)): path.read_bytes()
        for path in sorted(top.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("modes", [["kill"], ["ENOSPC", "EIO"]])
def test_a_checkpoint_folder_demotion_can_fail_or_be_killed_at_every_call(
    tmp_path: Path, run_sweeper: Any, modes: list[str]
) -> None:
    """A Hugging Face Trainer run whose checkpoint-4 is demoted (three training files deleted,
    each its own intent and outcome): killed, or failing with ENOSPC or EIO, at each call of the
    sweep, then run again cleanly.  At every point the weights of every checkpoint are intact
    and unchanged, the clean run leaves the tree an uninterrupted sweep leaves, and the
    ledger's total equals the bytes freed, with every intent closed."""
    from folder_layouts import write

    template = tmp_path / "template"
    write("hf", template / "root" / "out")
    (template / "state").mkdir()
    args = [*ARGS[:-3], "keep_full=2", "--json"]
    start_bytes = _tree_bytes(template / "root")
    weights = {
        path: data
        for path, data in _digests(template / "root").items()
        if path.endswith(("model.safetensors", "config.json", "trainer_state.json"))
    }

    clean = tmp_path / "clean"
    shutil.copytree(template, clean, symlinks=True)
    filled = [a.format(root=clean / "root", ledger=clean / "state" / "ledger.jsonl") for a in args]
    done: CliRun = run_sweeper(*filled)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"]["delete"] == 1
    reference = set(_digests(clean / "root"))

    points = run_fault_driver(tmp_path, template, modes, args)
    for mode in modes:
        assert len([p for p in points if p["mode"] == mode and p["hit"]]) > 20, mode
    for point in points:
        if not point["hit"]:
            continue
        tree = Path(point["tree"])
        where = f"{point['mode']} at call {point['point']}"
        rerun = (tree / "rerun.log").read_text(errors="replace")
        assert point["rerun"] == 0, f"{where}: {rerun}"
        assert "Traceback" not in (tree / "faulted.log").read_text(errors="replace"), where
        now = _digests(tree / "root")
        assert set(now) == reference, where
        assert all(now[path] == data for path, data in weights.items()), where
        records = ledger_lines(tree / "state" / "ledger.jsonl")
        freed = start_bytes - _tree_bytes(tree / "root")
        assert outcome_total(records) == freed, f"{where}: ledger != {freed}"
        left = open_intents(records)
        assert not left, f"{where}: intents left open: {left}"
        assert markers_of(tree / "state" / "ledger.jsonl") == [], where
