"""timm's ``CheckpointSaver`` layout (``checkpoint-7.pth.tar``, ``model_best.pth.tar``).

Recognised by ``arch`` beside a ``state_dict``.  Kept: ``state_dict``, ``state_dict_ema`` (and
any other ``state_dict_ema*``), ``arch``, ``epoch``, ``metric``, ``version`` and ``args`` (an
``argparse.Namespace``, written as a plain dict); dropped: ``optimizer`` and ``amp_scaler``.
``timm.models.load_checkpoint`` reads ``state_dict`` (or ``state_dict_ema``) from the copy.
"""

from __future__ import annotations

from sweeper.formats.family import (
    Description,
    Role,
    ScalarReader,
    default_role,
    described,
    progress_of,
)

NAME = "timm"
MODEL_KEY = "state_dict"


def describe(root: dict[object, object], read_scalar: ScalarReader) -> Description | None:
    if not isinstance(root.get("arch"), str) or not isinstance(root.get(MODEL_KEY), dict):
        return None
    roles = {key: _role(key, root[key]) for key in root}
    return described(
        NAME,
        roles,
        MODEL_KEY,
        progress_of({k: root[k] for k in ("epoch", "metric") if k in root}),
    )


def _role(key: object, value: object) -> Role:
    if isinstance(key, str) and key.startswith(MODEL_KEY) and isinstance(value, dict):
        return "model"
    return default_role(key)
