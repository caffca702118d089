"""DeepSpeed ``save_checkpoint`` folders on their own: ``global_step500/`` beside ``latest``.

Recognised by ZeRO shard files (``*_optim_states.pt``, ``*model_states.pt``).  Without
consolidated weights beside them there is nothing to keep and drop: reported, never touched.
Inside a Hugging Face checkpoint the ``global_stepN/`` folder is that layout's training state
(``sweeper.formats.layouts.hf_trainer``).
"""

from __future__ import annotations

from sweeper.formats.family import Kind
from sweeper.formats.layouts.base import FolderCheckpoint, Tree, number_in

name = "DeepSpeed"


# mp_rank_00_model_states.pt, (bf16_)zero_pp_rank_0_mp_rank_00_optim_states.pt,
# layer_01-model_states.pt (pipeline), expp_rank_0_mp_rank_00_optim_states.pt (MoE)
OWNS: tuple[str, ...] = ("*_optim_states.pt", "*_model_states.pt", "*-model_states.pt")


_ENDINGS = tuple(pattern[1:] for pattern in OWNS)  # (each pattern is "*" and a literal ending)


def is_shard(name: str) -> bool:
    return name.endswith(_ENDINGS)


def recognises(names: frozenset[str]) -> bool:
    return any(is_shard(n) for n in names)


def claims(subfolder: str) -> bool:
    return False


def describe(fd: int, folder: str, tree: Tree, display: str) -> FolderCheckpoint:
    why = (
        "DeepSpeed ZeRO shards without consolidated weights: consolidate with zero_to_fp32.py first"
    )
    return FolderCheckpoint(name, Kind.UNREDUCIBLE, why, step=number_in(folder, "global_step"))
