"""Single-file layouts of other libraries, end to end through ``sweeper sweep``.

Each test sweeps a run folder written by (or exactly as) the library with ``keep_full=2`` and
checks: the newest two stay complete, older ones are demoted, every copy loads the way its
ecosystem loads it with the same weights, and plan == tree == ledger to the byte
(:func:`test_retention.sweep_and_account`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import assert_same_tensors
from conftest import CliRun
from layouts import (
    generic_checkpoint,
    lightning_module,
    lightning_run,
    mmengine_checkpoint,
    quiet_library,
    timm_args,
    timm_load_checkpoint,
    timm_model,
    timm_run,
)
from test_retention import NO_AGE, copies, kept_full, sweep_and_account
from test_sweep import Sweeper, by_name
from trees import days_ago, set_mtime

KEEP_TWO = "keep_full=2"


@pytest.fixture
def sweeper(tmp_path: Path, run_sweeper: Callable[..., CliRun]) -> Sweeper:
    return Sweeper(tmp_path, run_sweeper)


def _load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = torch.load(path, weights_only=True)
    return loaded


def assert_same_values(expected: object, actual: object, where: str = "") -> None:
    """Equal trees: tensors compared as assert_same_tensors does, the rest with ==."""
    if isinstance(expected, torch.Tensor):
        assert_same_tensors({where: expected}, {where: actual})
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for key, value in expected.items():
            assert_same_values(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            assert_same_values(want, got, f"{where}[{index}]")
    else:
        assert actual == expected, where


# ---------------------------------------------------------------------------------------------
# PyTorch Lightning


def test_lightning_run_keeps_two_and_demotes_to_what_save_weights_only_writes(
    sweeper: Sweeper, tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """A real Trainer's four epochs and last.ckpt: epochs 2 and 3 stay full, epochs 0 and 1
    are demoted to copies that hold exactly what ModelCheckpoint(save_weights_only=True) wrote
    for the same epochs, load with load_from_checkpoint and weights_only=True, and the plan,
    the tree and the ledger agree to the byte.  inspect names the family and reads the
    monitored val_loss out of the callbacks' state."""
    run = sweeper.root / "run"
    weights_only = tmp_path / "weights_only"
    lightning_run(run, weights_only)
    epochs = [f"epoch={e}-step={2 * (e + 1)}.ckpt" for e in range(4)]
    assert sorted(p.name for p in run.iterdir()) == sorted([*epochs, "last.ckpt"])
    for epoch, name in enumerate(epochs):  # old, in epoch order: the stored epoch decides
        set_mtime(run / name, days_ago(1) + epoch)
    set_mtime(run / "last.ckpt", days_ago(1) + 10)
    saved = {name: _load(run / name) for name in epochs}

    inspected = run_sweeper("inspect", run / epochs[0], "--json").json()
    assert (inspected["kind"], inspected["family"]) == ("full", "lightning")
    callbacks = saved[epochs[0]]["callbacks"]
    (monitored,) = [state for state in callbacks.values() if state.get("monitor")]
    assert monitored["monitor"] == "val_loss"  # the weights-only callback monitors nothing
    assert inspected["metrics"] == {"val_loss": pytest.approx(monitored["current_score"].item())}
    assert (inspected["epoch"], inspected["step"]) == (0, 2)
    roles = {key["key"]: key["role"] for key in inspected["keys"]}
    assert roles["state_dict"] == "model"
    assert {roles[k] for k in ("optimizer_states", "lr_schedulers", "callbacks")} == {
        "training-state"
    }

    plan, _ = sweep_and_account(sweeper, NO_AGE, KEEP_TWO)

    entries = by_name(plan["entries"])
    assert {entries[name]["action"] for name in epochs[:2]} == {"delete"}
    assert kept_full(run) == {*epochs[2:], "last.ckpt"}
    assert {f"epoch={e}-step={2 * (e + 1)}_inference.ckpt" for e in (0, 1)} <= copies(run)
    for name in epochs[2:]:  # complete: still what the trainer wrote
        assert_same_values(saved[name], _load(run / name))
    module = lightning_module()
    for epoch, name in enumerate(epochs[:2]):
        copy = run / name.replace(".ckpt", "_inference.ckpt")
        written = _load(copy)
        assert_same_values(_load(weights_only / name), written)
        with quiet_library():
            model = module.load_from_checkpoint(copy)
        assert model.hparams == {"hidden": 8, "lr": 0.01}
        assert_same_tensors(saved[name]["state_dict"], written["state_dict"])
        assert_same_tensors(
            {k: v for k, v in saved[name]["state_dict"].items()},
            {k: v.detach() for k, v in model.state_dict().items()},
        )
        assert written["epoch"] == epoch


# ---------------------------------------------------------------------------------------------
# timm


def test_timm_run_keeps_two_and_demotes_with_its_hard_links_as_aliases(
    sweeper: Sweeper, run_sweeper: Callable[..., CliRun]
) -> None:
    """Six epochs as timm's CheckpointSaver leaves them: checkpoint-N.pth.tar, last.pth.tar
    hard-linked to epoch 5 and model_best.pth.tar to epoch 2 (the best metric).  Epochs 5 and
    2 are aliases: kept, the plan says why, never deleted.  keep_full=2 counts the others and
    keeps epochs 4 and 3; epochs 0 and 1 are demoted to checkpoint-N_inference.pth.tar.  Every
    copy loads with timm's load_checkpoint (weights and EMA weights) and weights_only=True,
    args as a plain dict; plan, tree and ledger agree to the byte."""
    run = sweeper.root / "run"
    metrics = [0.1, 0.3, 0.6, 0.5, 0.4, 0.55]
    saved = timm_run(run, metrics, [days_ago(1) + epoch for epoch in range(len(metrics))])
    epochs = [f"checkpoint-{epoch}.pth.tar" for epoch in range(len(metrics))]
    assert (run / "last.pth.tar").stat().st_ino == (run / epochs[5]).stat().st_ino
    assert (run / "model_best.pth.tar").stat().st_ino == (run / epochs[2]).stat().st_ino

    inspected = run_sweeper("inspect", run / epochs[0], "--json").json()
    assert (inspected["kind"], inspected["family"]) == ("full", "timm")
    assert (inspected["epoch"], inspected["metrics"]) == (0, {"metric": 0.1})
    roles = {key["key"]: key["role"] for key in inspected["keys"]}
    assert roles == {
        "epoch": "metadata",
        "arch": "metadata",
        "optimizer": "training-state",
        "version": "metadata",
        "args": "metadata",
        "amp_scaler": "training-state",
        "state_dict": "model",
        "state_dict_ema": "model",
        "metric": "metadata",
    }

    plan, _ = sweep_and_account(sweeper, NO_AGE, KEEP_TWO)

    entries = by_name(plan["entries"])
    assert {entries[name]["action"] for name in epochs[:2]} == {"delete"}
    assert "hard-linked as last.pth.tar in this folder (an alias)" in entries[epochs[5]]["reason"]
    assert "hard-linked as model_best.pth.tar in this folder" in entries[epochs[2]]["reason"]
    assert kept_full(run) == {*epochs[2:], "last.pth.tar", "model_best.pth.tar"}
    assert {f"checkpoint-{epoch}_inference.pth.tar" for epoch in (0, 1)} <= copies(run)
    for name in epochs[2:]:  # complete: still what the saver wrote (its Namespace allowed)
        with torch.serialization.safe_globals([argparse.Namespace]):
            assert_same_values(_plain(saved[name]), _plain(_load(run / name)))
    for epoch, name in enumerate(epochs[:2]):
        copy = run / f"checkpoint-{epoch}_inference.pth.tar"
        written = _load(copy)
        expected = {k: v for k, v in saved[name].items() if k not in ("optimizer", "amp_scaler")}
        expected["args"] = vars(timm_args())
        assert_same_values(expected, written)
        model, ema = timm_model(0), timm_model(0)
        timm_load_checkpoint(model, copy)
        timm_load_checkpoint(ema, copy, use_ema=True)
        assert_same_tensors(saved[name]["state_dict"], model.state_dict())
        assert_same_tensors(saved[name]["state_dict_ema"], ema.state_dict())


def _plain(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A timm checkpoint with its Namespace as the dict weights_only=True cannot load it as."""
    return {k: vars(v) if k == "args" else v for k, v in checkpoint.items()}


# ---------------------------------------------------------------------------------------------
# mmengine and generic layouts, written by hand after their savers


@pytest.mark.parametrize(
    ("family", "build", "name", "dropped", "progress"),
    [
        (
            "mmengine",
            mmengine_checkpoint,
            "epoch_{}.pth",
            {"optimizer", "param_schedulers", "message_hub"},
            lambda epoch: (epoch + 1, 10 * (epoch + 1)),
        ),
        ("generic", generic_checkpoint, "ckpt_{}.pt", {"optim", "lr_sched"}, lambda e: (e, None)),
    ],
)
def test_hand_written_layouts_keep_two_and_demote(
    sweeper: Sweeper,
    run_sweeper: Callable[..., CliRun],
    family: str,
    build: Callable[[int], dict[str, Any]],
    name: str,
    dropped: set[str],
    progress: Callable[[int], tuple[int, int | None]],
) -> None:
    """Four epochs: inspect names the family and its epoch/step; epochs 3 and 2 stay
    complete, 0 and 1 are demoted to copies holding every key but the training state, which
    load with weights_only=True; plan, tree and ledger agree to the byte."""
    run = sweeper.root / "run"
    run.mkdir()
    saved = {}
    for epoch in range(4):
        saved[name.format(epoch)] = build(epoch)
        torch.save(saved[name.format(epoch)], run / name.format(epoch))
        set_mtime(run / name.format(epoch), days_ago(1) + epoch)
    inspected = run_sweeper("inspect", run / name.format(1), "--json").json()
    assert (inspected["kind"], inspected["family"]) == ("full", family)
    assert (inspected["epoch"], inspected["step"]) == progress(1)
    roles = {key["key"]: key["role"] for key in inspected["keys"]}
    assert {key for key, role in roles.items() if role == "training-state"} == dropped

    plan, _ = sweep_and_account(sweeper, NO_AGE, KEEP_TWO)

    entries = by_name(plan["entries"])
    assert {entries[name.format(epoch)]["action"] for epoch in (0, 1)} == {"delete"}
    assert kept_full(run) == {name.format(3), name.format(2)}
    for epoch in (2, 3):
        assert_same_values(saved[name.format(epoch)], _load(run / name.format(epoch)))
    for epoch in (0, 1):
        copy = run / name.format(epoch).replace(".", "_inference.")
        expected = {k: v for k, v in saved[name.format(epoch)].items() if k not in dropped}
        assert_same_values(expected, _load(copy))


def test_inspect_says_why_it_cannot_reduce_training_state(
    checkpoint_dir: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """Optimizer state beside weights under a key no family names: inspect calls it a
    training checkpoint it cannot reduce and says why, never "not a checkpoint"."""
    path = checkpoint_dir / "odd.pt"
    checkpoint = generic_checkpoint(0)
    checkpoint["weights"] = checkpoint.pop("model")
    torch.save(checkpoint, path)
    inspected = run_sweeper("inspect", path, "--json").json()
    assert inspected["kind"] == "unreducible"
    assert inspected["description"] == "training checkpoint sweeper cannot reduce"
    assert "holds training state (optim, lr_sched)" in inspected["cannot_reduce"]
    text = run_sweeper("inspect", path).stdout
    assert "cannot reduce it: holds training state" in text and "not a checkpoint" not in text
