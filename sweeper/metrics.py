"""Prometheus metrics in node_exporter's textfile-collector format.

:func:`render` turns sweeper's figures into the text exposition format (names by Prometheus's
conventions, base units: bytes and seconds; labels name configured roots, actions and kinds,
never a file); :func:`write_metrics` puts the text in place atomically, mode 0644, so the
collector never reads half a file and can read it whatever the writer's umask.  The counters
come from the ledger (:mod:`sweeper.counters`), so they survive restarts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sweeper.atomic import write_atomically
from sweeper.counters import Totals

if TYPE_CHECKING:
    from sweeper.execute import Outcome
    from sweeper.plan import PlanEntry

__all__ = ["Snapshot", "reclaimable_left", "render", "write_metrics"]

_MODE = 0o644


@dataclass(frozen=True)
class Snapshot:
    """Everything one metrics file says."""

    totals: Totals
    version: str
    reclaimable: Mapping[str, int] | None = None  # root -> bytes the last plan would reclaim
    last_sweep: float | None = None  # Unix seconds, when the last sweep (or full scan) ended
    last_sweep_seconds: float | None = None
    queue_length: int | None = None  # the daemon's; None for a one-shot sweep
    errors: Mapping[str, int] = field(default_factory=dict)  # kind -> count, besides "action"
    # (mount point, free bytes, under disk pressure) per filesystem the roots are on
    filesystems: Sequence[tuple[str, int, bool]] | None = None


def reclaimable_left(
    roots: Iterable[str], entries: Iterable[PlanEntry], outcomes: Iterable[Outcome] = ()
) -> dict[str, int]:
    """Per configured root, what a plan would reclaim less what carrying it out did."""
    left = dict.fromkeys(roots, 0)
    for entry in entries:
        left[entry.root] = left.get(entry.root, 0) + entry.reclaimed_bytes
    for outcome in outcomes:
        if outcome.ok:
            root = outcome.entry.root
            left[root] = left.get(root, 0) - outcome.entry.reclaimed_bytes
    return left


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Mapping[str, str]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in pairs.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: list[tuple[Mapping[str, str], float]],
    ) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]


def render(snapshot: Snapshot) -> str:
    totals = snapshot.totals
    text = _Text()
    text.family(
        "sweeper_reclaimed_bytes_total",
        # Net bytes dip while a copy is written before its checkpoint goes: not a counter.
        "gauge",
        "Bytes reclaimed (deleted minus written), per configured root, as the ledger counts "
        "them; dips while copies are written ahead of deletions.",
        [({"root": root}, value) for root, value in sorted(totals.reclaimed_by_root.items())],
    )
    text.family(
        "sweeper_written_bytes_total",
        "counter",
        "Bytes of inference copies written.",
        [({}, totals.written_bytes)],
    )
    text.family(
        "sweeper_deleted_bytes_total",
        "counter",
        "Bytes of checkpoints (and stale copies and temporary files) deleted.",
        [({}, totals.deleted_bytes)],
    )
    text.family(
        "sweeper_files_total",
        "counter",
        "Files acted on, by action and result (compacted: the ledger's compacted records).",
        [
            ({"action": action, "result": result}, count)
            for (action, result), count in sorted(totals.files.items())
        ],
    )
    errors = {"action": totals.failures, **snapshot.errors}
    text.family(
        "sweeper_errors_total",
        "counter",
        "Errors by kind: action (a file's action failed, from the ledger), ledger (the ledger "
        "stopped taking records), scan (a folder or root could not be scanned).",
        [({"kind": kind}, count) for kind, count in sorted(errors.items())],
    )
    if snapshot.reclaimable is not None:
        text.family(
            "sweeper_reclaimable_bytes",
            "gauge",
            "Bytes the last plan would still reclaim, per configured root.",
            [({"root": root}, value) for root, value in sorted(snapshot.reclaimable.items())],
        )
    if snapshot.last_sweep is not None:
        text.family(
            "sweeper_last_sweep_timestamp_seconds",
            "gauge",
            "When the last sweep (or the daemon's last full scan) finished, in Unix time.",
            [({}, snapshot.last_sweep)],
        )
    if snapshot.last_sweep_seconds is not None:
        text.family(
            "sweeper_last_sweep_duration_seconds",
            "gauge",
            "How long the last sweep (or the daemon's last full scan) took.",
            [({}, snapshot.last_sweep_seconds)],
        )
    if snapshot.queue_length is not None:
        text.family(
            "sweeper_queue_length",
            "gauge",
            "Folders (or full scans) waiting in the daemon's work queue.",
            [({}, snapshot.queue_length)],
        )
    if snapshot.filesystems is not None:
        text.family(
            "sweeper_pressure_active",
            "gauge",
            "1 while the filesystem is under disk pressure (free space fell below "
            "pressure.free_below and is not yet back at pressure.free_target), else 0.",
            [({"filesystem": name}, int(active)) for name, _, active in snapshot.filesystems],
        )
        text.family(
            "sweeper_free_bytes",
            "gauge",
            "Bytes free to unprivileged users on the filesystem, when last measured.",
            [({"filesystem": name}, free) for name, free, _ in snapshot.filesystems],
        )
    text.family(
        "sweeper_build_info",
        "gauge",
        "Always 1; the version label says which sweeper wrote these metrics.",
        [({"version": snapshot.version}, 1)],
    )
    return "\n".join(text.lines) + "\n"


def write_metrics(path: str | os.PathLike[str], snapshot: Snapshot) -> None:
    """Replace the textfile at ``path`` (temporary file in the same folder, renamed, 0644)."""
    write_atomically(path, render(snapshot).encode("utf-8"), _MODE)
