"""The exceptions sweeper raises; the CLI maps them to exit codes in one place."""

from __future__ import annotations

import os


class SweeperError(Exception):
    """Base of every error sweeper reports to a user as one line."""


class ConfigError(SweeperError):
    """The configuration is invalid; names the offending key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"config key {key!r}: {reason}")
        self.key = key
        self.reason = reason


class FileRefused(SweeperError):
    """A file cannot be used (not a checkpoint, corrupt, unsafe): nothing written or deleted."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class UnsafePickle(FileRefused):
    """The checkpoint's pickle references a global outside sweeper's allowlist."""

    def __init__(self, path: str | os.PathLike[str], global_name: str) -> None:
        super().__init__(path, f"refused: pickle references disallowed global {global_name!r}")
        self.global_name = global_name


class NotConfirmed(FileRefused):
    """A verified copy was put in place but its folder's fsync failed, and taking it back failed
    too: it exists without its durability confirmed (start-up reconciliation confirms it)."""


class LedgerUnavailable(SweeperError):
    """The ledger cannot take a record: no action may be taken, since none could be recorded."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"ledger {os.fspath(path)}: {reason}; no action taken")
        self.path = os.fspath(path)
        self.reason = reason


class AlreadyRunning(SweeperError):
    """Another sweeper instance holds the state lock."""


class UsageError(SweeperError):
    """The command was asked for something that cannot be (a missing file it reads): exit 2."""


class NotRunning(SweeperError):
    """``sweeper status`` found no daemon running: exit 3, as ``systemctl is-active`` does."""
