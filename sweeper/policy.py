"""Retention: a pure function from one run folder's checkpoints to a decision for each.

No I/O and no clock: ``now_ns`` is passed in.  Every decision carries its reason in words.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Action(enum.Enum):
    EXTRACT = "extract"  # write the inference copy; the full checkpoint stays
    DELETE = "delete"  # demote: make sure the inference copy exists and verifies, then delete
    KEEP = "keep"  # nothing to do
    SKIP = "skip"  # not a usable full checkpoint; reported, never touched


class Status(enum.Enum):
    FULL = "full"  # complete, intact full training checkpoint
    INFERENCE = "inference"  # content is already an inference checkpoint
    WEIGHTS = "weights"  # content is bare weights
    OWN_OUTPUT = "own-output"  # named like sweeper's outputs (*_inference.*, *_weights.*)
    SYMLINK = "symlink"
    WRITING = "writing"  # a process holds it open for writing
    UNUSABLE = "unusable"  # truncated, corrupt, unsafe, unreadable, not a checkpoint


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    status: Status
    size: int
    mtime_ns: int
    epoch: int | None = None
    step: int | None = None
    problem: str | None = None
    nlink: int = 1
    pinned: str | None = None
    copy_exists: bool = False
    copy_matches: bool = False
    copy_name: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    name: str
    action: Action
    reason: str
    extract_first: bool = False  # DELETE only: the copy is written (and verified) first


def _newest_first_key(candidate: Candidate) -> tuple[int, int, int]:
    """Epoch, then step, as stored in the file; mtime only breaks ties; names never decide."""
    epoch = candidate.epoch if candidate.epoch is not None else -1
    step = candidate.step if candidate.step is not None else -1
    return (epoch, step, candidate.mtime_ns)


def _describe(candidate: Candidate) -> str:
    if candidate.epoch is not None:
        return f"epoch {candidate.epoch}"
    if candidate.step is not None:
        return f"step {candidate.step}"
    return "no epoch or step stored; ordered by mtime"


_SKIP_REASONS = {
    Status.INFERENCE: "skipped: already an inference checkpoint",
    Status.WEIGHTS: "skipped: already bare weights",
    Status.OWN_OUTPUT: "skipped: sweeper's own output",
    Status.SYMLINK: "skipped: a symlink, never followed",
    Status.WRITING: "skipped: open for writing by a process",
}


def decide(
    candidates: Sequence[Candidate],
    *,
    keep_full: int,
    min_age_seconds: int,
    now_ns: int,
    settle_seconds: float = 0,
) -> tuple[Decision, ...]:
    """Decide every file of one run folder.

    The ``keep_full`` newest intact full checkpoints stay full; every intact full checkpoint gets
    an inference copy; an older one is deleted only once its copy exists and verifies, and never
    when it is the newest, younger than ``min_age_seconds``, pinned (a ``.keep`` file, a flock,
    a symlink pointing at it), hard-linked, or when a different file already holds its copy's
    name.  Anything else (incomplete, corrupt, open for writing, not a full checkpoint) is
    skipped: it neither counts toward ``keep_full`` nor is ever deleted.  The daemon passes
    ``settle_seconds``: a file changed more recently than that is not acted on yet.
    """
    if keep_full < 1:
        raise ValueError("keep_full must be at least 1")
    decisions: dict[str, Decision] = {}
    full = []
    for candidate in candidates:
        if candidate.status is Status.FULL:
            age_s = (now_ns - candidate.mtime_ns) / 1e9
            if age_s < settle_seconds:
                decisions[candidate.name] = Decision(
                    candidate.name,
                    Action.SKIP,
                    f"skipped: changed {age_s:.0f} s ago, not yet quiet for "
                    f"settle_seconds={settle_seconds:g}",
                )
            else:
                full.append(candidate)
        elif candidate.status is Status.UNUSABLE:
            problem = candidate.problem or "unusable"
            decisions[candidate.name] = Decision(candidate.name, Action.SKIP, f"skipped: {problem}")
        else:
            decisions[candidate.name] = Decision(
                candidate.name, Action.SKIP, _SKIP_REASONS[candidate.status]
            )
    full.sort(key=_newest_first_key, reverse=True)
    for rank, candidate in enumerate(full):
        decisions[candidate.name] = _decide_full(
            candidate, rank, keep_full, min_age_seconds, now_ns
        )
    return tuple(decisions[c.name] for c in candidates)


def _decide_full(
    candidate: Candidate, rank: int, keep_full: int, min_age_seconds: int, now_ns: int
) -> Decision:
    what = _describe(candidate)
    if rank < keep_full:
        reason = f"kept: one of the {keep_full} newest intact full checkpoints ({what})"
        if rank == 0:
            reason = f"kept: the newest intact full checkpoint ({what})"
        return _keep_with_copy(candidate, reason)
    age_s = (now_ns - candidate.mtime_ns) / 1e9
    protection = None
    if candidate.pinned:
        protection = candidate.pinned
    elif candidate.nlink > 1:
        protection = f"has {candidate.nlink} hard links"
    elif age_s < min_age_seconds:
        protection = f"modified {age_s:.0f} s ago, younger than min_age_seconds={min_age_seconds}"
    if protection is not None:
        return _keep_with_copy(candidate, f"kept: {protection} ({what})")
    if candidate.copy_exists and not candidate.copy_matches:
        return Decision(
            candidate.name,
            Action.KEEP,
            f"kept: {candidate.copy_name} exists and is not this checkpoint's copy ({what})",
        )
    older = f"demoted: older than the {keep_full} newest intact full checkpoints ({what})"
    if candidate.copy_exists:
        return Decision(candidate.name, Action.DELETE, f"{older}; inference copy present")
    return Decision(
        candidate.name, Action.DELETE, f"{older}; inference copy written first", extract_first=True
    )


def _keep_with_copy(candidate: Candidate, reason: str) -> Decision:
    if not candidate.copy_exists:
        return Decision(candidate.name, Action.EXTRACT, f"{reason}; inference copy to write")
    if candidate.copy_matches:
        return Decision(candidate.name, Action.KEEP, f"{reason}; inference copy present")
    return Decision(
        candidate.name, Action.KEEP, f"{reason}; {candidate.copy_name} exists and differs"
    )
