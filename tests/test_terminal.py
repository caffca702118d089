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


def test_tables_are_grouped_by_run_folder_in_natural_order_with_own_outputs_folded(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    for run in ("run_10", "run_2"):
        folder = root / run
        folder.mkdir(parents=True)
        for epoch in (1, 2, 10, 11):
            save_full(folder / f"epoch_{epoch}.pt", epoch=epoch, mtime_ns=10**18 + epoch)
    ledger = tmp_path / "ledger.jsonl"
    swept = run_cli("sweep", root, "min_age_seconds=0", "--ledger", ledger)
    assert swept.returncode == 0, swept.stderr
    lines = swept.stdout.splitlines()
    assert lines[0].split() == ["RESULT", "RECLAIMED", "FILE", "DETAIL"]
    folders = [line for line in lines if line.endswith("/")]
    assert folders == [f"{root}/run_2/", f"{root}/run_10/"]  # natural order: 2 before 10
    run2 = lines[lines.index(folders[0]) + 1 : lines.index(folders[1])]
    epochs = [int(re.findall(r"epoch_(\d+)\.pt", line)[0]) for line in run2]
    assert epochs == sorted(epochs) and 10 in epochs and 2 in epochs

    dry = run_cli("sweep", root, "min_age_seconds=0", "--dry-run", "--ledger", ledger)
    assert dry.returncode == 0, dry.stderr
    # Four inference copies per folder, sweeper's own: one line each, folded.
    folded = [line for line in dry.stdout.splitlines() if "of sweeper's own outputs" in line]
    assert folded == ["  + 4 of sweeper's own outputs (--all lists them)"] * 2
    assert "_inference.pt" not in dry.stdout
    every = run_cli("sweep", root, "min_age_seconds=0", "--dry-run", "--all", "--ledger", ledger)
    assert every.stdout.count("_inference.pt") == 8
    assert "of sweeper's own outputs" not in every.stdout
    # --json is the data, whatever the table shows.
    data = run_cli("sweep", root, "min_age_seconds=0", "--dry-run", "--json", "--ledger", ledger)
    entries = data.json()["entries"]
    assert len(entries) == 2 * 4 + 2 * 2  # every file: copies and the kept full checkpoints


def test_tables_fit_the_terminal_width(tmp_path: Path) -> None:
    run = tmp_path / "root" / ("a_rather_long_folder_name_" * 4) / "run"
    run.mkdir(parents=True)
    for epoch in (1, 2, 3):
        name = f"checkpoint_with_a_very_long_descriptive_name_epoch_{epoch}.pt"
        save_full(run / name, epoch=epoch, mtime_ns=10**18 + epoch)
    args = ["sweep", tmp_path / "root", "min_age_seconds=0", "--dry-run", "--ledger", "/x/l"]

    narrow = run_cli(*args, env={"COLUMNS": "80"})
    wide = run_cli(*args)  # stdout is a pipe: whole paths for whoever reads it

    assert narrow.returncode == 0, narrow.stderr
    table = narrow.stdout.split("\nplan:")[0].splitlines()
    assert all(len(line) <= 80 for line in table), table
    assert any("…" in line for line in table)  # long names shortened in the middle
    assert any(line.rstrip().endswith("_epoch_1.pt") or "epoch_1.pt" in line for line in table)
    assert max(len(line) for line in wide.stdout.splitlines()) > 80
    assert "…" not in wide.stdout


def test_a_dry_run_ends_with_what_each_owner_would_get_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for owner, runs in ((54341, 2), (54342, 1)):
        for index in range(runs):
            folder = root / f"{owner}-{index}"
            folder.mkdir(parents=True)
            for epoch in (1, 2, 3):
                path = folder / f"e{epoch}.pt"
                save_full(path, epoch=epoch, mtime_ns=10**18 + epoch)
                os.chown(path, owner, owner)
            os.chown(folder, owner, owner)

    dry = run_cli("sweep", root, "min_age_seconds=0", "--dry-run", "--ledger", "/x/l")
    data = run_cli("sweep", root, "min_age_seconds=0", "--dry-run", "--json", "--ledger", "/x/l")

    lines = dry.stdout.splitlines()
    at = lines.index("what each owner would get back:")
    owners = {line.split()[0]: line.split()[1] for line in lines[at + 2 :]}
    assert owners == {"54341": "6", "54342": "3"}  # files acted on; no passwd entry: the uid
    # the bytes are the plan's own, per owner
    entries = data.json()["entries"]
    total = sum(e["reclaimed_bytes"] for e in entries)
    assert f"({total} bytes)" in dry.stdout
