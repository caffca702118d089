"""The inference copy's size, counted without writing its pickle, is the written copy's size.

A dry run sizes every full checkpoint's copy with ``output_size`` (its pickle's opcodes counted
by ``_PickleSizer``, the archive from the records' sizes); a real sweep writes the copy with
``plan_output``'s pickle and layout.  Every figure here is compared with what is written, for
real ``torch.save`` files of every family sweeper reads and for values chosen to cross each
threshold where the writer's opcodes change length.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from checkpoints import awkward_tensors, dict_config, full_checkpoint, tiny_model
from layouts import generic_checkpoint, lightning_run, mmengine_checkpoint, timm_checkpoint
from omegaconf import OmegaConf

from sweeper import torchzip
from sweeper.formats.output import (
    OutputEntry,
    PlainData,
    _archive_size,
    _PickleSizer,
    _PickleWriter,
    select_output,
)
from sweeper.torchzip import Mode, Provenance


@contextmanager
def opened(path: Path) -> Iterator[torchzip.Checkpoint]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield torchzip.open_checkpoint(fd, str(path))
    finally:
        os.close(fd)


def assert_sized_as_written(path: Path) -> int:
    """Every size ``output_size`` gives for the file is the size of what is written; returns
    how many modes were sized."""
    provenance = Provenance(path.name, path.stat().st_size, 1, 0xDEADBEEF, (1, 2))
    sized = 0
    with opened(path) as checkpoint:
        assert checkpoint.kind is torchzip.Kind.FULL, path
        for mode in Mode:
            selected = select_output(checkpoint, mode)
            writer = _PickleWriter()
            pickled = writer.dump(selected)
            sizer = _PickleSizer()
            assert sizer.size(selected) == len(pickled), (path, mode)
            assert sizer.storages == writer.storages
            for given in (None, provenance):
                plan = torchzip.plan_output(checkpoint, mode, given)
                assert plan.entries[0].inline == pickled
                assert torchzip.output_size(checkpoint, mode, given) == plan.total_size
                assert _archive_size(list(plan.entries)) == plan.total_size
            sized += 1
    return sized


def odd_values() -> dict[str, Any]:
    """Values where an opcode's length changes: int widths, unicode, nesting, numpy scalars."""
    return {
        "ints": [0, 255, 256, 65535, 65536, -1, -(2**31), 2**31 - 1, 2**31, -(2**31) - 1],
        "big_ints": [2**63, -(2**64), 2**70, 2**2031, -(2**2031), 2**2039, 2**2041, -(2**4000)],
        "Größe": "grün",
        "模型": {"层": "注意力", "emoji": "🚀" * 3, "": ""},
        "long_text": "x" * 70_000,
        "floats": [0.0, -0.0, float("inf"), 1e308],
        "nested": {"a": [1, {"b": (2, 3.5, None, True, False, "c")}], "empty": {}, "t": ()},
        "numpy_score": np.float64(0.8125),
        "numpy_step": np.int64(4000),
        "shared": (shared := ["one", "two"], shared),
    }


@pytest.mark.parametrize(
    "name, checkpoint",
    [
        ("default", lambda: full_checkpoint()),
        ("odd_values", lambda: full_checkpoint(extra=odd_values())),
        ("awkward_tensors", lambda: full_checkpoint(model_state=awkward_tensors())),
        (
            "nested_config",
            lambda: full_checkpoint(
                config=OmegaConf.create(
                    {
                        "model": {"layers": [{"w": 1}, {"w": [2, 3]}], "名前": "ü"},
                        "big": 2**40,
                        "ref": "${model.名前}",
                        "deep": {"a": {"b": {"c": {"d": [None, 1.5, True]}}}},
                    }
                ),
                extra={"hparams": OmegaConf.create({"lr": 1e-3, "sizes": [1, 2]})},
            ),
        ),
        ("plain_config", lambda: full_checkpoint(config={"lr": 0.1, "layers": [4, 4]})),
        # More than 256 memo entries: every later PUT and GET is the long form.
        (
            "many_tensors",
            lambda: full_checkpoint(
                model_state=OrderedDict(
                    (f"layer{i}.weight", torch.full((2,), float(i))) for i in range(300)
                )
            ),
        ),
        ("timm", lambda: timm_checkpoint(3, 0.75)),
        ("mmengine", lambda: mmengine_checkpoint(2)),
        ("generic", lambda: generic_checkpoint(1)),
    ],
)
def test_the_counted_size_is_the_written_size(
    tmp_path: Path, name: str, checkpoint: Callable[[], dict[str, Any]]
) -> None:
    path = tmp_path / f"{name}.pt"
    torch.save(checkpoint(), path)
    assert assert_sized_as_written(path) == len(Mode)


def test_lightning_checkpoints_are_sized_as_written(tmp_path: Path) -> None:
    lightning_run(tmp_path / "run", tmp_path / "weights_only", epochs=2)
    files = sorted((tmp_path / "run").glob("*.ckpt"))
    assert len(files) == 3  # two epochs and last.ckpt
    for path in files:
        assert assert_sized_as_written(path) == len(Mode)


def test_shared_model_weights_are_sized_as_written(tmp_path: Path) -> None:
    model = tiny_model()  # its head is tied to its embedding: one storage, two tensors
    path = tmp_path / "tied.pt"
    torch.save(full_checkpoint(model=model, config=dict_config()), path)
    assert assert_sized_as_written(path) == len(Mode)


@pytest.mark.parametrize(
    "value",
    [
        {"items": list(range(2500)), "keys": {str(i): i for i in range(1001)}},
        [{1, 2, 3}, frozenset({"a"}), 1.5 + 2j, b"\x00\xff" * 300, bytearray(b"xy")],
        PlainData({"config": {"lr": 0.1, "text": "é" * 300, "list": list(range(1200))}}),
        tuple(range(5)),
        ("a", "a", ("b",), ("b",)),
        [str(i) for i in range(400)],
    ],
)
def test_the_sizer_counts_what_the_writer_writes(value: object) -> None:
    writer, sizer = _PickleWriter(), _PickleSizer()
    assert sizer.size(value) == len(writer.dump(value))


def test_the_archive_size_is_the_layouts_past_zip64_offsets() -> None:
    for sizes in ([10, 2**32 - 200, 1000], [10, 2**32 + 5, 7], [2**31, 2**31, 2**31, 16], [0, 3]):
        entries = [OutputEntry(f"data/{i}", size, 0, None, None) for i, size in enumerate(sizes)]
        shared = [OutputEntry("data/x", 2**20, 0, None, None, source_data_offset=4096 * 3 + 64)]
        for case in (entries, shared + entries):
            assert _archive_size(case) == torchzip._layout(case)[1]
