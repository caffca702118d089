"""Hugging Face ``Trainer`` checkpoint folders: ``checkpoint-500/``.

Recognised by ``trainer_state.json`` (written last by ``Trainer._save_checkpoint``), or
``training_args.bin`` beside the optimizer or RNG state while a save is under way.  Kept: the
model weights (``model*.safetensors`` and their index, ``pytorch_model*.bin``, PEFT adapters),
``config.json``, ``generation_config.json``, tokenizer files, ``trainer_state.json``,
``training_args.bin`` and anything else.  Deleted on demotion: ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth`` and a DeepSpeed ``global_stepN/`` folder
(ZeRO shards: the consolidated weights beside it are what is kept).  Ordered by
``global_step`` from ``trainer_state.json``; its ``best_model_checkpoint`` names the folder
that stays complete.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re

from sweeper.errors import FileRefused
from sweeper.formats.family import Kind
from sweeper.formats.layouts import deepspeed
from sweeper.formats.layouts.base import (
    FolderCheckpoint,
    Part,
    SubFolder,
    Tree,
    check_weights,
    others,
    outcome,
    read_json,
    training_parts,
)

name = "Hugging Face Trainer"
STATE = "trainer_state.json"
# The optimizer first: see base.training_parts.  optimizer.bin: a full state dict under FSDP.
TRAINING_STATE = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
)
OWNS: tuple[str, ...] = TRAINING_STATE
# Logged numbers that say how fast, not how good: left out of the metrics.
_TIMINGS = ("_runtime", "_per_second", "total_flos")
# FSDP's sharded (torch.distributed.checkpoint) saves inside a Trainer checkpoint
_SHARDED = ("pytorch_model_fsdp_*", "optimizer_*")


def recognises(names: frozenset[str]) -> bool:
    """``trainer_state.json``; or, while a save is under way, ``training_args.bin`` beside the
    optimizer or RNG state the Trainer writes before it (a folder with only
    ``training_args.bin`` is a run folder, perhaps with checkpoints of its own)."""
    if STATE in names:
        return True
    return "training_args.bin" in names and (
        "optimizer.pt" in names or any(fnmatch.fnmatchcase(n, "rng_state*.pth") for n in names)
    )


def claims(subfolder: str) -> bool:
    return fnmatch.fnmatchcase(subfolder, "global_step*") or any(
        fnmatch.fnmatchcase(subfolder, p) for p in _SHARDED
    )


def describe(fd: int, folder: str, tree: Tree, display: str) -> FolderCheckpoint:
    state = tree.entries.get(STATE)
    if state is None or not state.is_file:
        why = f"incomplete: no {STATE} (still being written, or its save was interrupted)"
        return FolderCheckpoint(name, Kind.OTHER, why)
    try:
        body = read_json(fd, state, display)
        step, epoch, metrics, best = _read_state(body, os.path.join(display, STATE))
        weights = check_weights(fd, tree, display)
        training = training_parts(tree, display, TRAINING_STATE)
        shards = _zero_folders(tree, display)
    except FileRefused as error:
        return FolderCheckpoint(name, Kind.OTHER, f"{os.path.relpath(error.path, display)}: "
                                f"{error.reason}")  # fmt: skip
    details = {
        "step": step,
        "epoch": epoch,
        "metrics": metrics,
        "best": best,
        "series": re.fullmatch(r"checkpoint-\d{1,18}", folder) is not None,
    }
    if not weights:
        sharded = [s for s in tree.subfolders if any(fnmatch.fnmatchcase(s, p) for p in _SHARDED)]
        if shards:
            why = (
                f"DeepSpeed ZeRO shards ({shards[0][0].name}/) and no consolidated weights: "
                "consolidate with zero_to_fp32.py first"
            )
        elif sharded:
            why = (
                f"FSDP sharded weights ({sorted(sharded)[0]}/) and no consolidated weights: "
                "consolidate with torch.distributed.checkpoint.format_utils.dcp_to_torch_save "
                "first"
            )
        else:
            why = "no model weights in it (model*.safetensors, pytorch_model*.bin)"
        return FolderCheckpoint(name, Kind.UNREDUCIBLE, why, **details)  # type: ignore[arg-type]
    shard_parts = tuple(p for _, parts in shards for p in parts)
    folders = tuple(folder for folder, _ in shards)
    optimizer = [p for p in training if p.path[-1] in ("optimizer.pt", "optimizer.bin")]
    # FSDP's sharded optimizer state (optimizer_0/) stays, and says the folder can resume
    sharded_optimizer = any(fnmatch.fnmatchcase(s, "optimizer_*") for s in tree.subfolders)
    return outcome(
        name,
        weights,
        (*optimizer, *shard_parts, *(p for p in training if p not in optimizer)),
        resumable=bool(optimizer or shard_parts or sharded_optimizer),
        folders=folders,
        others=others(tree, weights, training),
        mtime_ns=tree.mtime_ns,
        **details,
    )


def _read_state(
    body: object, display: str
) -> tuple[int, int | None, tuple[tuple[str, float], ...], str | None]:
    """global_step, the whole epoch (if a whole number), this step's logged numbers, and the
    basename of best_model_checkpoint."""
    if not isinstance(body, dict):
        raise FileRefused(display, "not a JSON object")
    step = body.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise FileRefused(display, "no global_step in it")
    metrics: dict[str, float] = {}
    history = body.get("log_history")
    if isinstance(history, list):
        for record in history:
            if not isinstance(record, dict) or record.get("step") != step:
                continue
            for key, value in record.items():
                if key in ("step", "epoch") or isinstance(value, bool) or key.endswith(_TIMINGS):
                    continue
                if isinstance(value, int | float):
                    try:
                        number = float(value)
                    except OverflowError:  # an integer too large for a float
                        continue
                    if math.isfinite(number):
                        metrics[str(key)] = number
    best = body.get("best_model_checkpoint")
    best_name = os.path.basename(os.path.normpath(best)) if isinstance(best, str) and best else None
    ordered = sorted(metrics.items(), key=lambda item: not item[0].startswith("eval_"))
    return step, None, tuple(ordered), best_name


def _zero_folders(tree: Tree, display: str) -> list[tuple[SubFolder, tuple[Part, ...]]]:
    """DeepSpeed's ``global_stepN/`` folders, each with every file in it (all deleted)."""
    found = []
    for sub, listing in sorted(tree.subfolders.items()):
        if not fnmatch.fnmatchcase(sub, "global_step*"):
            continue
        path = os.path.join(display, sub)
        if re.fullmatch(r"global_step\d{1,18}", sub) is None:
            raise FileRefused(path, "not a DeepSpeed global_stepN folder; not touched")
        if listing is None:
            raise FileRefused(path, "cannot be listed")
        others = [n for n in listing.names if not deepspeed.is_shard(n)]
        if others:  # only what DeepSpeed writes there is ever deleted with it
            raise FileRefused(
                path, f"holds {sorted(others)[0]!r}, not a DeepSpeed shard; not touched"
            )
        parts = training_parts(listing, display, ("*",))
        entry = tree.entries[sub]
        if entry.uid != tree.uid:
            raise FileRefused(path, f"owned by uid {entry.uid}, not the folder's owner")
        found.append((SubFolder(sub, entry.dev, entry.ino), parts))
    return found
