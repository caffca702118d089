"""The layout families sweeper knows, one module each, asked in order.

| family    | recognised by                                  | model weights                 |
|-----------|------------------------------------------------|-------------------------------|
| lightning | ``pytorch-lightning_version`` + ``state_dict`` | ``state_dict``                |
| timm      | ``arch`` + ``state_dict``                      | ``state_dict`` (+ EMA)        |
| mmengine  | ``meta`` + ``state_dict``                      | ``state_dict`` (+ EMA)        |
| plain     | ``model_state_dict``                           | ``model_state_dict``          |
| generic   | ``model``/``state_dict``/``module``/``net``    | that key                      |
| weights   | a dict of tensors and nothing else             | the whole file                |

The more specific families come first: a Lightning checkpoint also looks generic.
"""

from __future__ import annotations

from collections.abc import Sequence

from sweeper.formats.families import generic, lightning, mmengine, plain, timm, weights
from sweeper.formats.family import Description, Family, Kind, Progress, ScalarReader

FAMILIES: Sequence[Family] = (lightning, timm, mmengine, plain, generic, weights)

_KNOWN_MODEL_KEYS = "model_state_dict, state_dict, model, module or net"


def describe(root: object, read_scalar: ScalarReader) -> Description:
    """What ``root`` (a checkpoint's unpickled root object) is, according to the first family
    that recognises it."""
    if not isinstance(root, dict):
        return Description("none", Kind.OTHER, {}, None, Progress(None, None, ()))
    for family in FAMILIES:
        description = family.describe(root, read_scalar)
        if description is not None:
            return description
    roles = {key: generic.default_role(key) for key in root}
    training = [str(key) for key, role in roles.items() if role == "training-state"]
    if not training:
        return Description("none", Kind.OTHER, roles, None, Progress(None, None, ()))
    reason = (
        f"holds training state ({', '.join(training)}) but no model weights sweeper can name: "
        f"none of {_KNOWN_MODEL_KEYS} is a state dict of tensors"
    )
    return Description("unknown", Kind.UNREDUCIBLE, roles, None, Progress(None, None, ()), reason)
