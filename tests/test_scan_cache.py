"""The daemon's scan cache: unchanged files are not parsed again; any change is seen."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from checkpoints import save_full_checkpoint

from sweeper.inventory import FileReader, ScanCache, scan
from sweeper.policy import CopyStatus
from sweeper.workers import READER_MEMORY_LIMIT


class CountingReader(FileReader):
    """The daemon's reader (a real worker process), noting each file it is asked to read."""

    def __init__(self) -> None:
        super().__init__(READER_MEMORY_LIMIT)
        self.parsed: list[str] = []

    def __call__(self, fd: int, dir_fd: int, name: str, *rest: Any) -> dict[str, Any]:
        self.parsed.append(name)
        return super().__call__(fd, dir_fd, name, *rest)


@pytest.fixture
def reader() -> Iterator[CountingReader]:
    counting = CountingReader()
    yield counting
    counting.close()


def epochs(root: Path, cache: ScanCache, reader: FileReader) -> dict[str, int | None]:
    inventory = scan([str(root)], ["*.pt"], cache=cache, reader=reader)
    return {f.name: f.epoch for run in inventory.runs for f in run.files}


def test_unchanged_files_are_not_parsed_again(tmp_path: Path, reader: CountingReader) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_full_checkpoint(run / "a.pt", epoch=1)
    save_full_checkpoint(run / "b.pt", epoch=2)
    cache = ScanCache()
    assert epochs(tmp_path, cache, reader) == {"a.pt": 1, "b.pt": 2}
    assert reader.parsed == ["a.pt", "b.pt"]

    reader.parsed.clear()
    assert epochs(tmp_path, cache, reader) == {"a.pt": 1, "b.pt": 2}
    assert reader.parsed == []

    # Rewritten in place with another epoch (same name): the new content is read.
    save_full_checkpoint(run / "a.pt", epoch=7)
    assert epochs(tmp_path, cache, reader) == {"a.pt": 7, "b.pt": 2}
    assert reader.parsed == ["a.pt"]


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
