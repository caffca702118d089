"""``torch.distributed.checkpoint`` folders (FSDP sharded saves): ``.metadata`` + ``*.distcp``.

Every rank's shard of every tensor: nothing to keep and drop without consolidating first.
Reported, never touched.
"""

from __future__ import annotations

from sweeper.formats.family import Kind
from sweeper.formats.layouts.base import FolderCheckpoint, Tree

name = "torch.distributed.checkpoint"
OWNS: tuple[str, ...] = ("*.distcp", ".metadata")


def recognises(names: frozenset[str]) -> bool:
    return ".metadata" in names and any(n.endswith(".distcp") for n in names)


def claims(subfolder: str) -> bool:
    return False


def describe(fd: int, folder: str, tree: Tree, display: str) -> FolderCheckpoint:
    why = (
        "sharded (FSDP / torch.distributed.checkpoint): consolidate with "
        "torch.distributed.checkpoint.format_utils.dcp_to_torch_save first"
    )
    return FolderCheckpoint(name, Kind.UNREDUCIBLE, why)
