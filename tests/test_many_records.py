"""Extraction of checkpoints with thousands of small tensors: records written in runs.

Small records are copied in runs of about 1 MiB (one read of the source, one write, one read
back; ``sweeper.formats.output.write_output``).  These tests check that a run keeps every
guarantee a record copied alone has: the copy loads equal to the source, a corrupt record or a
local header at odds with the directory anywhere in a run is refused in one line naming the file,
bytes that reach the output other than as planned are caught by the read-back, and nothing is
left behind when a run is refused.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import (
    flip_byte,
    folder_state,
    overwrite,
    plain_config,
    record_span,
    sharing,
    temp_files,
    training_state,
)
from conftest import CliRun

from sweeper import torchzip
from sweeper.errors import FileRefused
from sweeper.extract import Located, extract
from sweeper.formats import output
from sweeper.torchzip import Mode

RunSweeper = Callable[..., CliRun]

COUNT = 2000


def small_tensors(count: int, *, low: int = 1024, high: int = 100 * 1024) -> dict[str, Any]:
    """``count`` fp32 tensors of ``low``-``high`` bytes, sizes log-uniform (seeded), with a
    few other dtypes and a view sharing its storage with another tensor among them."""
    rng = random.Random(11)
    generator = torch.Generator().manual_seed(11)
    state: dict[str, Any] = {}
    for number in range(count):
        size = int(math.exp(rng.uniform(math.log(low), math.log(high)))) // 4
        state[f"layers.{number}.weight"] = torch.randn(size, generator=generator)
    state["layers.7.weight"] = state["layers.7.weight"].to(torch.float16)
    state["layers.8.weight"] = torch.arange(300, dtype=torch.int64)
    state["layers.9.weight"] = state["layers.10.weight"][5:50]  # shares a storage
    return state


def save_many(path: Path, state: dict[str, Any], *, model_first: bool = True) -> dict[str, Any]:
    """A full checkpoint of ``state`` with an optimizer moment per tensor; with
    ``model_first`` False the optimizer is saved first and holds every third model tensor
    itself, so that the model's records are scattered among the optimizer's in the source
    (runs read several stretches)."""
    training = training_state(torch.nn.Linear(4, 4))
    training["optimizer_state_dict"]["state"] = {
        number: {
            "exp_avg": tensor if number % 3 == 0 and not model_first else torch.zeros(1),
            "exp_avg_sq": torch.ones_like(tensor),
        }
        for number, tensor in enumerate(state.values())
    }
    model = {"model_state_dict": state}
    rest = {"config": plain_config(), "epoch": 4, "best_val_acc": 0.5}
    checkpoint = {**model, **training, **rest} if model_first else {**training, **model, **rest}
    torch.save(checkpoint, path)
    return checkpoint


def assert_same_state(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Same tensors, names in the same order: values, dtype, shape, stride, offset, the whole
    storage's bytes and sharing (``checkpoints.assert_same_tensors`` compares storages byte
    by byte in Python: minutes for 40 MB)."""
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        other = actual[name]
        assert (other.dtype, other.shape, other.stride()) == (
            tensor.dtype,
            tensor.shape,
            tensor.stride(),
        ), name
        assert other.storage_offset() == tensor.storage_offset(), name
        assert torch.equal(other, tensor), name
        mine, theirs = (
            torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()) for t in (other, tensor)
        )
        assert torch.equal(mine, theirs), name
    assert sharing(actual) == sharing(expected)


@contextlib.contextmanager
def located(path: Path) -> Iterator[Located]:
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield Located(dir_fd, path.name, str(path))
    finally:
        os.close(dir_fd)


def assert_refused_in_one_line(run: CliRun, path: Path, reason: str) -> None:
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert len(run.stderr_lines) == 1, run.stderr
    assert run.stderr_lines[0].startswith(f"ERROR sweeper: {path}: "), run.stderr
    assert reason in run.stderr_lines[0], run.stderr


@pytest.mark.parametrize("model_first", [True, False], ids=["model-first", "scattered"])
def test_two_thousand_small_tensors_load_back_equal(
    checkpoint_dir: Path, run_sweeper: RunSweeper, model_first: bool
) -> None:
    source = checkpoint_dir / "ckpt.pt"
    state = small_tensors(COUNT)
    state["layers.1000.weight"] = torch.randn(600_000)  # 2.4 MB: copied alone, mid-model
    saved = save_many(source, state, model_first=model_first)

    run = run_sweeper("extract", source, timeout=120)

    assert run.returncode == 0 and run.stderr == "", run.stderr
    loaded = torch.load(checkpoint_dir / "ckpt_inference.pt", weights_only=True)
    assert_same_state(saved["model_state_dict"], loaded["model_state_dict"])
    shared = loaded["model_state_dict"]
    assert shared["layers.9.weight"].untyped_storage().data_ptr() == (
        shared["layers.10.weight"].untyped_storage().data_ptr()
    )
    assert (loaded["epoch"], loaded["best_val_acc"]) == (4, 0.5)
    assert "optimizer_state_dict" not in loaded
    assert temp_files(checkpoint_dir) == []


def test_runs_hold_many_records_each(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of runs: a few writes per MiB, not one per record (counted, not timed)."""
    source = checkpoint_dir / "ckpt.pt"
    save_many(source, small_tensors(COUNT, high=8 * 1024))
    writes: list[int] = []
    real = output._write_all

    def counted(fd: int, data: bytes | memoryview, offset: int) -> None:
        writes.append(len(data))
        real(fd, data, offset)

    monkeypatch.setattr(output, "_write_all", counted)
    with located(source) as src, located(checkpoint_dir / "out.pt") as dst:
        extract(src, dst, Mode.INFERENCE)

    assert len(writes) < COUNT / 20
    assert torch.load(checkpoint_dir / "out.pt", weights_only=True)["epoch"] == 4


def _model_record(path: Path, number: int) -> tuple[int, int]:
    return record_span(path, f"/data/{number}")


def test_a_corrupt_record_in_the_middle_of_a_run_is_refused(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    source = checkpoint_dir / "ckpt.pt"
    save_many(source, small_tensors(COUNT, high=8 * 1024))  # ~100 records a run
    offset, size = _model_record(source, 1234)
    flip_byte(source, offset + size // 2)
    before = folder_state(checkpoint_dir)

    run = run_sweeper("extract", source, "--delete-original", timeout=120)

    reason = "CRC mismatch in record 'data/1234': the source record is corrupt"
    assert_refused_in_one_line(run, source, reason)
    assert folder_state(checkpoint_dir) == before  # no copy, no temp, the source kept


def test_a_local_header_at_odds_with_the_directory_in_a_run_is_refused(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    source = checkpoint_dir / "ckpt.pt"
    save_many(source, small_tensors(COUNT, high=8 * 1024))
    with torchzip_archive(source) as archive:
        header_offset = archive.records["data/777"].header_offset
    overwrite(source, header_offset + 30 + len("ckpt/data/"), b"9")  # names data/977
    before = folder_state(checkpoint_dir)

    run = run_sweeper("extract", source, timeout=120)

    assert_refused_in_one_line(run, source, "malformed archive: local header names")
    assert folder_state(checkpoint_dir) == before


@contextlib.contextmanager
def torchzip_archive(path: Path) -> Iterator[torchzip.Archive]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield torchzip.read_archive(fd, str(path))
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["data", "local-header"])
def test_bytes_that_reach_the_output_wrong_are_caught_by_the_read_back(
    checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The read-back reads the output file, not the buffer that was written: a run whose
    bytes land wrong (a write error) is refused, and no output or temp file is left."""
    source = checkpoint_dir / "ckpt.pt"
    save_many(source, small_tensors(300, high=8 * 1024))
    before = folder_state(checkpoint_dir)
    real = output._write_all
    runs = [0]

    def damaging(fd: int, data: bytes | memoryview, offset: int) -> None:
        if len(data) > 100_000:  # a run of records
            runs[0] += 1
            if runs[0] == 1:
                damaged = bytearray(data)
                # Byte 0 is the run's first local header; the middle is some record's data.
                damaged[0 if where == "local-header" else len(damaged) // 2] ^= 0xFF
                real(fd, damaged, offset)
                return
        real(fd, data, offset)

    monkeypatch.setattr(output, "_write_all", damaging)
    with (
        located(source) as src,
        located(checkpoint_dir / "out.pt") as dst,
        pytest.raises(FileRefused) as refused,
    ):
        extract(src, dst, Mode.INFERENCE)

    assert runs[0] >= 1
    expected = "local header differs" if where == "local-header" else "CRC mismatch in record"
    assert expected in str(refused.value)
    assert folder_state(checkpoint_dir) == before
