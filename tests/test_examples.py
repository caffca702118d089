"""The bundled example tree (``examples/results/checkpoints``), end to end: the golden case.

The README's first command dry-runs it with the bundled config.yaml; this test pins what that
plan says, action and exact bytes for every entry, so a change in sweeper (or a regenerated
tree: ``examples/make_examples.py``) that changes what a newcomer sees fails here first.  Then
the real sweep on a copy: plan == tree == ledger to the byte.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO_ROOT, CliRun
from test_retention import sweep_and_account
from test_sweep import Sweeper

sys.path.insert(0, str(REPO_ROOT / "examples"))
from stamp import stamp

CONFIG = REPO_ROOT / "config.yaml"
# What the dry run of the example tree plans: (action, reclaimed bytes) by path below the root.
GOLDEN = {
    # (its stale copy was made in another folder, the generator's: kept aside, not replaced)
    "best_model.pt": ("refresh", -5307),
    "best_model_inference.pt": ("skip", 0),
    "checkpoint_epoch_1.pt": ("delete", 10338),
    "checkpoint_epoch_2.pt": ("delete", 10338),
    "checkpoint_epoch_3.pt": ("extract", -5315),
    "checkpoint_epoch_4.pt": ("extract", -5315),
    "broken/downloaded_model.pt": ("skip", 0),
    "broken/epoch_7.pt": ("skip", 0),
    "hf/checkpoint-2": ("delete", 66415),
    "hf/checkpoint-4": ("keep", 0),
    "hf/checkpoint-6": ("keep", 0),
    "lightning/epoch=0-step=2.ckpt": ("delete", 4784),
    "lightning/epoch=1-step=4.ckpt": ("extract", -4159),
    "lightning/epoch=2-step=6.ckpt": ("extract", -4159),
    "lightning/last.ckpt": ("extract", -4149),
    "restarted/run-2026-11-01-epoch1.pt": ("delete", 10401),
    "restarted/run-2026-11-01-epoch2.pt": ("delete", 10401),
    "restarted/run-2026-11-01-epoch3.pt": ("extract", -5318),
    "restarted/run-2026-11-08-epoch1.pt": ("extract", -5318),
    "restarted/run-2026-11-08-epoch2.pt": ("extract", -5318),
}
# Why, in the words a newcomer reads (a part of each reason).
WHY = {
    "best_model.pt": "stale best_model_inference.pt kept aside as another version's copy",
    "broken/downloaded_model.pt": "disallowed global 'builtins.print'",
    "broken/epoch_7.pt": "truncated archive",
    "hf/checkpoint-2": "training state deleted, weights kept in place",
    "lightning/last.ckpt": "a rolling name",
    "restarted/run-2026-11-08-epoch1.pt": "restart: epochs start over at 1 after epoch 3",
}


@pytest.fixture
def sweeper(tmp_path: Path, run_sweeper: Callable[..., CliRun]) -> Sweeper:
    """The CLI on a stamped copy of the example tree, with the bundled config.yaml."""
    made = Sweeper(tmp_path, run_sweeper)
    made.root.rmdir()
    shutil.copytree(REPO_ROOT / "examples" / "results" / "checkpoints", made.root, symlinks=True)
    stamp(made.root)
    return made


def _plan(sweeper: Sweeper) -> dict[str, Any]:
    done = sweeper._run("sweep", "-c", CONFIG, sweeper.root, "--dry-run", "--json",
                        "--ledger", sweeper.ledger)  # fmt: skip
    assert done.returncode == 1, done.stderr  # the two refused files: said, and exit 1
    plan: dict[str, Any] = done.json()
    return plan


def test_the_example_tree_plans_every_kind_of_action_to_the_byte(sweeper: Sweeper) -> None:
    plan = _plan(sweeper)
    entries = {str(Path(e["path"]).relative_to(sweeper.root)): e for e in plan["entries"]}
    assert {p: (e["action"], e["reclaimed_bytes"]) for p, e in entries.items()} == GOLDEN
    for path, words in WHY.items():
        assert words in entries[path]["reason"], path
    assert plan["expected_reclaimed_bytes"] == sum(b for _, b in GOLDEN.values()) > 0
    assert set(plan["counts"]) == {"extract", "delete", "refresh", "keep", "skip"}
    assert all(plan["counts"].values())


def test_the_example_tree_swept_for_real_matches_its_plan_and_ledger(sweeper: Sweeper) -> None:
    sweep_and_account(sweeper, "-c", str(CONFIG), code=1)  # (the two refused files)


def test_the_streamed_dry_run_plans_what_the_whole_tree_plan_does(sweeper: Sweeper) -> None:
    """``--dry-run --json`` walks twice and plans in the classifiers (sweeper.dryrun); the
    whole-tree plan (what a sweep executes; taken here with the undo window on, which needs the
    whole tree) walks once and plans in this process.  On the example tree, with a nested root
    and a symlink met after the file it points at, both give the same entries and problems."""
    (sweeper.root / "zz").mkdir()
    (sweeper.root / "zz" / "pin").symlink_to(sweeper.root / "checkpoint_epoch_1.pt")
    roots = [sweeper.root, sweeper.root / "restarted"]  # (a root inside another)

    def plan(*extra: str) -> dict[str, Any]:
        done = sweeper._run("sweep", "-c", CONFIG, *roots, "--dry-run", "--json",
                            "--ledger", sweeper.ledger, *extra)  # fmt: skip
        assert done.returncode == 1, done.stderr
        result: dict[str, Any] = done.json()
        for entry in result["entries"]:  # a deletion to the trash reclaims when it is purged
            for key in ("trash", "undo_seconds", "bytes_deleted", "reclaimed_bytes"):
                entry.pop(key, None)
            entry["reason"] = entry["reason"].split("; held in the trash")[0]
        return result

    streamed, whole = plan(), plan("undo_seconds=60")

    by_path = {e["path"]: e for e in streamed["entries"]}
    assert len(by_path) == len(streamed["entries"])  # no folder classified twice
    assert by_path == {e["path"]: e for e in whole["entries"]}
    assert streamed["problems"] == whole["problems"]
    assert streamed["counts"] == whole["counts"]
    assert "symlink" in by_path[str(sweeper.root / "checkpoint_epoch_1.pt")]["reason"]
    restarted = [e for e in streamed["entries"] if "/restarted/" in e["path"]]
    assert {e["root"] for e in restarted} == {str(sweeper.root / "restarted")}
