"""Log output for the CLI: lines on stderr, timestamped unless stderr is the journal (which
timestamps them itself).

Only the CLI calls :func:`configure_logging`; every other module just logs to
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

# sd-daemon(3) priority prefixes; journald strips them and files the line at that priority.
_SYSLOG_PRIORITIES = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

# Names the handler configure_logging installs, so that calling it again replaces it.
_HANDLER_NAME = "sweeper.logs"

_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"  # local time, as journalctl shows it
_JOURNAL_FORMAT = "%(name)s: %(message)s"


def stderr_is_journal(environ: Mapping[str, str], fd: int) -> bool:
    """Whether ``fd`` is the stream systemd connected to the journal (see systemd.exec(5)).

    systemd sets ``JOURNAL_STREAM=device:inode`` of that stream. Comparing it with the fd itself
    matters: a child whose stderr was redirected still inherits the variable.
    """
    journal_stream = environ.get("JOURNAL_STREAM")
    if not journal_stream:
        return False
    device, _, inode = journal_stream.partition(":")
    try:
        expected = (int(device), int(inode))
        status = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (status.st_dev, status.st_ino) == expected


def escape_controls(text: str) -> str:
    """``text`` safe for one line of a terminal or the journal: undecodable bytes and control
    characters (a newline, ESC) escaped as ``\\n``, ``\\x1b``...  A file name is chosen by
    whoever made the file, so it must not be able to forge a log line or drive a terminal."""
    try:
        raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        raw = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in raw)


class _EscapingFormatter(logging.Formatter):
    """Escapes the message (which carries file names); a traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class _JournalFormatter(_EscapingFormatter):
    """Prefixes every line with its syslog priority, so a traceback stays at error priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def configure_logging(
    verbosity: int,
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
) -> None:
    """Send log records to ``stream`` (default: ``sys.stderr`` at call time), one line each.

    ``verbosity``: -2 or less shows errors only; -1 warnings and worse; 0 adds info; 1 adds
    sweeper's own debug messages; 2 or more adds every library's debug messages too.
    """
    if stream is None:
        stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    if _stream_is_journal(environ, stream):
        handler.setFormatter(_JournalFormatter(_JOURNAL_FORMAT))
    else:
        handler.setFormatter(_EscapingFormatter(_PLAIN_FORMAT, _TIME_FORMAT))

    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    if verbosity < -1:
        root.setLevel(logging.ERROR)
    elif verbosity < 0:
        root.setLevel(logging.WARNING)
    elif verbosity < 2:
        root.setLevel(logging.INFO)
    else:
        root.setLevel(logging.DEBUG)
    # At -v, sweeper's own debug lines without the libraries' (watchdog's are many).
    logging.getLogger("sweeper").setLevel(logging.DEBUG if verbosity == 1 else logging.NOTSET)


def _stream_is_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        # io.StringIO and friends raise io.UnsupportedOperation, an OSError and ValueError.
        return False
    return stderr_is_journal(environ, fd)


def _syslog_priority(levelno: int) -> int:
    """The priority of the nearest standard level at or below ``levelno``; custom levels fit in."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _SYSLOG_PRIORITIES[level]
    return _SYSLOG_PRIORITIES[logging.DEBUG]
