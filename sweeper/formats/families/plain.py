"""The seed layout: ``{"model_state_dict": ..., "optimizer_state_dict": ..., "epoch": ...}``.

Weights under ``model_state_dict``; every key whose name says optimizer, scheduler, scaler or
RNG state is training state; every other key is metadata, its numbers the metrics.
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

NAME = "plain"
MODEL_KEY = "model_state_dict"


def describe(root: dict[object, object], read_scalar: ScalarReader) -> Description | None:
    if MODEL_KEY not in root:
        return None
    roles: dict[object, Role] = {
        key: "model" if key == MODEL_KEY else default_role(key) for key in root
    }
    return described(NAME, roles, MODEL_KEY, progress_of(root))
