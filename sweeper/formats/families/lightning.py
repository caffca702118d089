"""PyTorch Lightning's ``Trainer.save_checkpoint`` layout (``.ckpt``).

Recognised by ``pytorch-lightning_version`` beside a ``state_dict``.  The copy holds what
``ModelCheckpoint(save_weights_only=True)`` writes: ``state_dict``, ``epoch``, ``global_step``,
``pytorch-lightning_version``, ``loops`` (progress counters, which Lightning writes even then),
the model's and datamodule's hyper-parameters and their names, and whatever a module's
``on_save_checkpoint`` added.  Dropped: ``optimizer_states``, ``lr_schedulers``, ``callbacks``
and the precision plugin's state (its key is the plugin's class name, ``MixedPrecision``), and
``hparams_type``: the copy writes OmegaConf hyper-parameters as a plain dict, which
``load_from_checkpoint`` takes as it is.  The metric is the score each ``ModelCheckpoint``
callback monitored when the file was written (``callbacks`` -> ``current_score``).
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
from sweeper.formats.unpickler import TensorRef, as_number

NAME = "lightning"
VERSION_KEY = "pytorch-lightning_version"
MODEL_KEY = "state_dict"
_TRAINING_STATE = frozenset(
    {
        "optimizer_states",
        "lr_schedulers",
        "callbacks",
        "native_amp_scaling_state",
        "amp_scaling_state",
    }
)
_DROPPED = frozenset({"hparams_type", "datamodule_hparams_type"})
# Precision plugins save their state under their class's name (MixedPrecision: the grad
# scaler's state); older releases named them ...PrecisionPlugin.
_PRECISION_SUFFIXES = ("Precision", "PrecisionPlugin")


def describe(root: dict[object, object], read_scalar: ScalarReader) -> Description | None:
    if VERSION_KEY not in root or not isinstance(root.get(MODEL_KEY), dict):
        return None
    roles = {key: _role(key) for key in root}
    counters = progress_of({k: root[k] for k in ("epoch", "global_step") if k in root})
    return described(
        NAME,
        roles,
        MODEL_KEY,
        counters.with_metrics(_monitored_scores(root.get("callbacks"), read_scalar)),
    )


def _role(key: object) -> Role:
    if key == MODEL_KEY:
        return "model"
    if key in _TRAINING_STATE or (isinstance(key, str) and key.endswith(_PRECISION_SUFFIXES)):
        return "training-state"
    if key in _DROPPED:
        return "dropped"
    return default_role(key)


def _monitored_scores(
    callbacks: object, read_scalar: ScalarReader
) -> tuple[tuple[str, float], ...]:
    """``ModelCheckpoint{...}`` -> ``{"monitor": "val_loss", "current_score": tensor(0.3)}``:
    the monitored name and the score of this checkpoint, once per name."""
    if not isinstance(callbacks, dict):
        return ()
    scores: dict[str, float] = {}
    for name, state in callbacks.items():
        if not (isinstance(name, str) and name.startswith("ModelCheckpoint")):
            continue
        if not isinstance(state, dict) or not isinstance(state.get("monitor"), str):
            continue
        score = state.get("current_score")
        number = read_scalar(score) if isinstance(score, TensorRef) else as_number(score)
        if number is not None and not isinstance(number, bool):
            scores.setdefault(state["monitor"], float(number))
    return tuple(scores.items())
