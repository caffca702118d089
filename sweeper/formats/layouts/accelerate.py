"""accelerate ``Accelerator.save_state`` folders: ``checkpoints/checkpoint_3/``.

Recognised by ``random_states_*.pkl`` beside ``optimizer*.bin`` or model weights.  Kept: the
model files and custom checkpoints (``custom_checkpoint_*.pkl``).  Deleted on demotion:
``optimizer*.bin``, ``scheduler*.bin``, ``random_states_*.pkl``, ``scaler.pt``,
``sampler*.bin``.  Ordered by the number in ``checkpoint_N`` (automatic checkpoint naming
counts saves).  A save elsewhere (``save_state("exps/lr0.1")``) is one experiment's state, not
one of a series: kept whole, never counted among its neighbours.
"""

from __future__ import annotations

import fnmatch
import os

from sweeper.errors import FileRefused
from sweeper.formats.family import Kind
from sweeper.formats.layouts.base import (
    WEIGHT_PATTERNS,
    FolderCheckpoint,
    Tree,
    check_weights,
    number_in,
    others,
    outcome,
    training_parts,
)

name = "accelerate save_state"
# In the order demotion deletes them: the optimizer state first (then the folder cannot pass
# for a resume point), accelerate's own random states last (they keep it recognisable).
TRAINING_STATE = (
    "optimizer*.bin",
    "scheduler*.bin",
    "scaler.pt",
    "sampler*.bin",
    "random_states_*.pkl",
)


OWNS: tuple[str, ...] = (*TRAINING_STATE, *WEIGHT_PATTERNS, "custom_checkpoint_*.pkl")


def recognises(names: frozenset[str]) -> bool:
    """``random_states_*.pkl`` beside ``optimizer*.bin`` or model weights: what
    ``save_state`` writes, or what an interrupted demotion of it left."""
    if not any(n.startswith("random_states_") and n.endswith(".pkl") for n in names):
        return False  # (as fnmatch's "random_states_*.pkl", cheaply: every folder is asked)
    return any(
        fnmatch.fnmatchcase(n, p) for n in names for p in ("optimizer*.bin", *WEIGHT_PATTERNS)
    )


def claims(subfolder: str) -> bool:
    return False


def describe(fd: int, folder: str, tree: Tree, display: str) -> FolderCheckpoint:
    try:
        weights = check_weights(fd, tree, display)
        training = training_parts(tree, display, TRAINING_STATE)
    except FileRefused as error:
        where = os.path.relpath(error.path, display)
        return FolderCheckpoint(name, Kind.OTHER, f"{where}: {error.reason}")
    step = number_in(folder, "checkpoint_")
    if not weights:
        why = "no model weights in it (model*.safetensors, pytorch_model*.bin)"
        return FolderCheckpoint(name, Kind.UNREDUCIBLE, why, step=step)
    return outcome(
        name,
        weights,
        training,
        resumable=any(fnmatch.fnmatchcase(p.path[-1], "optimizer*.bin") for p in training)
        or any(fnmatch.fnmatchcase(s, "optimizer_*") for s in tree.subfolders),
        series=step is not None,
        others=others(tree, weights, training),
        step=step,
        mtime_ns=tree.mtime_ns,
    )
