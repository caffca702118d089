"""Bare weights: a ``state_dict()`` saved on its own, nothing to drop."""

from __future__ import annotations

from sweeper.formats.family import Description, Kind, Progress, ScalarReader, is_state_dict

NAME = "weights"


def describe(root: dict[object, object], read_scalar: ScalarReader) -> Description | None:
    if not is_state_dict(root):
        return None
    return Description(
        NAME, Kind.WEIGHTS, dict.fromkeys(root, "metadata"), None, Progress(None, None, ())
    )
