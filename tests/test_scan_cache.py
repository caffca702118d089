"""The daemon's scan cache: unchanged files are not parsed again; any change is seen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from checkpoints import save_full_checkpoint

from sweeper import torchzip
from sweeper.inventory import ScanCache, scan
from sweeper.policy import CopyStatus


def epochs(root: Path, cache: ScanCache) -> dict[str, int | None]:
    inventory = scan([str(root)], ["*.pt"], cache=cache)
    return {f.name: f.epoch for run in inventory.runs for f in run.files}


def test_unchanged_files_are_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_full_checkpoint(run / "a.pt", epoch=1)
    save_full_checkpoint(run / "b.pt", epoch=2)
    cache = ScanCache()
    assert epochs(tmp_path, cache) == {"a.pt": 1, "b.pt": 2}

    parsed: list[str] = []
    real = torchzip.open_checkpoint

    def counting(fd: int, path: str) -> torchzip.Checkpoint:
        parsed.append(os.path.basename(path))
        return real(fd, path)

    monkeypatch.setattr(torchzip, "open_checkpoint", counting)
    assert epochs(tmp_path, cache) == {"a.pt": 1, "b.pt": 2}
    assert parsed == []

    # Rewritten in place with another epoch (same name): the new content is read.
    save_full_checkpoint(run / "a.pt", epoch=7)
    assert epochs(tmp_path, cache) == {"a.pt": 7, "b.pt": 2}
    assert parsed == ["a.pt"]


def test_an_inference_copy_appearing_changes_the_answer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_full_checkpoint(run / "a.pt", epoch=1)
    cache = ScanCache()
    first = scan([str(tmp_path)], ["*.pt"], cache=cache).runs[0].files[0]
    assert first.copy is not None and first.copy.status is CopyStatus.NONE
    (run / "a_inference.pt").write_bytes(b"not this checkpoint's copy")
    files = {f.name: f for f in scan([str(tmp_path)], ["*.pt"], cache=cache).runs[0].files}
    copy = files["a.pt"].copy
    assert copy is not None and copy.status is CopyStatus.FOREIGN
