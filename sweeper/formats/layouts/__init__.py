"""Checkpoint folders: one module per layout behind one small interface (``base.Layout``).

recognise (by the files a folder holds) -> describe (kind, step, metrics, and which files are
weights, training state or metadata) -> the plan deletes the training state -> verify (the
weights before any deletion).  A new layout is one module here and one row of the README's
table; scan, policy, plan and execute do not change.

| layout | recognised by | kept | deleted on demotion |
|---|---|---|---|
| Hugging Face Trainer | ``trainer_state.json`` | weights, config, tokenizer, trainer state | optimizer, scheduler, scaler, rng states, ``global_stepN/`` |
| accelerate save_state | ``optimizer*.bin`` + ``random_states_*.pkl`` | weights, custom checkpoints | optimizer, scheduler, random states, scaler, sampler |
| DeepSpeed (alone) | ``*_optim_states.pt`` | everything: reported | nothing |
| torch.distributed.checkpoint | ``.metadata`` + ``*.distcp`` | everything: reported | nothing |
"""  # noqa: E501

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence

from sweeper.errors import FileRefused
from sweeper.formats.family import Kind
from sweeper.formats.layouts import accelerate, dcp, deepspeed, hf_trainer
from sweeper.formats.layouts.base import (
    FolderCheckpoint,
    Layout,
    Part,
    SubFolder,
    Tree,
    list_tree,
    open_part,
    verify_parts,
)

__all__ = [
    "LAYOUTS",
    "MARKERS",
    "FolderCheckpoint",
    "Layout",
    "Part",
    "SubFolder",
    "Tree",
    "claimed",
    "describe_folder",
    "list_tree",
    "open_part",
    "recognise",
    "verify_parts",
]

# Names whose appearance or change may complete a checkpoint folder (the daemon looks at its run
# folder once they settle): the trainer state a Trainer writes last, weights, accelerate's state.
MARKERS = (
    "trainer_state.json",
    "*.safetensors",
    "pytorch_model*.bin",
    "optimizer*.bin",
    "random_states_*.pkl",
    "*.distcp",
)

# First match wins: a Hugging Face checkpoint run with DeepSpeed holds ZeRO shards too.
LAYOUTS: tuple[Layout, ...] = (hf_trainer, accelerate, deepspeed, dcp)


def recognise(
    names: frozenset[str] | set[str], patterns: Sequence[str] = ()
) -> Layout | None:
    """The layout whose checkpoint folder holds these names, if any.  A folder that also holds
    files named like checkpoints (``patterns``) which are not that layout's own is a run folder
    (a stray ``trainer_state.json`` beside a user's ``epoch_3.pt``), not one of its
    checkpoints: its files are swept one by one."""
    held = frozenset(names)
    layout = next((layout for layout in LAYOUTS if layout.recognises(held)), None)
    if layout is None or not patterns:
        return layout
    for name in held:
        if _matches(name, patterns) and not _matches(name, layout.OWNS):
            return None
    return layout


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def claimed(
    parent_names: frozenset[str] | set[str], name: str, patterns: Sequence[str] = ()
) -> bool:
    """Whether the subfolder ``name`` of a folder holding ``parent_names`` is part of that
    folder's checkpoint (a Trainer checkpoint's ``global_step500/``), not a checkpoint of its
    own."""
    layout = recognise(parent_names, patterns)
    return layout is not None and layout.claims(name)


def describe_folder(fd: int, name: str, display: str) -> FolderCheckpoint | None:
    """What the open folder ``fd`` (named ``name``) holds, when a layout recognises it."""
    try:
        tree = list_tree(fd)
    except FileRefused as error:
        return FolderCheckpoint("checkpoint folder", Kind.OTHER, error.reason)
    layout = recognise(tree.names)
    if layout is None:
        return None
    return layout.describe(fd, name, tree, os.fspath(display))
