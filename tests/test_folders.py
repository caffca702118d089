"""Checkpoint folders, end to end through ``sweeper sweep``: Hugging Face Trainer
``checkpoint-N/``, accelerate ``save_state``, DeepSpeed ZeRO ``global_stepN/`` and
``torch.distributed.checkpoint`` folders, written by the real libraries (DeepSpeed by hand:
see ``folder_layouts``).

Each sweep runs with ``keep_full=2`` and checks: the newest two stay complete, older ones are
demoted (their training state deleted, their weights untouched and loading the ecosystem's
way with the same values), the Trainer's ``best_model_checkpoint`` stays complete, and plan ==
tree == ledger to the byte (:func:`test_retention.sweep_and_account`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import assert_same_tensors
from conftest import CliRun
from folder_layouts import add_zero_shards, deepspeed_alone, trainer_state, write
from layouts import quiet_library
from test_retention import NO_AGE, sweep_and_account
from test_sweep import Sweeper, planned
from trees import ledger_lines

from sweeper.execute import execute_plan
from sweeper.inventory import scan
from sweeper.ledger import AppendEach
from sweeper.policy import Action, Rules

KEEP_TWO = "keep_full=2"
TRAINING = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}
KEPT = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "trainer_state.json",
    "training_args.bin",
}


@pytest.fixture
def sweeper(tmp_path: Path, run_sweeper: Callable[..., CliRun]) -> Sweeper:
    return Sweeper(tmp_path, run_sweeper)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real Trainer run (checkpoint-2 .. checkpoint-8; checkpoint-2 is its best), written
    once and copied by each test."""
    out = tmp_path_factory.mktemp("hf") / "out"
    write("hf", out)
    return out


@pytest.fixture(scope="module")
def accelerate_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("accelerate") / "project"
    write("accelerate", project)
    return project


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def _digests(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (relative path -> sha256): what "untouched" compares."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _entries(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(entry["path"]).name: entry for entry in plan["entries"]}


def _plan_then_sweep(sweeper: Sweeper, *args: str) -> dict[str, dict[str, Any]]:
    """The dry run's entries by name; then the real sweep, which must succeed."""
    plan = sweeper("--dry-run", "--json", *args)
    assert plan.returncode in (0, 1), plan.stderr
    sweeper.json(*args)
    return _entries(plan.json())


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """From the bytes: safetensors' load_file maps the file, and a file held open (by this
    test's process too) is never demoted."""
    from safetensors.torch import load

    return load((folder / "model.safetensors").read_bytes())


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer


def test_trainer_run_keeps_two_and_its_best_complete_and_demotes_the_rest(
    sweeper: Sweeper, hf_run: Path
) -> None:
    """checkpoint-6 and -8 (the newest) stay complete; checkpoint-2 stays complete as the
    newest trainer_state.json's best_model_checkpoint; checkpoint-4 loses exactly its
    optimizer, scheduler and RNG state, and still loads with from_pretrained, with the same
    weights.  The plan, the tree and the ledger agree to the byte."""
    run = _copy(hf_run, sweeper.root / "out")
    assert str(trainer_state(run / "checkpoint-8")["best_model_checkpoint"]).endswith(
        "checkpoint-2"
    )
    before = {name: _digests(run / name) for name in os.listdir(run)}
    weights = _load_weights(run / "checkpoint-4")

    plan, _ = sweep_and_account(sweeper, KEEP_TWO, NO_AGE)

    entries = _entries(plan)
    assert {name: e["action"] for name, e in entries.items()} == {
        "checkpoint-2": "keep",
        "checkpoint-4": "delete",
        "checkpoint-6": "keep",
        "checkpoint-8": "keep",
    }
    assert (
        "best_model_checkpoint in checkpoint-8/trainer_state.json"
        in (entries["checkpoint-2"]["reason"])
    )
    assert "weights kept in place" in entries["checkpoint-4"]["reason"]
    demoted_bytes = sum((run / "checkpoint-2" / name).stat().st_size for name in TRAINING)
    assert entries["checkpoint-4"]["reclaimed_bytes"] == demoted_bytes
    for name in ("checkpoint-2", "checkpoint-6", "checkpoint-8"):
        assert _digests(run / name) == before[name], name
    left = _digests(run / "checkpoint-4")
    assert set(left) == KEPT
    assert all(left[name] == before["checkpoint-4"][name] for name in KEPT)

    with quiet_library():
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(run / "checkpoint-4")
    loaded = {k: v for k, v in model.state_dict().items() if k in weights}
    assert_same_tensors(weights, loaded)

    inspected = sweeper._run("inspect", run / "checkpoint-4", "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert inspected.json()["family"] == "Hugging Face Trainer"
    assert inspected.json()["training_state"] == []


def test_trainer_ledger_counts_each_deleted_file(sweeper: Sweeper, hf_run: Path) -> None:
    """A demotion is recorded file by file (intent, then outcome), so that a crash between
    two unlinks is reconciled as one for a single file is."""
    run = _copy(hf_run, sweeper.root / "out")
    sweeper.json(KEEP_TWO, NO_AGE)
    deleted = [r for r in ledger_lines(sweeper.ledger) if r["action"] == "delete"]
    assert sorted(Path(r["path"]).name for r in deleted) == sorted(TRAINING)
    assert {Path(r["path"]).parent.name for r in deleted} == {"checkpoint-4"}
    assert not (run / "checkpoint-4" / "optimizer.pt").exists()


def test_deepspeed_zero_folders_go_whole_once_the_consolidated_weights_verify(
    sweeper: Sweeper, hf_run: Path
) -> None:
    """A Trainer run under DeepSpeed: each checkpoint holds global_stepN/ shards besides its
    consolidated weights.  Demotion removes the whole global_stepN/ folder; the kept
    checkpoints keep theirs; no shard is ever planned as a file of its own."""
    run = _copy(hf_run, sweeper.root / "out")
    for step in (2, 4, 6, 8):
        checkpoint = run / f"checkpoint-{step}"
        (checkpoint / "optimizer.pt").unlink()  # DeepSpeed keeps the optimizer in its shards
        add_zero_shards(checkpoint, step)

    plan, _ = sweep_and_account(sweeper, KEEP_TWO, NO_AGE)

    assert all("global_step" not in entry["path"] for entry in plan["entries"])
    assert _entries(plan)["checkpoint-4"]["action"] == "delete"
    assert not (run / "checkpoint-4" / "global_step4").exists()
    assert (run / "checkpoint-4" / "model.safetensors").exists()
    assert (run / "checkpoint-4" / "latest").exists()
    for step in (2, 6, 8):
        assert len(list((run / f"checkpoint-{step}" / f"global_step{step}").iterdir())) == 3


def test_sharded_saves_without_consolidated_weights_are_reported_never_touched(
    sweeper: Sweeper, hf_run: Path, tmp_path: Path
) -> None:
    """DeepSpeed's own save folder, a Trainer checkpoint under ZeRO-3 without gathered
    weights, and a torch.distributed.checkpoint save: each named, with the command that would
    make it reducible; nothing in them is planned or changed."""
    deepspeed_alone(sweeper.root / "ds", [10, 20, 30])
    write("dcp", sweeper.root / "dcp" / "step_100")
    zero3 = _copy(hf_run / "checkpoint-8", sweeper.root / "zero3" / "checkpoint-8")
    (zero3 / "model.safetensors").unlink()
    add_zero_shards(zero3, 8)
    before = _digests(sweeper.root)

    entries = _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)

    assert _digests(sweeper.root) == before
    assert set(entries) == {
        "global_step10",
        "global_step20",
        "global_step30",
        "step_100",
        "checkpoint-8",
    }
    assert all(e["action"] == "skip" for e in entries.values())
    assert "zero_to_fp32.py" in entries["global_step10"]["reason"]
    assert "zero_to_fp32.py" in entries["checkpoint-8"]["reason"]
    assert "dcp_to_torch_save" in entries["step_100"]["reason"]
    inspected = sweeper._run("inspect", sweeper.root / "dcp" / "step_100")
    assert "cannot reduce it" in inspected.stdout
    assert "not a checkpoint" not in inspected.stdout + inspected.stderr


# ---------------------------------------------------------------------------------------------
# accelerate


def test_accelerate_save_state_keeps_two_and_demotes_to_the_model_file(
    sweeper: Sweeper, accelerate_project: Path
) -> None:
    """Four automatic saves (checkpoint_0 .. checkpoint_3): the newest two stay complete; the
    older two keep only their model.safetensors, which loads into the model with
    safetensors' load_model, with the same weights."""
    project = _copy(accelerate_project, sweeper.root / "project")
    folders = project / "checkpoints"
    before = {name: _digests(folders / name) for name in os.listdir(folders)}
    weights = {name: _load_weights(folders / name) for name in ("checkpoint_0", "checkpoint_1")}

    plan, _ = sweep_and_account(sweeper, KEEP_TWO, NO_AGE)

    assert {n: e["action"] for n, e in _entries(plan).items()} == {
        "checkpoint_0": "delete",
        "checkpoint_1": "delete",
        "checkpoint_2": "keep",
        "checkpoint_3": "keep",
    }
    for name in ("checkpoint_2", "checkpoint_3"):
        assert _digests(folders / name) == before[name]
    from safetensors.torch import load_model

    for name, expected in weights.items():
        assert set(os.listdir(folders / name)) == {"model.safetensors"}
        model = torch.nn.Linear(8, 4)
        load_model(model, folders / name / "model.safetensors")
        assert_same_tensors(expected, model.state_dict())


# ---------------------------------------------------------------------------------------------
# What is never deleted


def test_a_truncated_weight_file_keeps_its_folder_whole(sweeper: Sweeper, hf_run: Path) -> None:
    """A killed writer's half model.safetensors in an old checkpoint: that folder is skipped,
    named with the reason, and keeps its training state (its weights prove nothing)."""
    run = _copy(hf_run, sweeper.root / "out")
    weights = run / "checkpoint-4" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    before = _digests(run / "checkpoint-4")

    entry = _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)["checkpoint-4"]
    assert entry["action"] == "skip"
    assert "model.safetensors: truncated safetensors file" in entry["reason"]
    assert _digests(run / "checkpoint-4") == before


def test_a_corrupt_newest_checkpoint_is_not_counted(sweeper: Sweeper, hf_run: Path) -> None:
    """A bit flipped in the newest checkpoint's optimizer state (its zip CRC catches it): it
    is skipped as corrupt and does not count among the newest two, so checkpoint-4 stays
    complete in its place."""
    run = _copy(hf_run, sweeper.root / "out")
    optimizer = run / "checkpoint-8" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    os.utime(optimizer, ns=(time.time_ns() - 10**12,) * 2)

    entries = _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)
    assert entries["checkpoint-8"]["action"] == "skip"
    assert "CRC" in entries["checkpoint-8"]["reason"]
    assert entries["checkpoint-4"]["action"] == "keep"
    assert (run / "checkpoint-4" / "optimizer.pt").exists()


@pytest.mark.parametrize("how", ["symlink", "hard link", "another owner"])
def test_a_doubtful_training_file_keeps_its_folder_whole(
    sweeper: Sweeper, hf_run: Path, tmp_path: Path, how: str
) -> None:
    """An optimizer.pt that is a symlink (to a file outside the roots), hard-linked
    elsewhere, or owned by another user: the folder is skipped, naming why, and neither it
    nor what the link reaches is touched."""
    run = _copy(hf_run, sweeper.root / "out")
    optimizer = run / "checkpoint-4" / "optimizer.pt"
    outside = tmp_path / "outside.pt"
    shutil.copy(optimizer, outside)
    if how == "symlink":
        optimizer.unlink()
        optimizer.symlink_to(outside)
    elif how == "hard link":
        os.link(optimizer, tmp_path / "elsewhere.pt")
    else:
        os.chown(optimizer, 12345, 12345)
    before = _digests(run / "checkpoint-4")

    entry = _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)["checkpoint-4"]

    assert entry["action"] == "skip"
    assert {"symlink": "symlink", "hard link": "2 hard links", "another owner": "uid 12345"}[
        how
    ] in entry["reason"]
    assert _digests(run / "checkpoint-4") == before
    assert outside.exists()


def test_weights_changed_after_the_plan_stop_the_demotion(hf_run: Path, tmp_path: Path) -> None:
    """The weights are what the demotion counts on: rewritten between plan and execution, the
    folder's training state is not deleted."""
    root = tmp_path / "root"
    run = _copy(hf_run, root / "out")
    rules = Rules(keep_full=2, min_age_seconds=0)
    plan = planned(scan([str(root)], ["*.pt"]), rules)
    assert {e.name: e.action for e in plan.entries}["checkpoint-4"] is Action.DELETE
    weights = run / "checkpoint-4" / "model.safetensors"
    with weights.open("ab") as grown:
        grown.write(b"\0")

    report = execute_plan(plan, AppendEach(str(tmp_path / "ledger.jsonl")), run_id="changed")

    assert [o.ok for o in report.outcomes] == [False]
    assert "changed since it was scanned" in report.outcomes[0].detail
    assert set(os.listdir(run / "checkpoint-4")) >= TRAINING


def test_an_interrupted_demotion_is_finished_and_never_counted_as_a_resume_point(
    sweeper: Sweeper, hf_run: Path, accelerate_project: Path
) -> None:
    """A demotion deletes the optimizer state first.  A folder a crash left without it (its
    scheduler and RNG state still there) cannot resume a run: it does not count among the
    newest two, however recently its folder changed, and the rest of its training state goes."""
    run = _copy(hf_run, sweeper.root / "out")
    (run / "checkpoint-6" / "optimizer.pt").unlink()
    project = _copy(accelerate_project, sweeper.root / "project")
    (project / "checkpoints" / "checkpoint_3" / "optimizer.bin").unlink()

    plan, _ = sweep_and_account(sweeper, KEEP_TWO, NO_AGE)

    entries = _entries(plan)
    assert entries["checkpoint-6"]["action"] == "delete"
    assert "cannot resume" in entries["checkpoint-6"]["reason"]
    assert entries["checkpoint-4"]["action"] == "keep"  # the newest two resume points: 4 and 8
    assert set(os.listdir(run / "checkpoint-6")) == KEPT
    assert entries["checkpoint_3"]["action"] == "delete"
    assert {e: entries[e]["action"] for e in ("checkpoint_1", "checkpoint_2")} == {
        "checkpoint_1": "keep",
        "checkpoint_2": "keep",
    }
    assert set(os.listdir(project / "checkpoints" / "checkpoint_3")) == {"model.safetensors"}


# ---------------------------------------------------------------------------------------------
# What an adversarial review found (each once deleted what it must not)


def _plan_of(sweeper: Sweeper) -> dict[str, dict[str, Any]]:
    done = sweeper("--dry-run", "--json", KEEP_TWO, NO_AGE)
    assert done.returncode in (0, 1), done.stderr
    return _entries(done.json())


def test_empty_weights_never_stand_in_for_zero_shards(sweeper: Sweeper, hf_run: Path) -> None:
    """ZeRO-3 without gathering writes weights with no data (here: every tensor of shape 0)
    while the trained weights live only in global_stepN/: such a folder is never demoted."""
    from safetensors.torch import save_file

    run = _copy(hf_run, sweeper.root / "out")
    for step in (2, 4, 6, 8):
        checkpoint = run / f"checkpoint-{step}"
        (checkpoint / "model.safetensors").unlink()
        save_file({"w": torch.zeros(0)}, checkpoint / "adapter_model.safetensors")
        add_zero_shards(checkpoint, step)
    before = _digests(run)
    entry = _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)["checkpoint-4"]
    assert entry["action"] == "skip" and "holds no tensor data" in entry["reason"]
    assert _digests(run) == before


def test_an_fsdp_optimizer_makes_a_folder_a_resume_point(sweeper: Sweeper, hf_run: Path) -> None:
    """Under FSDP the Trainer saves optimizer.bin: the newest checkpoint with it is complete
    and kept, not taken for a half-demoted folder."""
    run = _copy(hf_run, sweeper.root / "out")
    for step in (2, 4, 6, 8):
        checkpoint = run / f"checkpoint-{step}"
        (checkpoint / "optimizer.pt").rename(checkpoint / "optimizer.bin")
    before = _digests(run / "checkpoint-8")
    entries = _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)
    assert entries["checkpoint-8"]["action"] == "keep"
    assert entries["checkpoint-4"]["action"] == "delete"
    assert _digests(run / "checkpoint-8") == before
    assert not (run / "checkpoint-4" / "optimizer.bin").exists()


def test_a_stray_trainer_state_of_another_user_cannot_unpin_the_best(
    sweeper: Sweeper, hf_run: Path
) -> None:
    run = _copy(hf_run, sweeper.root / "out")
    stray = run / "zz"
    stray.mkdir()
    (stray / "trainer_state.json").write_text(
        '{"global_step": 999999999, "best_model_checkpoint": "x"}'
    )
    os.chown(stray, 12345, 12345)
    os.chown(stray / "trainer_state.json", 12345, 12345)
    assert _plan_of(sweeper)["checkpoint-2"]["action"] == "keep"


def test_a_half_demoted_folder_of_another_user_is_never_touched(
    sweeper: Sweeper, hf_run: Path
) -> None:
    run = _copy(hf_run, sweeper.root / "out")
    (run / "checkpoint-4" / "optimizer.pt").unlink()
    for path in [run / "checkpoint-4", *(run / "checkpoint-4").iterdir()]:
        os.chown(path, 12345, 12345)
    entry = _plan_of(sweeper)["checkpoint-4"]
    assert entry["action"] == "keep" and "owned by uid 12345" in entry["reason"]


def test_a_checkpoint_folder_on_another_filesystem_is_left_alone(
    sweeper: Sweeper, hf_run: Path, mount_tmpfs: Callable[..., Path]
) -> None:
    run = _copy(hf_run, sweeper.root / "out")
    shutil.rmtree(run / "checkpoint-4")
    mounted = mount_tmpfs(16 << 20, at=run / "checkpoint-4")
    shutil.copytree(hf_run / "checkpoint-4", mounted, dirs_exist_ok=True)
    before = _digests(mounted)
    assert "checkpoint-4" not in _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)
    assert _digests(mounted) == before


def test_a_global_step_folder_holding_anything_else_keeps_its_folder_whole(
    sweeper: Sweeper, hf_run: Path
) -> None:
    run = _copy(hf_run, sweeper.root / "out")
    add_zero_shards(run / "checkpoint-4", 4)
    (run / "checkpoint-4" / "global_step4" / "notes.txt").write_text("mine")
    backup = run / "checkpoint-4" / "global_step4_backup"
    backup.mkdir()
    (backup / "my_fp32_model_states.pt").write_bytes(b"mine")
    before = _digests(run / "checkpoint-4")
    entry = _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)["checkpoint-4"]
    assert entry["action"] == "skip"
    assert _digests(run / "checkpoint-4") == before


def test_a_sharded_save_missing_a_shard_keeps_its_folder_whole(
    sweeper: Sweeper, hf_run: Path
) -> None:
    run = _copy(hf_run, sweeper.root / "out")
    weights = run / "checkpoint-4" / "model.safetensors"
    weights.rename(weights.with_name("model-00001-of-00002.safetensors"))
    entry = _plan_of(sweeper)["checkpoint-4"]
    assert entry["action"] == "skip" and "model-00002-of-00002.safetensors" in entry["reason"]


def test_a_stray_trainer_state_never_hides_a_folders_own_checkpoints(
    sweeper: Sweeper, hf_run: Path
) -> None:
    """A user's run folder of epoch_N.pt files with a trainer_state.json and weights copied in:
    its checkpoints are swept one by one, as without them."""
    from trees import save_full

    project = sweeper.root / "project"
    project.mkdir()
    for epoch in range(1, 5):
        save_full(
            project / f"epoch_{epoch}.pt", epoch=epoch, seed=epoch, mtime_ns=time.time_ns() - 10**12
        )
    for name in ("trainer_state.json", "model.safetensors"):
        shutil.copy(hf_run / "checkpoint-8" / name, project / name)
    entries = _plan_of(sweeper)
    assert entries["epoch_1.pt"]["action"] == "delete"
    assert entries["epoch_4.pt"]["action"] == "extract"


def test_experiments_saved_side_by_side_are_never_demoted_among_each_other(
    sweeper: Sweeper, accelerate_project: Path
) -> None:
    """accelerate's save_state into named folders (one per experiment, not checkpoint_N): each
    is kept whole, not ranked against its neighbours."""
    exps = sweeper.root / "exps"
    exps.mkdir()
    for index, name in enumerate(("lr0.1", "lr0.01", "lr0.001")):
        shutil.copytree(accelerate_project / "checkpoints" / f"checkpoint_{index}", exps / name)
    before = _digests(exps)
    entries = _plan_then_sweep(sweeper, KEEP_TWO, NO_AGE)
    assert {entries[n]["action"] for n in ("lr0.1", "lr0.01", "lr0.001")} == {"keep"}
    assert _digests(exps) == before
