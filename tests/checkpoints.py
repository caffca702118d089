"""Real checkpoints for tests: tiny models saved with ``torch.save``, and ways to look at them.

Every builder writes with the real ``torch.save``; the only faked edge is
:func:`save_as_if_on_gpu`, which changes the location torch records for each storage.
Comparisons (:func:`assert_same_tensors`) check what sweeper promises to keep: bytes, dtype,
shape, stride, storage offset and which tensors share a storage.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

TEMP_MARK = ".sweeper-tmp-"
TRAINING_STATE_KEYS = (
    "optimizer_state_dict",
    "scheduler_state_dict",
    "scaler_state_dict",
    "rng_state",
)


class TinyLM(torch.nn.Module):
    """An embedding, a hidden layer and an output layer tied to the embedding's weight."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps_seen", torch.tensor(0, dtype=torch.int64))


def tiny_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def awkward_tensors() -> dict[str, torch.Tensor]:
    """Tensors that a naive copier gets wrong: narrow and integer dtypes, views with strides and
    offsets into one shared storage, empty and 0-dim tensors."""
    torch.manual_seed(1)
    base = torch.randn(4, 6)
    return {
        "half": torch.randn(3, 5).half(),
        "bf16": torch.randn(2, 7).bfloat16(),
        "double": torch.randn(3, dtype=torch.float64),
        "int64": torch.arange(-5, 7, dtype=torch.int64),
        "int8": torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 7, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),
        "row_slice": base[1:3],
        "column_stride": base[:, ::2],
        "empty": torch.empty(0),
        "empty_2d": torch.empty(0, 3),
        "scalar": torch.tensor(3.25),
        "int_scalar": torch.tensor(-9, dtype=torch.int32),
    }


def dict_config() -> DictConfig:
    """A DictConfig with nested containers and unresolved interpolations, one of them an env var."""
    return OmegaConf.create(
        {
            "model": {"name": "tiny", "widths": [6, 6], "dropout": 0.1},
            "data": {"root": "${oc.env:HOME}/datasets", "name": "${model.name}-data"},
            "train": {"lr": 0.001, "epochs": 3, "amp": False, "tag": None},
        }
    )


def plain_config() -> dict[str, Any]:
    return {"model": {"name": "tiny", "widths": [6, 6]}, "lr": 0.001, "seed": 0}


def training_state(model: torch.nn.Module) -> dict[str, Any]:
    """Optimizer (AdamW after one step), scheduler, AMP scaler and RNG state for ``model``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    loss = sum(p.float().pow(2).sum() for p in model.parameters())
    assert isinstance(loss, torch.Tensor)
    torch.autograd.backward(loss)
    optimizer.step()
    scheduler.step()
    return {
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "scaler_state_dict": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
        "rng_state": torch.get_rng_state(),
    }


def full_checkpoint(
    *,
    epoch: int = 1,
    config: object = None,
    model: torch.nn.Module | None = None,
    model_state: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What a training loop saves: weights, training state, config, epoch and metrics.

    ``config`` defaults to :func:`dict_config`; ``model_state`` replaces ``model.state_dict()``
    (training state is still built from ``model``)."""
    model = model if model is not None else tiny_model()
    checkpoint: dict[str, Any] = {
        "model_state_dict": model_state if model_state is not None else model.state_dict(),
        **training_state(model),
        "config": config if config is not None else dict_config(),
        "epoch": epoch,
        "best_val_acc": 0.875,
    }
    checkpoint.update(extra or {})
    return checkpoint


def save_full_checkpoint(
    path: Path,
    *,
    epoch: int = 1,
    config: object = None,
    model: torch.nn.Module | None = None,
    model_state: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``torch.save`` a :func:`full_checkpoint` to ``path`` and return what was saved."""
    checkpoint = full_checkpoint(
        epoch=epoch, config=config, model=model, model_state=model_state, extra=extra
    )
    torch.save(checkpoint, path)
    return checkpoint


def save_inference_checkpoint(path: Path, model: torch.nn.Module | None = None) -> None:
    model = model if model is not None else tiny_model()
    torch.save({"model_state_dict": model.state_dict(), "config": plain_config(), "epoch": 2}, path)


def save_bare_weights(path: Path, model: torch.nn.Module | None = None) -> None:
    torch.save((model if model is not None else tiny_model()).state_dict(), path)


def save_legacy(path: Path, obj: object) -> None:
    """The pre-1.6 (non-zip) format."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def save_as_if_on_gpu(obj: object, path: Path, location: str = "cuda:0") -> None:
    """``torch.save`` with every storage recorded at ``location``, as on a GPU machine.

    Only the location tag torch writes is faked; the bytes and the pickle are torch's own."""
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.location_tag = real


def save_pickle_as_checkpoint(path: Path, pickled: bytes) -> None:
    """A zip archive in torch's layout (stored records under one top folder) whose data.pkl is
    ``pickled``: for pickles no ``torch.save`` writes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")


def full_looking_pickle(history: bytes) -> bytes:
    """The protocol-2 pickle of ``{"model_state_dict": {}, "optimizer_state_dict": {},
    "history": H}``, H being the opcodes ``history`` (memo indices from 4 on are free): what
    would be planned as a full checkpoint, were it read."""
    return (
        b"\x80\x02}q\x00(X\x10\x00\x00\x00model_state_dict}q\x01"
        b"X\x14\x00\x00\x00optimizer_state_dict}q\x02X\x07\x00\x00\x00historyq\x03"
        + history
        + b"u."
    )


def batched_list(item: bytes, count: int) -> bytes:
    """The opcodes of a list of ``count`` copies of ``item`` (one value's opcodes), as pickle
    writes a list: EMPTY_LIST, then APPENDS in batches of 1000."""
    batches, rest = divmod(count, 1000)
    batch = b"(" + item * 1000 + b"e"
    return b"]" + batch * batches + (b"(" + item * rest + b"e" if rest else b"")


# ---------------------------------------------------------------------------------------------
# Looking at tensors.


def tensors_in(value: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples, by a path such as ``state/0/exp_avg``."""
    found: dict[str, torch.Tensor] = {}
    if isinstance(value, torch.Tensor):
        found[prefix] = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            found.update(tensors_in(item, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found.update(tensors_in(item, f"{prefix}/{index}" if prefix else str(index)))
    return found


def sharing(tensors: Mapping[str, torch.Tensor]) -> set[frozenset[str]]:
    """Which tensors share a storage, as groups of names (empty storages have no address)."""
    groups: dict[int, set[str]] = {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        if storage.nbytes():
            groups.setdefault(storage.data_ptr(), set()).add(name)
    return {frozenset(group) for group in groups.values()}


def assert_same_tensors(expected: object, actual: object) -> None:
    """Same tensors under the same names: values, dtype, shape, stride, offset and sharing."""
    want, got = tensors_in(expected), tensors_in(actual)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        other = got[name]
        assert type(other) is type(tensor), name  # a Parameter stays a Parameter
        assert other.requires_grad == tensor.requires_grad, name
        assert other.dtype == tensor.dtype, name
        assert other.shape == tensor.shape, name
        assert other.stride() == tensor.stride(), name
        assert other.storage_offset() == tensor.storage_offset(), name
        assert other.untyped_storage().nbytes() == tensor.untyped_storage().nbytes(), name
        assert other.device.type == "cpu", name
        assert torch.equal(other, tensor), name
        assert bytes(other.untyped_storage()) == bytes(tensor.untyped_storage()), name
    assert sharing(got) == sharing(want)


def storage_bytes_by_key(checkpoint: Mapping[str, Any]) -> dict[str, int]:
    """Bytes of the distinct storages first reached through each top-level key, in order."""
    seen: set[int] = set()
    usage: dict[str, int] = {}
    for key, value in checkpoint.items():
        total = 0
        for tensor in tensors_in(value).values():
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        usage[key] = total
    return usage


def load_without_allowlist(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with nothing but torch's own types on its allowlist."""
    extra = torch.serialization.get_safe_globals()
    assert all(getattr(g, "__module__", "").startswith("torch.") for g in extra), extra
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------
# Bytes on disk.


def record_span(path: Path, name_suffix: str) -> tuple[int, int]:
    """(offset, size) of the data of the one zip record whose name ends with ``name_suffix``
    (``"/data/0"``, ``"/data.pkl"``), found with zipfile and the record's local header."""
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith(name_suffix)]
    with path.open("rb") as file:
        file.seek(info.header_offset)
        header = file.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def central_directory_offset(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return archive.start_dir


def flip_byte(path: Path, offset: int) -> None:
    """Invert one byte in place, keeping the file's size."""
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def folder_state(folder: Path) -> dict[str, tuple[object, ...]]:
    """Each entry's type, size, mtime, owner, mode and (regular files) content digest, without
    following symlinks or opening anything that could block."""
    state: dict[str, tuple[object, ...]] = {}
    for entry in os.scandir(folder):
        info = entry.stat(follow_symlinks=False)
        digest = ""
        if stat.S_ISREG(info.st_mode):
            try:
                digest = hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
            except PermissionError:
                digest = "unreadable"
        state[entry.name] = (
            stat.S_IFMT(info.st_mode),
            stat.S_IMODE(info.st_mode),
            info.st_size,
            info.st_mtime_ns,
            info.st_uid,
            info.st_gid,
            digest,
        )
    return state


def temp_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if TEMP_MARK in name)
