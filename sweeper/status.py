"""The daemon's state file: what ``sweeper watch`` is doing now, for ``sweeper status``.

The daemon rewrites ``<ledger>.status`` (atomically, mode 0644: it names roots and run folders,
never file contents) when its state changes; ``sweeper status`` reads it.  Whether that daemon
still runs is asked of the kernel, not the file: its pid must still be the process that wrote
it (the start time in ``/proc/PID/stat`` tells a reused pid apart), so a daemon killed with
SIGKILL reads as not running.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from sweeper.atomic import write_atomically

__all__ = [
    "STATUS_SUFFIX",
    "DaemonStatus",
    "is_running",
    "process_start_time",
    "read_status",
    "status_path_for",
    "write_status",
]

STATUS_SUFFIX = ".status"
_MODE = 0o644


def status_path_for(ledger_path: str | os.PathLike[str]) -> str:
    return os.fspath(ledger_path) + STATUS_SUFFIX


@dataclass(frozen=True)
class DaemonStatus:
    """One moment of the daemon.  Times are Unix seconds, bytes raw ints.

    ``phase`` is ``catch-up`` (the first sweep of every root), ``watching`` or ``stopped``;
    ``working_on`` names the run folders (or ``every root`` for a full scan) being swept now.
    """

    pid: int
    process_start: int  # /proc/PID/stat's start time, in clock ticks since boot
    started: float
    updated: float
    phase: str
    working_on: tuple[str, ...] = ()
    queued: int = 0
    settling: int = 0
    last_full_scan: float | None = None  # when it finished
    last_full_scan_seconds: float | None = None
    today_files: int = 0
    today_bytes: int = 0
    total_files: int = 0
    total_bytes: int = 0
    failed: int = 0
    last_error: str | None = None
    last_error_time: float | None = None
    polled: tuple[tuple[str, str], ...] = ()  # (root, why it is polled, not watched)
    not_acting: str | None = None  # why no action is taken (the ledger takes no records)
    # (filesystem's mount point, free bytes, total bytes, under disk pressure) per filesystem
    filesystems: tuple[tuple[str, int, int, bool], ...] = ()

    @property
    def pressure(self) -> tuple[str, ...]:
        """The filesystems under disk pressure."""
        return tuple(name for name, _, _, active in self.filesystems if active)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["working_on"] = list(self.working_on)
        data["polled"] = [{"root": root, "why": why} for root, why in self.polled]
        data["filesystems"] = [
            {"filesystem": name, "free_bytes": free, "total_bytes": total, "pressure": active}
            for name, free, total, active in self.filesystems
        ]
        return data

    @classmethod
    def from_json(cls, data: object) -> DaemonStatus:
        """Raises ValueError for anything but a status this version wrote."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        try:
            values["working_on"] = tuple(str(item) for item in values.get("working_on", ()))
            values["polled"] = tuple(
                (str(item["root"]), str(item["why"])) for item in values.get("polled", ())
            )
            values["filesystems"] = tuple(
                (
                    str(item["filesystem"]),
                    int(item["free_bytes"]),
                    int(item["total_bytes"]),
                    item["pressure"] is True,
                )
                for item in values.get("filesystems", ())
            )
            status = cls(**values)
        except (TypeError, KeyError) as error:
            raise ValueError(f"unexpected content ({error})") from None
        for name in ("pid", "process_start", "queued", "settling", "total_files", "total_bytes"):
            if not isinstance(getattr(status, name), int):
                raise ValueError(f"{name} is not a number")
        if not isinstance(status.phase, str):
            raise ValueError("phase is not a string")
        return status


def write_status(ledger_path: str | os.PathLike[str], status: DaemonStatus) -> None:
    data = json.dumps(status.to_json(), ensure_ascii=True, sort_keys=True) + "\n"
    write_atomically(status_path_for(ledger_path), data.encode("ascii"), _MODE)


def read_status(ledger_path: str | os.PathLike[str]) -> DaemonStatus | None:
    """The status the daemon last wrote beside the ledger, or None when there is none.

    Raises OSError when it cannot be read, ValueError when it is not a status."""
    try:
        with open(status_path_for(ledger_path), "rb") as file:
            text = file.read(1 << 20)
    except FileNotFoundError:
        return None
    try:
        return DaemonStatus.from_json(json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not JSON ({error})") from None


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    after = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(after[19])  # field 22, starttime
    except (IndexError, ValueError):
        return None


def is_running(status: DaemonStatus) -> bool:
    """Whether the daemon that wrote ``status`` is still alive (and has not said it stopped)."""
    if status.phase == "stopped":
        return False
    return process_start_time(status.pid) == status.process_start
