"""Log lines on stderr: plain, or with syslog priority prefixes when stderr is the journal."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import pytest
from conftest import LOG_TIME, CliRun, untimed
from trees import days_ago, save_full

from sweeper.logs import configure_logging, stderr_is_journal


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    sweeper_logger = logging.getLogger("sweeper")
    handlers, root_level, sweeper_level = root.handlers[:], root.level, sweeper_logger.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(root_level)
    sweeper_logger.setLevel(sweeper_level)


def journal_stream_of(stream: TextIO) -> str:
    status = os.fstat(stream.fileno())
    return f"{status.st_dev}:{status.st_ino}"


def log_one_of_each(name: str = "sweeper.test") -> None:
    logger = logging.getLogger(name)
    logger.debug("debug %d", 1)
    logger.info("info %d", 2)
    logger.warning("warning %d", 3)
    logger.error("error %d", 4)
    logger.critical("critical %d", 5)


def test_stderr_is_journal_matches_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "journal").open("w") as journal, (tmp_path / "other").open("w") as other:
        environ = {"JOURNAL_STREAM": journal_stream_of(journal)}

        assert stderr_is_journal(environ, journal.fileno())
        assert not stderr_is_journal(environ, other.fileno())
        assert not stderr_is_journal({}, journal.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": ""}, journal.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, journal.fileno())


def test_stderr_is_journal_is_false_for_a_closed_fd(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "journal", os.O_WRONLY | os.O_CREAT)
    status = os.fstat(fd)
    os.close(fd)

    assert not stderr_is_journal({"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}, fd)


def test_journal_lines_carry_syslog_priorities(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    with path.open("w") as stream:
        configure_logging(2, stream=stream, environ={"JOURNAL_STREAM": journal_stream_of(stream)})
        log_one_of_each()

    assert path.read_text().splitlines() == [
        "<7>sweeper.test: debug 1",
        "<6>sweeper.test: info 2",
        "<4>sweeper.test: warning 3",
        "<3>sweeper.test: error 4",
        "<2>sweeper.test: critical 5",
    ]


def test_journal_prefixes_every_line_of_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    with path.open("w") as stream:
        configure_logging(0, stream=stream, environ={"JOURNAL_STREAM": journal_stream_of(stream)})
        try:
            raise RuntimeError("disk on fire")
        except RuntimeError:
            logging.getLogger("sweeper.test").exception("sweep failed")

    lines = path.read_text().splitlines()
    assert lines[0] == "<3>sweeper.test: sweep failed"
    assert lines[-1] == "<3>RuntimeError: disk on fire"
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)


def test_journal_over_a_socket_like_journald_uses() -> None:
    journald, service = socket.socketpair()
    with journald, service, service.makefile("w") as stream:
        configure_logging(0, stream=stream, environ={"JOURNAL_STREAM": journal_stream_of(stream)})
        logging.getLogger("sweeper.daemon").warning("%s is not a checkpoint", "/data/x.pt")
        stream.flush()
        journald.settimeout(5)

        assert journald.recv(4096) == b"<4>sweeper.daemon: /data/x.pt is not a checkpoint\n"


def test_plain_lines_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with (tmp_path / "journal").open("w") as journal, path.open("w") as stream:
        # Inherited from a parent whose stderr was the journal; ours is not.
        configure_logging(0, stream=stream, environ={"JOURNAL_STREAM": journal_stream_of(journal)})
        log_one_of_each()

    lines = path.read_text().splitlines()
    assert all(LOG_TIME.match(line) for line in lines), lines  # journald would add them
    assert [untimed(line) for line in lines] == [
        "INFO sweeper.test: info 2",
        "WARNING sweeper.test: warning 3",
        "ERROR sweeper.test: error 4",
        "CRITICAL sweeper.test: critical 5",
    ]


def test_plain_lines_on_a_pipe_without_journal_stream() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd) as reader, os.fdopen(write_fd, "w") as stream:
        configure_logging(-1, stream=stream, environ={})
        log_one_of_each()
        stream.close()

        assert untimed(reader.read()).splitlines() == [
            "WARNING sweeper.test: warning 3",
            "ERROR sweeper.test: error 4",
            "CRITICAL sweeper.test: critical 5",
        ]


def test_verbosity_minus_two_shows_only_errors() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd) as reader, os.fdopen(write_fd, "w") as stream:
        configure_logging(-2, stream=stream, environ={})
        log_one_of_each()
        stream.close()

        assert untimed(reader.read()).splitlines() == [
            "ERROR sweeper.test: error 4",
            "CRITICAL sweeper.test: critical 5",
        ]


def test_verbosity_one_shows_only_sweepers_debug_lines(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        configure_logging(1, stream=stream, environ={})
        logging.getLogger("sweeper.test").debug("ours")
        logging.getLogger("watchdog.observers").debug("theirs")

    assert untimed(path.read_text()) == "DEBUG sweeper.test: ours\n"


def test_configuring_again_replaces_the_handler(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    with first.open("w") as first_stream, second.open("w") as second_stream:
        configure_logging(0, stream=first_stream, environ={})
        configure_logging(0, stream=second_stream, environ={})
        logging.getLogger("sweeper.test").info("once")

    assert first.read_text() == ""
    assert untimed(second.read_text()) == "INFO sweeper.test: once\n"


def test_a_file_name_cannot_forge_a_log_line_or_drive_the_terminal(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """A user names a checkpoint so that its log line would end and a forged ERROR line begin,
    with an ANSI escape: every log line of a real sweep escapes it."""
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    hostile = "e\nERROR sweeper.execute: FORGED LINE \x1b[31mred.pt"
    save_full(run / hostile, epoch=1, mtime_ns=days_ago(1))

    done = run_sweeper("sweep", tmp_path / "root", "--ledger", tmp_path / "ledger.jsonl")

    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr
    assert not any(
        line.startswith("ERROR sweeper.execute: FORGED") for line in done.stderr.splitlines()
    )
    assert "e\\nERROR sweeper.execute: FORGED LINE \\x1b[31mred.pt" in done.stderr
    assert "\x1b" not in done.stdout
