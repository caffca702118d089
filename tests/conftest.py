"""Shared fixtures: the real CLI as a subprocess, and a folder holding one full checkpoint."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# What starts every log line when stderr is not the journal (test_logs.py checks it is there).
LOG_TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", re.MULTILINE)


def untimed(text: str) -> str:
    """Log output without its timestamps, so that tests can compare the lines themselves."""
    return LOG_TIME.sub("", text)


@dataclass(frozen=True)
class CliRun:
    """One finished ``python -m sweeper`` process."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return self.stderr.splitlines()

    def json(self) -> Any:
        """The one JSON object that is the whole of stdout."""
        lines = self.stdout.splitlines()
        assert len(lines) == 1, self.stdout
        return json.loads(lines[0])


def run_cli(
    *args: str | os.PathLike[str],
    cwd: Path | None = None,
    timeout: float = 60,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> CliRun:
    """Run ``sweeper ARGS`` as a real process; ``prefix`` runs it through e.g. setpriv and
    ``env`` adds variables to the inherited environment."""
    command = [*prefix, sys.executable, "-m", "sweeper", *(os.fspath(arg) for arg in args)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    env.pop("JOURNAL_STREAM", None)
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return CliRun(done.returncode, done.stdout, untimed(done.stderr))


_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True)\n"
    "sys.stderr.buffer.write(done.stderr)\n"
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def peak_rss_kib(*args: str | os.PathLike[str], timeout: float = 300) -> tuple[int, int, str]:
    """Run ``sweeper ARGS`` and return (exit status, peak RSS in KiB, stderr).  The peak is the
    largest of the command and its workers, measured from a small parent of its own: the kernel
    carries a process's high-water mark across fork and exec, so measured from here it could
    never read below this test process's own."""
    command = [sys.executable, "-m", "sweeper", *(os.fspath(arg) for arg in args)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("JOURNAL_STREAM", None)
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    status, peak = done.stdout.split()
    return int(status), int(peak), untimed(done.stderr)


@pytest.fixture
def run_sweeper() -> Callable[..., CliRun]:
    """``run_sweeper("extract", path, "--json")`` runs the CLI and returns a :class:`CliRun`."""
    return run_cli


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    """An empty folder for the checkpoint under test, apart from tmp_path's other files."""
    folder = tmp_path / "run"
    folder.mkdir()
    return folder


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount_tmpfs(size, at=None, options="")`` mounts a tmpfs of ``size`` bytes (and mount
    ``options``) at ``at`` or in tmp_path (root only); unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: int, at: Path | None = None, options: str = "") -> Path:
        mount_point = at if at is not None else tmp_path / f"tmpfs{len(mounted)}"
        mount_point.mkdir(parents=True, exist_ok=True)
        extra = f",{options}" if options else ""
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}{extra}", "tmpfs", str(mount_point)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
        mounted.append(mount_point)
        return mount_point

    try:
        yield mount
    finally:
        for mount_point in mounted:
            subprocess.run(["umount", str(mount_point)], check=True)
