"""Disk pressure: free-space watermarks per filesystem, and the harder pace they call for.

A filesystem enters pressure when its free space falls below ``pressure.free_below`` and leaves
it once free space is back at ``pressure.free_target`` (hysteresis: a disk hovering at one line
does not flap).  Under pressure a sweep plans with ``keep_full`` lowered to
``pressure.keep_full`` (never below 1) and ``min_age_seconds`` lowered to ``settle_seconds``;
every other rule (rolling names, pins, open files, the newest checkpoint of a run) stays.

Everything here is pure except :func:`measure`, the one ``statvfs`` call.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from sweeper.policy import Rules

__all__ = [
    "PressureRules",
    "Space",
    "Watermark",
    "bytes_needed",
    "measure",
    "measure_roots",
    "mount_point",
    "parse_watermark",
    "pressured_rules",
    "under_pressure",
]

_GLOB_CHARACTERS = frozenset("*?[")
_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_WATERMARK = re.compile(
    r"^\s*(?:(?P<percent>\d+(?:\.\d+)?)\s*%|(?P<count>\d+)\s*(?P<unit>[A-Za-z]*))\s*$"
)


@dataclass(frozen=True, slots=True)
class Watermark:
    """An amount of free space: a share of the filesystem's size (``percent``) or ``bytes``."""

    text: str  # as configured, for messages
    percent: float | None = None
    bytes: int | None = None

    def bytes_of(self, total_bytes: int) -> int:
        """The watermark on a filesystem of ``total_bytes``, in bytes (rounded up)."""
        if self.percent is not None:
            return math.ceil(total_bytes * self.percent / 100)
        assert self.bytes is not None
        return self.bytes


def parse_watermark(text: str) -> Watermark:
    """``10%``, ``12.5%``, ``5368709120`` or ``5GiB`` (binary units: B, KiB, MiB, GiB, TiB).

    Raises ValueError saying what is wrong."""
    match = _WATERMARK.match(text)
    if match is None:
        raise ValueError(f"{text!r} is neither a percentage (10%) nor bytes (5GiB)")
    if match["percent"] is not None:
        percent = float(match["percent"])
        if not 0 < percent < 100:
            raise ValueError(f"{text!r} is not between 0% and 100%")
        return Watermark(text.strip(), percent=percent)
    unit = match["unit"]
    if unit not in _UNITS:
        raise ValueError(f"{text!r}: unknown unit {unit!r} (B, KiB, MiB, GiB or TiB)")
    count = int(match["count"]) * _UNITS[unit]
    if count <= 0:
        raise ValueError(f"{text!r} is no space at all")
    return Watermark(text.strip(), bytes=count)


@dataclass(frozen=True, slots=True)
class PressureRules:
    """The watermarks and what pressure lowers ``keep_full`` to; validated by sweeper.config."""

    free_below: Watermark = field(default_factory=lambda: parse_watermark("10%"))
    free_target: Watermark = field(default_factory=lambda: parse_watermark("15%"))
    keep_full: int = 1

    def __post_init__(self) -> None:
        if self.keep_full < 1:
            raise ValueError("pressure.keep_full must be at least 1")

    def target_bytes(self, total_bytes: int) -> int:
        """The free space that ends pressure: never below the line that starts it."""
        return max(self.free_target.bytes_of(total_bytes), self.free_below.bytes_of(total_bytes))


@dataclass(frozen=True, slots=True)
class Space:
    """One filesystem's free space at one moment (``free_bytes``: what unprivileged users may
    still write, statvfs's f_bavail)."""

    filesystem: str  # its mount point: the metrics' label and the messages' name
    dev: int
    free_bytes: int
    total_bytes: int


def under_pressure(space: Space, rules: PressureRules, *, active: bool) -> bool:
    """Whether ``space``'s filesystem is under pressure now, given whether it was (``active``):
    it enters below ``free_below`` and leaves at ``free_target``."""
    if space.total_bytes <= 0:
        return False  # a filesystem that reports no size (some pseudo and FUSE ones)
    if active:
        return space.free_bytes < rules.target_bytes(space.total_bytes)
    return space.free_bytes < rules.free_below.bytes_of(space.total_bytes)


def bytes_needed(space: Space, rules: PressureRules) -> int:
    """How many bytes must be freed on ``space``'s filesystem to reach ``free_target``."""
    return max(0, rules.target_bytes(space.total_bytes) - space.free_bytes)


def pressured_rules(rules: Rules, pressure: PressureRules, settle_seconds: float) -> Rules:
    """``rules`` at the pace of pressure: fewer full checkpoints kept, a shorter minimum age.
    Never looser than ``rules`` where they are already tighter; every other rule unchanged."""
    return dataclasses.replace(
        rules,
        keep_full=min(rules.keep_full, pressure.keep_full),
        min_age_seconds=min(rules.min_age_seconds, math.ceil(settle_seconds)),
    )


def mount_point(path: str) -> str:
    """The mount point of the filesystem ``path`` is on: the highest folder above it on the
    same device."""
    current = os.path.realpath(path)
    dev = os.stat(current).st_dev
    while current != "/":
        parent = os.path.dirname(current)
        if os.stat(parent).st_dev != dev:
            break
        current = parent
    return current


def measure(path: str, *, named: bool = True) -> Space:
    """The free space of the filesystem holding ``path`` (raises OSError); ``named``: with its
    mount point (else ``path`` stands in for it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dev = os.fstat(fd).st_dev
        info = os.fstatvfs(fd)
    finally:
        os.close(fd)
    return Space(
        filesystem=mount_point(path) if named else path,
        dev=dev,
        free_bytes=info.f_bavail * info.f_frsize,
        total_bytes=info.f_blocks * info.f_frsize,
    )


def measure_roots(roots: Sequence[str]) -> tuple[Space, ...]:
    """The free space of each filesystem the folders named by ``roots`` (paths or globs) are on,
    one per filesystem; roots that name nothing now, or cannot be measured, are left out."""
    found: dict[int, Space] = {}
    for root in roots:
        folders = glob.glob(root) if _GLOB_CHARACTERS.intersection(root) else [root]
        for folder in folders:
            try:
                space = measure(folder, named=False)
                if space.dev not in found:  # its mount point is looked for once
                    found[space.dev] = dataclasses.replace(space, filesystem=mount_point(folder))
            except OSError:
                continue  # not there (yet), or not a folder: nothing to sweep there either
    return tuple(found.values())
