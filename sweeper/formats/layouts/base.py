"""What every checkpoint-folder layout shares: the listing of a folder, its parts, the
description a layout gives, and the checks that prove its files intact.

A checkpoint *folder* (a Hugging Face ``checkpoint-500/``, an accelerate ``checkpoint_3/``) is
one checkpoint spread over files: model weights, training state, metadata.  A layout
recognises one by the files present and describes it from their content; demoting it deletes
its training-state files and nothing else: the weights are never rewritten.  Nothing here
unpickles anything: a pickled part (``training_args.bin``, ``rng_state.pth``,
``random_states_0.pkl``) is kept or deleted by its name within a recognised layout, never read.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from sweeper.errors import FileRefused
from sweeper.formats.family import Kind
from sweeper.formats.records import read_archive
from sweeper.formats.safetensors import read_safetensors

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_ZIP_MAGIC = b"PK\x03\x04"
# A folder listing larger than this is not a checkpoint folder sweeper will act on.
MAX_ENTRIES = 10_000
# trainer_state.json and weight index files are read in full: bounded.
MAX_JSON_BYTES = 32 << 20

# Model weights as transformers and accelerate name them: model.safetensors, the shards of a
# sharded save (model-00001-of-00004.safetensors + model.safetensors.index.json), accelerate's
# second model (model_1.safetensors), the legacy torch files, and PEFT adapters.
WEIGHT_PATTERNS = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model_*.safetensors",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model_*.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True, slots=True)
class Part:
    """One entry of a checkpoint folder (or of one of its subfolders), as it was listed."""

    path: tuple[str, ...]  # below the checkpoint folder: ("optimizer.pt",), ("global_step8", ...)
    dev: int
    ino: int
    size: int
    mtime_ns: int
    uid: int
    nlink: int
    mode: int
    ctime_ns: int = 0  # a rewrite that puts the old size and mtime back still changes it

    @classmethod
    def of(cls, path: tuple[str, ...], info: os.stat_result) -> Part:
        return cls(
            path,
            info.st_dev,
            info.st_ino,
            info.st_size,
            info.st_mtime_ns,
            info.st_uid,
            info.st_nlink,
            info.st_mode,
            info.st_ctime_ns,
        )

    @property
    def name(self) -> str:
        return "/".join(self.path)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def identity(self) -> tuple[int, int, int, int]:
        return (self.dev, self.ino, self.size, self.mtime_ns)


@dataclass(frozen=True, slots=True)
class Tree:
    """A checkpoint folder's entries and, one level down, its subfolders' entries."""

    uid: int  # the folder's owner
    entries: Mapping[str, Part]
    subfolders: Mapping[str, Tree | None]  # None: too large to list, or unreadable
    mtime_ns: int = 0

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.entries)

    def files(self, *patterns: str) -> list[Part]:
        """Entries (of any type: a symlink under a part's name is refused later) whose name
        matches one of ``patterns``, in name order."""
        return [
            part
            for name, part in sorted(self.entries.items())
            if not stat.S_ISDIR(part.mode) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
        ]


@dataclass(frozen=True, slots=True)
class SubFolder:
    """A training-state subfolder (DeepSpeed's ``global_step500/``): emptied on demotion, then
    removed."""

    name: str
    dev: int
    ino: int


@dataclass(frozen=True, slots=True)
class FolderCheckpoint:
    """What a layout found in a checkpoint folder.  ``kind`` is FULL (weights and training
    state), INFERENCE (weights only: already demoted), UNREDUCIBLE (training state sweeper
    cannot reduce: ``problem`` says why) or OTHER (``problem`` says what is wrong)."""

    layout: str
    kind: Kind
    problem: str | None = None
    weights: tuple[Part, ...] = ()
    training: tuple[Part, ...] = ()  # deleted on demotion, after the weights verify
    folders: tuple[SubFolder, ...] = ()  # removed once demotion emptied them
    others: tuple[Part, ...] = ()  # config, tokenizer, trainer state: kept, never read but these
    step: int | None = None
    epoch: int | None = None
    metrics: tuple[tuple[str, float], ...] = ()
    best: str | None = None  # the folder its trainer names as the best checkpoint (a basename)
    mtime_ns: int = field(default=0)  # the folder's own (changed by deletions, too)
    # False when its training state is partial (an interrupted demotion deleted the optimizer
    # state first): it cannot resume a run, so it is never counted as a resume point, and what
    # is left of its training state goes.
    resumable: bool = True
    # Whether it is one of a numbered series (checkpoint-500/, checkpoint_3/, global_step8/):
    # only those are a run's checkpoints, counted and demoted among each other.  An
    # accelerate save_state("exps/lr0.1") is one experiment's state: kept whole.
    series: bool = True

    @property
    def size(self) -> int:
        return sum(p.size for p in (*self.weights, *self.training, *self.others))

    @property
    def training_bytes(self) -> int:
        return sum(p.size for p in self.training)

    @property
    def parts(self) -> tuple[Part, ...]:
        return (*self.weights, *self.training, *self.others)

    @property
    def newest_ns(self) -> int:
        """When its newest file was last written (the folder's own mtime only when it holds
        none: a deletion inside changes it, and must not make the checkpoint look new)."""
        return max((p.mtime_ns for p in self.parts), default=self.mtime_ns)


class Layout(Protocol):
    """One checkpoint-folder layout family."""

    name: str
    # The names of the files its checkpoints hold that a sweep's patterns may match (optimizer.pt,
    # rng_state_0.pth...): a folder that also holds other checkpoint-named files is a run folder
    # with a stray file of this layout, not one of its checkpoints.
    OWNS: tuple[str, ...]

    def recognises(self, names: frozenset[str]) -> bool:
        """Whether a folder holding these names is one of this layout's checkpoints."""

    def claims(self, subfolder: str) -> bool:
        """Whether a subfolder of this name is part of one of its checkpoints (not a folder of
        checkpoints of its own)."""

    def describe(self, fd: int, name: str, tree: Tree, display: str) -> FolderCheckpoint:
        """Read what the folder holds (its small JSON files and weight headers; never a
        pickle) and describe it."""


# ---------------------------------------------------------------------------------------------
# Listing


def list_tree(fd: int, *, depth: int = 1, below: tuple[str, ...] = ()) -> Tree:
    """The entries of the open folder ``fd`` (lstat: nothing followed) and, ``depth`` levels
    down, its subfolders' (on its filesystem), their paths starting with ``below``.  Raises
    FileRefused past :data:`MAX_ENTRIES`."""
    info = os.fstat(fd)
    entries: dict[str, Part] = {}
    with os.scandir(fd) as listing:
        for entry in listing:
            if len(entries) >= MAX_ENTRIES:
                raise FileRefused(".", f"holds more than {MAX_ENTRIES} entries")
            try:
                found = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # vanished between readdir and stat
            entries[entry.name] = Part.of((*below, entry.name), found)
    subfolders: dict[str, Tree | None] = {}
    if depth > 0:
        for name, part in entries.items():
            if stat.S_ISDIR(part.mode) and part.dev == info.st_dev:
                subfolders[name] = _list_sub(fd, name, part, depth - 1, below)
    return Tree(info.st_uid, entries, subfolders, info.st_mtime_ns)


def _list_sub(fd: int, name: str, part: Part, depth: int, below: tuple[str, ...]) -> Tree | None:
    try:
        sub = os.open(name, _OPEN_DIR, dir_fd=fd)
    except OSError:
        return None
    try:
        now = os.fstat(sub)
        if (now.st_dev, now.st_ino) != (part.dev, part.ino):
            return None
        return list_tree(sub, depth=depth, below=(*below, name))
    except (OSError, FileRefused):
        return None
    finally:
        os.close(sub)


# ---------------------------------------------------------------------------------------------
# Reading and checking parts


def open_part(folder_fd: int, part: Part, display: str) -> int:
    """Open ``part`` below the open checkpoint folder without following a symlink anywhere on
    its path; FileRefused unless it is still the very file that was listed."""
    path = os.path.join(display, part.name)
    fd = os.dup(folder_fd)
    try:
        for name in part.path[:-1]:
            child = os.open(name, _OPEN_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        try:
            opened = os.open(part.path[-1], _OPEN_FILE, dir_fd=fd)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise FileRefused(path, "is a symlink; sweeper never follows symlinks") from None
            raise FileRefused(path, f"cannot open: {error.strerror}") from None
    except OSError as error:
        raise FileRefused(path, f"cannot open its folder: {error.strerror}") from None
    finally:
        os.close(fd)
    info = os.fstat(opened)
    now = Part.of(part.path, info)
    if not stat.S_ISREG(info.st_mode) or (now.identity, now.ctime_ns) != (
        part.identity,
        part.ctime_ns,
    ):
        os.close(opened)
        raise FileRefused(path, "changed since it was scanned")
    return opened


def verify_part(fd: int, part: Part, display: str) -> None:
    """Check what can be checked without trusting a pickle: a safetensors file by the format's
    rules, a torch zip by every record's CRC; any other file (a raw pickle) only by identity.
    Raises FileRefused."""
    path = os.path.join(display, part.name)
    if part.path[-1].endswith(".safetensors"):
        read_safetensors(fd, path)
        return
    if os.pread(fd, 4, 0) == _ZIP_MAGIC:
        from sweeper.formats.output import verify_records  # (output imports heavier modules)

        verify_records(fd, read_archive(fd, path), path)


def verify_parts(folder_fd: int, parts: Iterable[Part], display: str) -> None:
    """:func:`open_part` and :func:`verify_part` for each of ``parts``, and fsync each: what a
    deletion counts on must be on disk, not only in the page cache."""
    for part in parts:
        fd = open_part(folder_fd, part, display)
        try:
            verify_part(fd, part, display)
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(fd: int, part: Part, display: str) -> object:
    """A small JSON part, parsed (``MAX_JSON_BYTES`` at most)."""
    path = os.path.join(display, part.name)
    if part.size > MAX_JSON_BYTES:
        raise FileRefused(path, f"larger than {MAX_JSON_BYTES} bytes")
    opened = open_part(fd, part, display)
    try:
        raw = os.pread(opened, part.size + 1, 0)
    finally:
        os.close(opened)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FileRefused(path, f"not valid JSON: {error}") from None


# ---------------------------------------------------------------------------------------------
# What layouts share


def check_weights(fd: int, tree: Tree, display: str) -> tuple[Part, ...]:
    """The model weights at the top of the folder, each structurally sound (a safetensors file
    by the format's rules, a torch zip by its central directory; CRCs are read later, by the
    verification a deletion waits for), and complete when sharded (every shard an index names is
    present, and names the tensors the index puts there).  Raises FileRefused."""
    weights = tuple(p for p in tree.files(*WEIGHT_PATTERNS) if "fsdp" not in p.path[-1])
    for part in weights:
        _require_plain_file(part, tree, display, "weights")
    names: dict[str, frozenset[str] | None] = {}
    for part in weights:
        opened = open_part(fd, part, display)
        try:
            path = os.path.join(display, part.name)
            if part.path[-1].endswith(".safetensors"):
                header = read_safetensors(opened, path)
                data = header.data_bytes
                names[part.path[-1]] = header.tensors
            else:
                archive = read_archive(opened, path)
                data = sum(r.size for n, r in archive.records.items() if n.startswith("data/"))
                names[part.path[-1]] = None
        finally:
            os.close(opened)
        if data == 0:  # (ZeRO-3 without gathering writes these: the weights are in the shards)
            raise FileRefused(path, "holds no tensor data: not weights that can stand in")
    _require_all_shards(weights, tree, display)
    for index_name in WEIGHT_INDEXES:
        index = tree.entries.get(index_name)
        if index is None:
            continue
        _require_plain_file(index, tree, display, "weight index")
        body = read_json(fd, index, display)
        weight_map = body.get("weight_map") if isinstance(body, dict) else None
        if not isinstance(weight_map, dict):
            raise FileRefused(os.path.join(display, index_name), "no weight_map in it")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or shard not in names:
                raise FileRefused(
                    os.path.join(display, index_name),
                    f"names shard {shard!r}, which the folder does not hold: incomplete",
                )
            held = names[shard]
            if held is not None and tensor not in held:
                raise FileRefused(
                    os.path.join(display, shard), f"lacks tensor {tensor!r} its index names"
                )
    return weights


_SHARD = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.(safetensors|bin)")


def _require_all_shards(weights: tuple[Part, ...], tree: Tree, display: str) -> None:
    """Every shard of a sharded save (``model-00001-of-00004.safetensors``...) is present, index
    or no index."""
    series: dict[tuple[str, str, str], set[int]] = {}
    for part in weights:
        match = _SHARD.fullmatch(part.path[-1])
        if match:
            prefix, index, total, suffix = match.groups()
            series.setdefault((prefix, total, suffix), set()).add(int(index))
    for (prefix, total, suffix), present in series.items():
        missing = sorted(set(range(1, int(total) + 1)) - present)
        if missing:
            name = f"{prefix}-{missing[0]:05d}-of-{total}.{suffix}"
            where = os.path.join(display, name)
            raise FileRefused(where, "missing: the sharded save is incomplete")


def training_parts(tree: Tree, display: str, patterns: tuple[str, ...]) -> tuple[Part, ...]:
    """The training-state files named by ``patterns``, in the order of the patterns (the one
    a demotion deletes them in: the optimizer state first, so that an interrupted demotion
    leaves a checkpoint that says it cannot resume): each a plain file of the folder's owner
    with one link, or FileRefused (nothing of a folder is deleted on a doubt)."""
    parts = tuple(part for pattern in patterns for part in tree.files(pattern))
    for part in parts:
        _require_plain_file(part, tree, display, "training state")
    return parts


def _require_plain_file(part: Part, tree: Tree, display: str, what: str) -> None:
    path = os.path.join(display, part.name)
    if stat.S_ISLNK(part.mode):
        raise FileRefused(path, f"{what} under a symlink; sweeper never follows symlinks")
    if not part.is_file:
        raise FileRefused(path, f"{what} that is not a regular file")
    if part.uid != tree.uid:
        raise FileRefused(
            path, f"{what} owned by uid {part.uid}, not the folder's owner (uid {tree.uid})"
        )
    if part.nlink != 1:
        raise FileRefused(path, f"{what} with {part.nlink} hard links")


def others(tree: Tree, *taken: Iterable[Part]) -> tuple[Part, ...]:
    """The plain files not in ``taken``: kept as they are."""
    used = {part.path for group in taken for part in group}
    return tuple(
        part for _, part in sorted(tree.entries.items()) if part.is_file and part.path not in used
    )


def number_in(name: str, prefix: str) -> int | None:
    """N in ``<prefix>N`` (checkpoint-500, checkpoint_3, global_step8), else None."""
    match = re.fullmatch(re.escape(prefix) + r"(\d{1,18})", name)
    return int(match.group(1)) if match else None


def outcome(
    layout: str,
    weights: tuple[Part, ...],
    training: tuple[Part, ...],
    **details: object,
) -> FolderCheckpoint:
    """FULL with weights and training state, INFERENCE with weights alone."""
    kind = Kind.FULL if training or details.get("folders") else Kind.INFERENCE
    return FolderCheckpoint(layout, kind, None, weights, training, **details)  # type: ignore[arg-type]
