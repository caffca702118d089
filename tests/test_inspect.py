"""``sweeper inspect``: what a file is and holds, from its directory and pickle alone."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import (
    TRAINING_STATE_KEYS,
    awkward_tensors,
    flip_byte,
    record_span,
    save_bare_weights,
    save_full_checkpoint,
    save_inference_checkpoint,
    storage_bytes_by_key,
    tensors_in,
    tiny_model,
)
from conftest import CliRun

from sweeper import torchzip
from sweeper.torchzip import Mode

RunSweeper = Callable[..., CliRun]


def test_kinds_are_told_apart(tmp_path: Path, run_sweeper: RunSweeper) -> None:
    files = {
        "full": tmp_path / "full.pt",
        "inference": tmp_path / "inference.pt",
        "weights": tmp_path / "weights.pt",
        "other": tmp_path / "losses.pt",
    }
    save_full_checkpoint(files["full"])
    save_inference_checkpoint(files["inference"])
    save_bare_weights(files["weights"])
    torch.save({"losses": [0.5, 0.25], "note": "not a checkpoint"}, files["other"])

    run = run_sweeper("inspect", "--json", *files.values())

    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    reports = [CliRun(0, line, "").json() for line in run.stdout.splitlines()]
    assert [(r["path"], r["kind"]) for r in reports] == [(str(p), k) for k, p in files.items()]
    assert [r["description"] for r in reports] == [
        "full training checkpoint",
        "inference checkpoint",
        "bare weights",
        "not a checkpoint",
    ]
    assert all(r["intact"] for r in reports)
    assert [sorted(r["extraction"]) for r in reports] == [["inference", "weights"], [], [], []]


def test_text_report_names_the_kind_and_keys(tmp_path: Path, run_sweeper: RunSweeper) -> None:
    path = tmp_path / "best_model.pt"
    save_full_checkpoint(path, epoch=5)

    run = run_sweeper("inspect", path)

    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"{path}: full training checkpoint, ")
    for key in ("model_state_dict", *TRAINING_STATE_KEYS, "config"):
        assert any(line.split()[:1] == [key] for line in lines), key
    assert "epoch: 5" in run.stdout


def test_key_bytes_are_the_storage_bytes_each_key_holds(
    tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    path = tmp_path / "best_model.pt"
    weights = tiny_model().state_dict()
    weights.update(awkward_tensors())
    saved = save_full_checkpoint(path, model_state=weights, extra={"ema": {"w": torch.ones(9)}})

    report = run_sweeper("inspect", "--json", path).json()

    usage = {k["key"]: k["tensor_bytes"] for k in report["keys"]}
    assert usage == storage_bytes_by_key(saved)
    assert usage["optimizer_state_dict"] > usage["model_state_dict"] > 0
    roles = {k["key"]: k["role"] for k in report["keys"]}
    assert roles["model_state_dict"] == "model"
    assert {roles[key] for key in TRAINING_STATE_KEYS} == {"training-state"}
    assert roles["config"] == roles["ema"] == "metadata"
    counts = {k["key"]: k["tensors"] for k in report["keys"]}
    assert counts["model_state_dict"] == len(tensors_in(saved["model_state_dict"]))
    assert counts["optimizer_state_dict"] == len(tensors_in(saved["optimizer_state_dict"]))


def test_epoch_step_and_metrics(tmp_path: Path, run_sweeper: RunSweeper) -> None:
    path = tmp_path / "epoch_7.pt"
    extra = {"val_loss": 0.25, "global_step": 300, "best_val_loss": float("inf")}
    save_full_checkpoint(path, epoch=7, extra={**extra, "diverged_loss": float("nan")})

    run = run_sweeper("inspect", "--json", path)

    report = json.loads(run.stdout, parse_constant=_refuse_non_json_constant)
    assert report["epoch"] == 7
    assert report["step"] == 300
    assert report["metrics"] == {
        "best_val_acc": 0.875,
        "val_loss": 0.25,
        "best_val_loss": "Infinity",
        "diverged_loss": "NaN",
    }
    assert report["file_bytes"] == path.stat().st_size


def _refuse_non_json_constant(name: str) -> None:
    raise AssertionError(f"{name} is not JSON")


def test_text_report_shows_only_what_the_file_holds(
    tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    path = tmp_path / "first.pt"
    save_full_checkpoint(path, epoch=0, extra={"\x1b[2J\x1b]0;owned\x07": 1.0})

    run = run_sweeper("inspect", path)

    assert run.returncode == 0, run.stderr
    assert "  epoch: 0\n" in run.stdout  # epoch 0 shown; no step, so no "step: None"
    assert "None" not in run.stdout
    assert "\x1b" not in run.stdout and "\x07" not in run.stdout  # no terminal escapes
    assert "\\x1b[2J" in run.stdout


@pytest.mark.parametrize(("mode", "flag"), [("inference", []), ("weights", ["--weights-only"])])
def test_predicted_bytes_are_what_extract_writes(
    tmp_path: Path, run_sweeper: RunSweeper, mode: str, flag: list[str]
) -> None:
    path = tmp_path / "best_model.pt"
    weights = tiny_model().state_dict()
    weights.update(awkward_tensors())
    save_full_checkpoint(path, model_state=weights)
    predicted = run_sweeper("inspect", "--json", path).json()["extraction"][mode]

    extracted = run_sweeper("extract", *flag, "--json", path).json()

    written = (tmp_path / f"best_model_{mode}.pt").stat().st_size
    assert predicted["bytes_written"] == written == extracted["bytes_out"]
    assert predicted["bytes_reclaimed_if_original_deleted"] == path.stat().st_size - written


def _bytes_read_by_this_process() -> int:
    """The kernel's count of bytes this process got from read-type system calls."""
    with open("/proc/self/io") as io_stats:
        return int(next(line for line in io_stats if line.startswith("rchar:")).split()[1])


def test_inspecting_reads_no_tensor_data(tmp_path: Path) -> None:
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs Linux I/O accounting in /proc/self/io")
    path = tmp_path / "big.pt"
    save_full_checkpoint(path, model=torch.nn.Linear(2048, 2048))  # ~50 MB with AdamW state
    size = path.stat().st_size
    assert size > 48 * 1024 * 1024
    fd = os.open(path, os.O_RDONLY)
    try:
        before = _bytes_read_by_this_process()
        checkpoint = torchzip.open_checkpoint(fd, str(path))
        planned = [torchzip.plan_output(checkpoint, mode).total_size for mode in Mode]
        inspecting = _bytes_read_by_this_process() - before

        before = _bytes_read_by_this_process()
        offset = 0
        while chunk := os.pread(fd, 8 << 20, offset):
            offset += len(chunk)
        reading_all = _bytes_read_by_this_process() - before
    finally:
        os.close(fd)

    assert checkpoint.kind is torchzip.Kind.FULL and min(planned) > 16 * 1024 * 1024
    assert reading_all >= size  # the counter sees preads
    assert inspecting < 1024 * 1024


def test_verify_reads_tensor_data_and_catches_a_flipped_bit(
    tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    """Plain inspect reads no tensor data, so a bit flip in the optimizer's state goes unseen;
    ``--verify`` reads every record and names the corrupt one."""
    path = tmp_path / "best_model.pt"
    save_full_checkpoint(path)
    clean = run_sweeper("inspect", "--verify", "--json", path)
    assert clean.returncode == 0
    assert json.loads(clean.stdout)["tensor_data_verified"] is True

    fd = os.open(path, os.O_RDONLY)
    try:
        root = torchzip.open_checkpoint(fd, str(path)).root
    finally:
        os.close(fd)
    assert isinstance(root, dict)
    exp_avg = root["optimizer_state_dict"]["state"][0]["exp_avg"]
    record = f"data/{exp_avg.storage.key}"
    start, _ = record_span(path, "/" + record)
    flip_byte(path, start)

    quick = run_sweeper("inspect", "--json", path)
    assert quick.returncode == 0
    assert json.loads(quick.stdout)["tensor_data_verified"] is False
    full = run_sweeper("inspect", "--verify", path)
    assert full.returncode == 1
    assert full.stderr_lines == [
        f"ERROR sweeper: {path}: CRC mismatch in record '{record}': the file is corrupt"
    ]


def test_a_copy_names_its_source_and_says_whether_it_is_current(
    tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    """The copy records which version of which file it was made from (a record torch.load
    ignores); inspect compares it with the file on disk: current, stale after a rewrite, gone."""
    path = tmp_path / "best_model.pt"
    save_full_checkpoint(path, epoch=3)
    assert run_sweeper("extract", path).returncode == 0
    copy = tmp_path / "best_model_inference.pt"
    torch.load(copy, weights_only=True)  # the extra record changes nothing for torch

    made_from = run_sweeper("inspect", "--json", copy).json()["made_from"]
    assert made_from["name"] == "best_model.pt"
    assert (made_from["size"], made_from["mtime_ns"]) == (
        path.stat().st_size,
        path.stat().st_mtime_ns,
    )
    assert made_from["state"] == "current"
    assert run_sweeper("inspect", "--json", path).json()["made_from"] is None

    save_full_checkpoint(path, epoch=4)  # the trainer rewrites its best model in place
    assert run_sweeper("inspect", "--json", copy).json()["made_from"]["state"] == "stale"
    assert "STALE" in run_sweeper("inspect", copy).stdout

    path.unlink()
    text = run_sweeper("inspect", copy).stdout
    assert "made from: best_model.pt" in text and "the source is gone" in text
