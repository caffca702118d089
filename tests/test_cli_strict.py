"""Mistakes on the command line fail loudly: a real ``sweeper`` process per case, and what it
leaves on disk.  Exit 2 and one line naming the mistake (and what was probably meant)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_cli
from trees import save_full, snapshot


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A run folder of three old full checkpoints, in a root ``checkpoints``."""
    run = tmp_path / "checkpoints" / "run"
    run.mkdir(parents=True)
    for epoch in (1, 2, 3):
        save_full(run / f"epoch_{epoch}.pt", epoch=epoch, mtime_ns=10**18 + epoch)
    return tmp_path / "checkpoints"


def test_a_mistyped_key_is_an_error_naming_the_nearest(tree: Path, tmp_path: Path) -> None:
    before = snapshot(tree)
    for word, meant in (
        ("keep-full=3", "keep_full"),
        ("keep_fulll=3", "keep_full"),
        ("min-age-seconds=0", "min_age_seconds"),
        ("keep_inference.lst=2", "keep_inference.last"),
    ):
        done = run_cli("sweep", tree, word, "--ledger", tmp_path / "ledger.jsonl")
        assert done.returncode == 2, done.stderr
        assert done.stdout == ""
        assert len(done.stderr_lines) == 1, done.stderr
        assert f"did you mean '{meant}'" in done.stderr
        assert word.split("=")[0] in done.stderr
    assert snapshot(tree) == before
    assert not (tmp_path / "ledger.jsonl").exists()


def test_a_word_with_an_equals_sign_that_exists_is_a_root(tmp_path: Path) -> None:
    root = tmp_path / "lr=0.1"
    root.mkdir()
    done = run_cli("sweep", "lr=0.1", "--dry-run", "--ledger", tmp_path / "l.jsonl", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no checkpoints found" in done.stdout


@pytest.mark.parametrize("root", ["results/chekpoints", "results/*/chekpoints"])
def test_a_root_given_that_does_not_exist_is_an_error(tmp_path: Path, root: str) -> None:
    (tmp_path / "results" / "checkpoints").mkdir(parents=True)
    done = run_cli("sweep", root, "--dry-run", "--ledger", tmp_path / "l.jsonl", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert len(done.stderr_lines) == 1 and repr(root) in done.stderr
    assert "does not exist" in done.stderr


def test_config_roots_that_match_nothing_stay_a_warning(tree: Path, tmp_path: Path) -> None:
    """Runs appear later: a configured root with nothing there yet is no mistake."""
    config = tmp_path / "config.yaml"
    config.write_text(f"roots: [{tree}, {tmp_path / 'later'}]\n")
    done = run_cli("sweep", "-c", config, "--dry-run", "--ledger", tmp_path / "l.jsonl")
    assert done.returncode == 0, done.stderr
    assert "root matches no folder" in done.stdout


def test_watch_with_nothing_to_watch_exits_2(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    given = run_cli("watch", "/nonexistent/dir", "--ledger", ledger, timeout=30)
    assert given.returncode == 2, given.stderr
    assert "'/nonexistent/dir' does not exist" in given.stderr
    config = tmp_path / "config.yaml"
    config.write_text(f"roots: [{tmp_path / 'a'}, {tmp_path / 'b' / '*'}]\n")
    configured = run_cli("watch", "-c", config, "--ledger", ledger, timeout=30)
    assert configured.returncode == 2, configured.stderr
    assert "nothing to watch" in configured.stderr
    assert len(configured.stderr_lines) == 1


@pytest.mark.parametrize(
    ("args", "usage", "meant"),
    [
        (["sweep", "--dryrun"], "usage: sweeper sweep", "--dry-run"),
        (["ledger", "--by", "day", "--jsn"], "usage: sweeper ledger", "--json"),
        (["inspect", "x.pt", "--verfy"], "usage: sweeper inspect", "--verify"),
        (["watch", "--ledgr=/x"], "usage: sweeper watch", "--ledger"),
    ],
)
def test_a_misspelt_option_shows_its_commands_usage_and_the_nearest(
    args: list[str], usage: str, meant: str
) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(usage), done.stderr
    assert f"(did you mean {meant}?)" in done.stderr


def test_quiet_and_verbose_are_taken_by_every_command(tree: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    ledger.touch()
    for command in (
        ["ledger", "--ledger", ledger],
        ["inspect", tree / "run" / "epoch_1.pt"],
        ["sweep", tree, "--dry-run", "--ledger", ledger],
        ["status", "--ledger", ledger],  # exit 3: no daemon has run
        ["extract", tree / "run" / "epoch_1.pt", "-o", tmp_path / "copy.pt"],
    ):
        for flag in ("-q", "--quiet", "-v", "--verbose"):
            done = run_cli(*command, flag)
            assert done.returncode == (3 if command[0] == "status" else 0), (command, flag)
            (tmp_path / "copy.pt").unlink(missing_ok=True)


def test_quiet_keeps_only_warnings_and_the_results(tree: Path, tmp_path: Path) -> None:
    args = ["sweep", tree, "min_age_seconds=0", "--ledger", tmp_path / "ledger.jsonl"]
    quiet = run_cli(*args, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""  # the sweep wrote copies and deleted one: all INFO, none shown
    assert "swept: 3 done" in quiet.stdout


def test_a_closed_stdout_ends_quietly(tree: Path, tmp_path: Path) -> None:
    """``sweeper sweep --dry-run | head -1``: the reader has gone before anything is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("JOURNAL_STREAM", None)
    try:
        for args in (["--dry-run"], ["--dry-run", "--json"]):
            done = subprocess.run(
                [sys.executable, "-m", "sweeper", "sweep", tree, *args, "--ledger", tmp_path / "l"],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0
            assert done.stderr == ""
        # The outcome stands: a file that cannot be inspected still makes it exit 1, with its
        # one line on stderr and nothing else.
        (tree / "notes.pt").write_text("not a checkpoint")
        done = subprocess.run(
            [sys.executable, "-m", "sweeper", "inspect", tree / "run" / "epoch_1.pt",
             tree / "notes.pt"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=60,
            check=False,
        )  # fmt: skip
        assert done.returncode == 1
        assert len(done.stderr.splitlines()) == 1 and "notes.pt" in done.stderr, done.stderr
    finally:
        os.close(write_end)
