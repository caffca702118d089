"""Any other single-file checkpoint whose weights sit under ``model``, ``state_dict``,
``module`` or ``net`` (a dict of tensors), beside optimizer-like keys.

Kept: that key and every key that is not training state; epoch, step and metrics as for the
plain layout.  Without training state beside it, the file already is an inference checkpoint.
"""

from __future__ import annotations

from sweeper.formats.family import (
    Description,
    Role,
    ScalarReader,
    default_role,
    described,
    is_state_dict,
    progress_of,
)

__all__ = ["NAME", "default_role", "describe"]

NAME = "generic"
MODEL_KEYS = ("model", "state_dict", "module", "net")


def describe(root: dict[object, object], read_scalar: ScalarReader) -> Description | None:
    model_key = next((key for key in MODEL_KEYS if is_state_dict(root.get(key))), None)
    if model_key is None:
        return None
    roles: dict[object, Role] = {
        key: "model" if key == model_key else default_role(key) for key in root
    }
    return described(NAME, roles, model_key, progress_of(root))
