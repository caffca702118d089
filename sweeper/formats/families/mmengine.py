"""mmengine's ``Runner.save_checkpoint`` layout (OpenMMLab: mmdet, mmseg, mmpretrain...).

Recognised by a ``meta`` dict beside a ``state_dict``.  Kept: ``meta``, ``state_dict`` and
``ema_state_dict``; dropped: ``optimizer``, ``param_schedulers`` and ``message_hub`` (the
runner's logged scalars and runtime info).  Epoch and iteration live in ``meta``.
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

NAME = "mmengine"
MODEL_KEY = "state_dict"
_MODELS = frozenset({MODEL_KEY, "ema_state_dict"})
_TRAINING_STATE = frozenset({"optimizer", "param_schedulers", "message_hub"})


def describe(root: dict[object, object], read_scalar: ScalarReader) -> Description | None:
    meta = root.get("meta")
    if not isinstance(meta, dict) or not isinstance(root.get(MODEL_KEY), dict):
        return None
    roles = {key: _role(key, root[key]) for key in root}
    counters = progress_of({k: meta[k] for k in ("epoch", "iter") if k in meta})
    return described(NAME, roles, MODEL_KEY, counters)


def _role(key: object, value: object) -> Role:
    if key in _MODELS and isinstance(value, dict):
        return "model"
    if key in _TRAINING_STATE:
        return "training-state"
    return default_role(key)
