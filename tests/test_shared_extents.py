"""Inference copies that share the source's blocks (issue 14), on real filesystems made here.

A loop-mounted XFS with ``reflink=1`` shares: the copy's storage records are the source's very
blocks (FIEMAP flags them ``SHARED``; the free space barely moves), and it still loads, verifies
and refuses a corrupt source.  A loop-mounted ext4 and a tmpfs do not share: the copy is written
as before, byte for byte the same file.  Needs root, a loop device and mkfs.xfs (``.ci/run``
installs xfsprogs); skipped, with the reason, where any is missing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from checkpoints import flip_byte, folder_state, record_span, save_full_checkpoint, temp_files
from conftest import CliRun
from test_faults import _check_point, _tree_bytes
from trees import ledger_lines, outcome_total, run_fault_driver, set_mtime

from sweeper import extents, torchzip
from sweeper.errors import FileRefused
from sweeper.extract import FileIdentity, Located, extract, verify_existing_copy
from sweeper.formats.output import _layout, _torch_data_offset
from sweeper.formats.records import record_data_offset
from sweeper.torchzip import Mode

RunSweeper = Callable[..., CliRun]
MakeFilesystem = Callable[[str], Path]
MIB = 2**20


@pytest.fixture
def make_filesystem(tmp_path: Path) -> Iterator[MakeFilesystem]:
    """``make_filesystem(kind)`` mounts a fresh filesystem in tmp_path: ``"xfs"`` (reflink=1),
    ``"btrfs"`` or ``"ext4"`` on a loop device, or ``"tmpfs"``; unmounted, and the loop device
    detached, at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    mounted: list[Path] = []

    def make(kind: str, size: int = 320 * MIB) -> Path:
        mount_point = tmp_path / f"{kind}{len(mounted)}"
        mount_point.mkdir()
        if kind == "tmpfs":
            command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)]
        else:
            tool = f"mkfs.{kind}"
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed (.ci/run installs it)")
            image = tmp_path / f"{kind}{len(mounted)}.img"
            with open(image, "wb") as file:
                file.truncate(size)
            options = {"xfs": ["-m", "reflink=1"], "btrfs": [], "ext4": ["-F"]}[kind]
            made = subprocess.run([tool, "-q", *options, str(image)], capture_output=True)
            if made.returncode != 0:
                pytest.skip(f"cannot make {kind}: {made.stderr.decode().strip()[-300:]}")
            # -o loop sets autoclear: the loop device goes with the unmount.
            command = ["mount", "-o", "loop", str(image), str(mount_point)]
        done = subprocess.run(command, capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount {kind} here: {done.stderr.decode().strip()[-300:]}")
        mounted.append(mount_point)
        return mount_point

    try:
        yield make
    finally:
        for mount_point in reversed(mounted):
            subprocess.run(["umount", str(mount_point)], check=True)


class Wide(torch.nn.Module):
    """Two 1 MiB weight matrices (shared, in the copy), small biases and a LayerNorm (copied)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(512, 512)
        self.norm = torch.nn.LayerNorm(512)
        self.second = torch.nn.Linear(512, 512)


def save_wide(path: Path, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    saved = save_full_checkpoint(path, model=Wide())
    os.chmod(path, 0o640)
    return saved


def weight_bytes(saved: dict[str, Any]) -> int:
    return sum(t.untyped_storage().nbytes() for t in saved["model_state_dict"].values())


def used_bytes(folder: Path) -> int:
    """The filesystem's used bytes once they hold still: XFS frees a deleted file's blocks in
    the background, after the unlink and the sync."""
    os.sync()
    last, steady, deadline = -1, 0, time.monotonic() + 10
    while steady < 5 and time.monotonic() < deadline:
        vfs = os.statvfs(folder)
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        steady = steady + 1 if used == last else 0
        last = used
        time.sleep(0.05)
    return last


def shared_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return extents.shared_bytes(fd)
    finally:
        os.close(fd)


def assert_loads(copy: Path, saved: dict[str, Any]) -> None:
    """Loads with ``weights_only=True``, also memory-mapped (which needs every record aligned),
    to the very weights saved."""
    for mapped in (False, True):
        loaded = torch.load(copy, weights_only=True, mmap=mapped)
        assert set(loaded["model_state_dict"]) == set(saved["model_state_dict"])
        for key, tensor in saved["model_state_dict"].items():
            assert torch.equal(loaded["model_state_dict"][key], tensor), key
        assert "optimizer_state_dict" not in loaded and loaded["epoch"] == saved["epoch"]


def extract_json(run_sweeper: RunSweeper, *args: object) -> dict[str, Any]:
    run = run_sweeper("extract", *args, "--json")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    result: dict[str, Any] = run.json()
    return result


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_the_copy_shares_the_sources_blocks_and_takes_almost_no_space(
    make_filesystem: MakeFilesystem, run_sweeper: RunSweeper, kind: str
) -> None:
    disk = make_filesystem(kind)
    source = disk / "e1.pt"
    saved = save_wide(source)
    weights = weight_bytes(saved)
    before = used_bytes(disk)

    result = extract_json(run_sweeper, source)

    copy = disk / "e1_inference.pt"
    new_space = used_bytes(disk) - before
    assert result["bytes_out"] == copy.stat().st_size > weights
    assert 0.95 * weights < result["bytes_shared"] < weights
    assert shared_bytes(copy) >= result["bytes_shared"]  # the filesystem says so too
    assert new_space <= 64 * 1024, new_space  # heads, tails, headers: a few blocks
    assert_loads(copy, saved)
    assert copy.stat().st_mode & 0o7777 == 0o640
    assert temp_files(disk) == []
    folder = os.open(disk, os.O_RDONLY | os.O_DIRECTORY)
    try:  # read back in full, as a deletion's proof is
        verify_existing_copy(
            Located(folder, source.name, str(source)),
            Located(folder, copy.name, str(copy)),
            FileIdentity.of(source.stat()),
        )
    finally:
        os.close(folder)


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
def test_a_corrupt_source_record_is_still_refused_where_blocks_are_shared(
    make_filesystem: MakeFilesystem, run_sweeper: RunSweeper, kind: str
) -> None:
    """A bit flipped in the middle of a weight matrix (its blocks are shared, not read while
    cloning): reading the copy back finds it, and nothing is written."""
    disk = make_filesystem(kind)
    source = disk / "e1.pt"
    save_wide(source)
    offset, size = record_span(source, "/data/0")
    assert size == 512 * 512 * 4
    flip_byte(source, offset + size // 2)
    before = folder_state(disk)

    run = run_sweeper("extract", source)

    assert run.returncode == 1 and len(run.stderr_lines) == 1, run.stderr
    assert "CRC mismatch" in run.stderr and "the source record is corrupt" in run.stderr
    assert folder_state(disk) == before


@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_where_blocks_cannot_be_shared_the_same_copy_is_written(
    make_filesystem: MakeFilesystem, run_sweeper: RunSweeper, kind: str
) -> None:
    """ext4 and tmpfs cannot share blocks: the clone is refused and the records are copied;
    the copy is laid out exactly as the one XFS gets, and a corrupt source is refused there
    too."""
    disk, xfs = make_filesystem(kind), make_filesystem("xfs")
    saved = save_wide(disk / "e1.pt")
    shutil.copyfile(disk / "e1.pt", xfs / "e1.pt")

    result = extract_json(run_sweeper, disk / "e1.pt")
    extract_json(run_sweeper, xfs / "e1.pt")

    copy = disk / "e1_inference.pt"
    assert result["bytes_shared"] == 0 and shared_bytes(copy) == 0
    assert layout_of(copy) == layout_of(xfs / "e1_inference.pt")
    assert_loads(copy, saved)

    copy.unlink()
    offset, size = record_span(disk / "e1.pt", "/data/0")
    flip_byte(disk / "e1.pt", offset + size // 2)
    run = run_sweeper("extract", disk / "e1.pt")
    assert run.returncode == 1 and "CRC mismatch" in run.stderr, run.stderr
    assert not copy.exists() and temp_files(disk) == []


def layout_of(copy: Path) -> dict[str, tuple[int, int, int]]:
    """(data offset, size, CRC) of each record but the provenance (which names the folder)."""
    fd = os.open(copy, os.O_RDONLY)
    try:
        archive = torchzip.read_archive(fd, str(copy))
        return {
            record.name: (record_data_offset(fd, archive, record, ""), record.size, record.crc32)
            for record in archive.records.values()
            if record.name != torchzip.PROVENANCE_RECORD
        }
    finally:
        os.close(fd)


def fill(disk: Path, leave: int) -> None:
    """Take all but about ``leave`` bytes of the free space, root's reserve included (ext4
    keeps a few MiB even from root: all of what it gives)."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = 0
        step = free_bytes(disk)
        while step >= 4096 and free_bytes(disk) > leave:
            step = min(step, (free_bytes(disk) - leave) // 4096 * 4096)
            try:
                os.posix_fallocate(fd, size, step)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                step //= 2  # metadata takes its share too
                continue
            size += step
        os.fsync(fd)
    finally:
        os.close(fd)


def free_bytes(disk: Path) -> int:
    vfs = os.statvfs(disk)
    return vfs.f_bfree * vfs.f_frsize


def test_on_a_full_xfs_demotion_still_works_where_ext4_refuses(
    make_filesystem: MakeFilesystem, run_sweeper: RunSweeper
) -> None:
    """2.5 MiB free, a copy of 2 MiB: on ext4 the copy does not fit with its 1 MiB headroom
    and nothing is written; on XFS it shares the weights, needs room only for its few unshared
    blocks, and the source is deleted."""
    for kind in ("ext4", "xfs"):
        disk = make_filesystem(kind)
        saved = save_wide(disk / "e1.pt")
        fill(disk, 5 * MIB // 2)
        assert weight_bytes(saved) + MIB > 5 * MIB // 2
        if kind == "xfs":
            assert 2 * MIB < free_bytes(disk) <= 5 * MIB // 2

        run = run_sweeper("extract", disk / "e1.pt", "--delete-original", "--json")

        if kind == "ext4":
            assert run.returncode == 1 and "disk full" in run.stderr, run.stderr
            assert (disk / "e1.pt").exists() and temp_files(disk) == []
            continue
        assert run.returncode == 0, run.stderr
        assert not (disk / "e1.pt").exists()
        assert run.json()["bytes_shared"] > 0.95 * weight_bytes(saved)
        assert_loads(disk / "e1_inference.pt", saved)


def test_on_xfs_a_sweep_reclaims_what_it_planned_and_the_ledger_says_what_is_shared(
    make_filesystem: MakeFilesystem, run_sweeper: RunSweeper, tmp_path: Path
) -> None:
    """``reclaimed`` counts apparent sizes, so the dry run's figure is exact here too; the
    ledger's ``bytes_shared`` says how much of each copy took no space: the disk gained the
    reclaimed bytes plus what the copies of kept checkpoints share with them."""
    disk = make_filesystem("xfs")
    run = disk / "run"
    run.mkdir()
    for epoch in (1, 2, 3):
        saved = save_wide(run / f"epoch{epoch}.pt", seed=epoch)
        set_mtime(run / f"epoch{epoch}.pt", (1_700_000_000 + epoch * 3600) * 10**9)
    ledger = tmp_path / "state" / "ledger.jsonl"
    args = ["sweep", disk, "--ledger", ledger, "min_age_seconds=0", "keep_full=1", "--json"]
    plan = run_sweeper(*args[:-1], "--dry-run", "--json").json()
    used = used_bytes(disk)

    result = run_sweeper(*args)

    assert result.returncode == 0, result.stderr
    summary = result.json()
    assert summary["counts"]["delete"] == 2 and summary["counts"]["extract"] == 1
    assert summary["reclaimed_bytes"] == plan["expected_reclaimed_bytes"]
    records = ledger_lines(ledger)
    assert outcome_total(records) == summary["reclaimed_bytes"]
    copies = [r for r in records if r["action"] == "extract"]
    assert len(copies) == 3
    assert all(0.95 * weight_bytes(saved) < r["bytes_shared"] for r in copies)
    kept = next(r["bytes_shared"] for r in copies if r["path"].endswith("epoch3.pt"))
    gained = used - used_bytes(disk)
    assert abs(gained - (summary["reclaimed_bytes"] + kept)) < 512 * 1024, (gained, kept)


@pytest.mark.parametrize("failure", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("at_call", [1, 2])
def test_a_clone_that_fails_leaves_no_copy_and_the_source_untouched(
    make_filesystem: MakeFilesystem,
    monkeypatch: pytest.MonkeyPatch,
    failure: int,
    at_call: int,
) -> None:
    disk = make_filesystem("xfs")
    save_wide(disk / "e1.pt")
    before = folder_state(disk)
    fail_clone(monkeypatch, at_call, failure)

    with pytest.raises(FileRefused) as refused:
        extract_here(disk)

    assert ("disk full" if failure == errno.ENOSPC else "write failed") in refused.value.reason
    assert folder_state(disk) == before


def test_a_clone_the_filesystem_refuses_midway_falls_back_to_copying(
    make_filesystem: MakeFilesystem, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = make_filesystem("xfs")
    saved = save_wide(disk / "e1.pt")
    fail_clone(monkeypatch, 2, errno.EOPNOTSUPP)

    result = extract_here(disk)

    assert 0.45 * weight_bytes(saved) < result.bytes_shared < 0.55 * weight_bytes(saved)
    assert_loads(disk / "e1_inference.pt", saved)


def fail_clone(monkeypatch: pytest.MonkeyPatch, at_call: int, failure: int) -> None:
    calls = [0]
    real = fcntl.ioctl

    def ioctl(fd: int, request: int, *args: Any) -> Any:
        if request == extents._FICLONERANGE:
            calls[0] += 1
            if calls[0] == at_call:
                raise OSError(failure, os.strerror(failure))
        return real(fd, request, *args)

    monkeypatch.setattr(fcntl, "ioctl", ioctl)


def extract_here(disk: Path) -> Any:
    folder = os.open(disk, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return extract(
            Located(folder, "e1.pt", str(disk / "e1.pt")),
            Located(folder, "e1_inference.pt", str(disk / "e1_inference.pt")),
            Mode.INFERENCE,
        )
    finally:
        os.close(folder)


def test_the_layout_puts_each_large_record_at_the_sources_offset_modulo_4_kib(
    tmp_path: Path,
) -> None:
    """Where torch put every record's data is known from the directory alone; the copy's large
    records sit at the same offset modulo 4 KiB, the small ones at 64 bytes; both load."""
    source = tmp_path / "a-long-checkpoint-name-for-the-prefix.pt"
    save_wide(source)
    fd = os.open(source, os.O_RDONLY)
    try:
        checkpoint = torchzip.open_checkpoint(fd, str(source))
        archive = checkpoint.archive
        for record in archive.records.values():
            actual = record_data_offset(fd, archive, record, str(source))
            assert _torch_data_offset(record, archive.prefix) == actual, record.name
        plan = torchzip.plan_output(checkpoint, Mode.INFERENCE)
    finally:
        os.close(fd)
    copy = tmp_path / "copy.pt"
    extract_here_to(source, copy)
    copy_fd = os.open(copy, os.O_RDONLY)
    try:
        made = torchzip.read_archive(copy_fd, str(copy))
        large = 0
        for entry in plan.entries:
            at = record_data_offset(copy_fd, made, made.records[entry.name], str(copy))
            if entry.source_data_offset is None:
                assert at % 64 == 0, entry.name
            else:
                large += 1
                assert at % 4096 == entry.source_data_offset % 4096, entry.name
    finally:
        os.close(copy_fd)
    assert large == 2  # the two weight matrices; biases and the LayerNorm are small


def test_the_planned_size_holds_with_records_at_the_sources_offsets_past_4_gib() -> None:
    """Padding of up to 4 KiB per record, zip64 fields past 4 GiB: the size promised before
    writing is still exactly what is written, and each record lands where it was asked to."""
    entries = [torchzip.OutputEntry("data.pkl", 64, 0, b"x" * 64, None)]
    sizes = [2**20, 2**32 - 300, 5 * 2**20, 2**32 + 7, 3 * 2**20]
    for number, size in enumerate(sizes):
        wanted = 64 * (number * 977 + 13)  # 64-aligned, as torch's are
        entries.append(torchzip.OutputEntry(f"data/{number}", size, 0, None, None, wanted))

    placed, planned = _layout(entries)

    body = 0
    for entry, (offset, header, descriptor) in zip(entries, placed, strict=True):
        assert offset == body
        if entry.source_data_offset is not None:
            assert (offset + len(header)) % 4096 == entry.source_data_offset % 4096
        body += len(header) + entry.size + len(descriptor)
    assert planned == body + len(torchzip._central_directory(tuple(entries), placed, body))


def extract_here_to(source: Path, copy: Path) -> Any:
    folder = os.open(source.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return extract(
            Located(folder, source.name, str(source)),
            Located(folder, copy.name, str(copy)),
            Mode.INFERENCE,
        )
    finally:
        os.close(folder)


def test_a_copy_laid_out_before_sharing_still_verifies(tmp_path: Path) -> None:
    """Copies written before issue 14 packed every record at 64 bytes: they stay proofs."""
    source = tmp_path / "e1.pt"
    save_wide(source)
    fd = os.open(source, os.O_RDONLY)
    out = os.open(tmp_path / "old.pt", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        checkpoint = torchzip.open_checkpoint(fd, str(source))
        plan = torchzip.plan_output(checkpoint, Mode.INFERENCE)
        entries = tuple(replace(entry, source_data_offset=None) for entry in plan.entries)
        packed = torchzip.OutputPlan(entries, _layout(list(entries))[1], plan.source_keys)
        assert packed.total_size < plan.total_size
        torchzip.write_output(fd, checkpoint, packed, out)
        torchzip.verify_output(out, plan, checkpoint, Mode.INFERENCE, "old.pt")
    finally:
        os.close(out)
        os.close(fd)


class Narrow(torch.nn.Module):
    """One 64 KiB weight matrix: the smallest record whose blocks are shared."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(128, 128)


def test_on_xfs_every_filesystem_call_of_a_demotion_can_fail_or_be_killed(
    make_filesystem: MakeFilesystem, run_sweeper: RunSweeper
) -> None:
    """The fault matrix of ``test_faults.py`` (tests/fault_driver.py) on a loop XFS, where the
    copies clone their blocks: a kill or EIO at any call that writes a copy or reads it back --
    the clones (``fcntl.ioctl``) and the read-back from the disk included -- leaves every
    checkpoint or its loadable copy, a ledger that adds up, and a tree the next run finishes."""
    disk = make_filesystem("xfs", 1024 * MIB)
    template = disk / "template"
    run = template / "root" / "run"
    run.mkdir(parents=True)
    (template / "state").mkdir()
    saved = {}
    for epoch in (1, 2):
        torch.manual_seed(epoch)
        name = f"epoch{epoch}.pt"
        saved[name] = save_full_checkpoint(run / name, epoch=epoch, model=Narrow())
        set_mtime(run / name, (1_700_000_000 + epoch * 3600) * 10**9)
    args = ["sweep", "{root}", "--ledger", "{ledger}", "min_age_seconds=0", "keep_full=1", "--json"]
    clean = disk / "clean"
    shutil.copytree(template, clean)
    done = run_sweeper(*(a.format(root=clean / "root", ledger=clean / "state" / "l") for a in args))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["counts"] == {
        "extract": 1, "delete": 1, "refresh": 0, "keep": 0, "skip": 0
    }  # fmt: skip
    reference = set(os.listdir(clean / "root" / "run"))
    assert reference == {"epoch1_inference.pt", "epoch2.pt", "epoch2_inference.pt"}
    shared = ledger_lines(clean / "state" / "l")
    assert all(r["bytes_shared"] >= 60 * 1024 for r in shared if r["action"] == "extract")

    modes = ["kill", "EIO"]  # EIO strikes every call ENOSPC does (and the reads), alike
    # The calls that write a copy and read it back (test_faults.py strikes every call of a
    # sweep, on ext4; here that would take minutes).
    only = ["ioctl", "posix_fallocate", "copy_file_range", "pwrite", "fsync", "preadv"]
    points = run_fault_driver(disk, template, modes, args, only)
    for mode in modes:
        assert len([p for p in points if p["mode"] == mode and p["hit"]]) > 20, mode
    start_bytes = _tree_bytes(template / "root")
    for point in points:
        if point["hit"]:
            _check_point(point, saved, start_bytes, 0, reference)
