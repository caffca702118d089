"""The interface every layout family implements, and what the families share.

A family recognises a checkpoint's pickled root by its content (its keys and what they hold,
never the file's name) and describes it: its kind, which top-level keys are model weights,
training state or metadata, and where epoch, step and metrics live.  Everything downstream
(classification, inspect, the inference copy and its verification) works from that
:class:`Description` alone, so a new layout is one new module in ``sweeper.formats.families``
and one row in its table.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from sweeper.formats.unpickler import ParameterRef, TensorRef, as_number


class Kind(enum.Enum):
    FULL = "full training checkpoint"
    INFERENCE = "inference checkpoint"
    WEIGHTS = "bare weights"
    # Training state sweeper recognises but cannot reduce (no model weights it can name):
    # ``Description.reason`` says why.
    UNREDUCIBLE = "training checkpoint sweeper cannot reduce"
    OTHER = "not a checkpoint"


# model: weights the copy keeps; training-state: what only resuming needs, dropped; metadata:
# kept as plain data; dropped: metadata the copy cannot carry in a form its loader accepts
# (Lightning's class of its hyper-parameters, written as a plain dict instead).
Role = Literal["model", "training-state", "metadata", "dropped"]

# Keys that only resuming training needs.  Matched anywhere in the key, case-insensitively:
# optimizer_state_dict, lr_scheduler, grad_scaler, cuda_rng_state, ...
_TRAINING_STATE = re.compile(r"optim|sched|scaler|rng|random_state", re.IGNORECASE)
_EPOCH_KEYS = ("epoch",)
_STEP_KEYS = ("global_step", "step", "iteration", "iter")

# Reads the number a 0-dim tensor holds (Lightning keeps its monitored score as one); None when
# it is not a small float or integer tensor.
ScalarReader = Callable[[TensorRef], "float | None"]


def is_training_state_key(key: object) -> bool:
    return isinstance(key, str) and bool(_TRAINING_STATE.search(key))


def is_state_dict(value: object) -> bool:
    """A non-empty dict whose every value is a tensor: a model's ``state_dict()``."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(v, TensorRef | ParameterRef) for v in value.values())
    )


@dataclass(frozen=True)
class Progress:
    epoch: int | None
    step: int | None
    metrics: tuple[tuple[str, float], ...]

    def with_metrics(self, metrics: tuple[tuple[str, float], ...]) -> Progress:
        return Progress(self.epoch, self.step, self.metrics + metrics)


def progress_of(values: Mapping[object, object]) -> Progress:
    """Epoch, step and every other number stored at the top level of ``values``."""
    epoch = step = None
    metrics: list[tuple[str, float]] = []
    for key, value in values.items():
        number = as_number(value)
        if number is None or not isinstance(key, str):
            continue
        if key in _EPOCH_KEYS and isinstance(number, int):
            epoch = number
        elif key in _STEP_KEYS and isinstance(number, int):
            step = number if step is None else step
        elif not isinstance(number, bool):
            metrics.append((key, float(number)))
    return Progress(epoch, step, tuple(metrics))


@dataclass(frozen=True)
class Description:
    """What a family says about one checkpoint."""

    family: str  # "plain", "lightning", "timm", "mmengine", "generic", "weights"
    kind: Kind
    roles: Mapping[object, Role]  # every top-level key
    weights_key: str | None  # the key whose value a weights-only output is
    progress: Progress
    # For Kind.UNREDUCIBLE and OTHER: why no inference copy can be made.
    reason: str | None = None


class Family(Protocol):
    """One layout family: a module with a name and a ``describe`` function."""

    NAME: str

    def describe(self, root: dict[object, object], read_scalar: ScalarReader) -> Description | None:
        """The description of ``root`` if it is this family's layout, else None."""
        ...


def described(
    family: str,
    roles: Mapping[object, Role],
    weights_key: str,
    progress: Progress,
) -> Description:
    """A description whose kind follows from its roles: full when it holds training state."""
    full = any(role == "training-state" for role in roles.values())
    kind = Kind.FULL if full else Kind.INFERENCE
    return Description(family, kind, dict(roles), weights_key, progress)


def default_role(key: object) -> Role:
    return "training-state" if is_training_state_key(key) else "metadata"
