"""The walk every scan, sweep, poll and watch shares: one open per folder, bounded depth and
listing size, nothing left open."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from conftest import CliRun
from trees import save_full

from sweeper.inventory import FolderRef, WalkLimits, expand_root, locate_folder, walk_folders


def top_of(folder: Path) -> FolderRef:
    (top,) = expand_root(str(folder))
    return top


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_walk_stops_at_max_depth_and_at_max_entries_and_says_where(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c" / "d").mkdir(parents=True)
    (tmp_path / "a" / "wide").mkdir()
    for index in range(5):
        (tmp_path / "a" / "wide" / f"f{index}").write_bytes(b"")
    (tmp_path / "a" / "wide" / "below").mkdir()
    capped: list[tuple[str, str]] = []
    problems: list[tuple[str, str]] = []
    before = open_descriptors()

    walked = [
        folder.display
        for folder, _ in walk_folders(
            top_of(tmp_path),
            problems,
            WalkLimits(max_depth=2, max_entries=5),
            capped=lambda path, reason: capped.append((path, reason)),
        )
    ]

    assert walked == [str(tmp_path), f"{tmp_path}/a", f"{tmp_path}/a/b"]
    assert capped == [
        (
            f"{tmp_path}/a/b/c",
            f"more than 2 folders below {tmp_path} (max_depth); "
            "neither it nor any folder as deep there is walked",
        ),
        (f"{tmp_path}/a/wide", "holds more than 5 entries (max_folder_entries); not walked"),
    ]
    assert problems == []
    assert open_descriptors() == before


def test_a_walk_left_early_closes_what_it_held_open(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    before = open_descriptors()
    walk = walk_folders(top_of(tmp_path), [])
    for folder, _ in walk:
        if folder.display.endswith("/b"):
            break
    assert open_descriptors() > before  # the path down to b is held open
    walk.close()
    assert open_descriptors() == before


def test_a_sweep_leaves_folders_past_max_depth_alone(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """The one-shot sweep walks as the daemon does: max_depth from the config applies."""
    deep = tmp_path / "root" / "a" / "b"
    deep.mkdir(parents=True)
    save_full(tmp_path / "root" / "a" / "epoch1.pt", epoch=1)
    save_full(deep / "epoch1.pt", epoch=1)
    ledger = tmp_path / "ledger.jsonl"

    done = run_sweeper("sweep", tmp_path / "root", "--ledger", ledger, "max_depth=1")

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "root" / "a" / "epoch1_inference.pt").exists()
    assert not (deep / "epoch1_inference.pt").exists()
    assert f"{deep}: more than 1 folders below {tmp_path / 'root'} (max_depth)" in done.stderr


def test_a_folder_below_nested_roots_belongs_to_the_inner_one(tmp_path: Path) -> None:
    """A full scan walks a root inside another as its own root; an event's folder is located
    the same way, whatever the order the roots are listed in."""
    (tmp_path / "outer" / "inner" / "run").mkdir(parents=True)
    outer, inner = str(tmp_path / "outer"), str(tmp_path / "outer" / "inner")
    run = str(tmp_path / "outer" / "inner" / "run")
    for roots in ([outer, inner], [inner, outer]):
        located = locate_folder(roots, run)
        assert located is not None
        assert located[0] == inner
        assert located[1].display == run
    assert locate_folder([outer, inner], outer) is not None
    assert locate_folder([outer, inner], outer)[0] == outer  # type: ignore[index]
