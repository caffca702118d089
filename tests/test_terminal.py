"""Terminal output for people: a real sweep whose stderr is a terminal (a pty) shows a
progress bar that log lines never share a line with; tables fit the width, in natural order,
grouped by run folder, sweeper's own outputs folded; a dry run ends with totals per owner."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

from conftest import LOG_TIME, REPO_ROOT, run_cli
from trees import save_full

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_a_terminal(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``sweeper ARGS`` with stderr on a pseudo-terminal: (exit status, stdout, the terminal's
    bytes as text)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # 100 columns
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "100"}
    env.pop("JOURNAL_STREAM", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "sweeper", *(os.fspath(a) for a in args)],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
        text=True,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = process.communicate(timeout=300)
    reader.join(timeout=30)
    os.close(master)
    return process.returncode, stdout, b"".join(chunks).decode(errors="replace")


def test_a_progress_bar_on_a_terminal_never_shares_a_line_with_a_log_line(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    for run in range(6):
        folder = root / f"run{run}"
        folder.mkdir(parents=True)
        for epoch in range(1, 6):
            save_full(folder / f"epoch_{epoch}.pt", epoch=epoch, mtime_ns=10**18 + epoch)

    status, stdout, terminal = run_on_a_terminal(
        "sweep", root, "min_age_seconds=0", "--ledger", tmp_path / "ledger.jsonl"
    )

    assert status == 0, terminal
    assert "sweeping" in terminal and "files" in terminal  # the bar was drawn
    lines = [_ANSI.sub("", line) for line in terminal.replace("\r\n", "\n").split("\n")]
    logged = [line for line in lines if "INFO sweeper" in line]
    assert len(logged) >= 30, terminal  # a copy and a deletion per demoted file
    for line in logged:
        # What the terminal shows of the line: whatever follows its last carriage return.
        shown = line.rsplit("\r", 1)[-1]
        assert LOG_TIME.match(shown), repr(line)
        assert "sweeping" not in shown and "files/s" not in shown, repr(line)
    assert "swept:" in stdout  # the results stay on stdout

    quiet = run_on_a_terminal("sweep", root, "--dry-run", "-q", "--ledger", tmp_path / "l.jsonl")
    assert quiet[0] == 0 and _ANSI.sub("", quiet[2]).strip() == ""


def test_without_a_terminal_there_is_no_bar(tmp_path: Path) -> None:
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    for epoch in (1, 2, 3):
        save_full(run / f"epoch_{epoch}.pt", epoch=epoch, mtime_ns=10**18 + epoch)
    done = run_cli("sweep", tmp_path / "root", "min_age_seconds=0", "--ledger", tmp_path / "l")
    assert done.returncode == 0
    assert "\r" not in done.stderr and "files/s" not in done.stderr
    assert all(line.startswith("INFO sweeper") for line in done.stderr_lines), done.stderr
