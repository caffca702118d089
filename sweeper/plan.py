"""Planning: inventory + retention policy -> an immutable plan, one entry per file considered.

Nothing here touches disk.  The plan states the exact bytes each entry will write, delete and
reclaim (apparent sizes), so a dry run's ``expected_reclaimed_bytes`` equals what a real run
then reclaims on the same tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sweeper import policy
from sweeper.extract import output_name
from sweeper.inventory import FileEntry, FolderRef, Inventory, RunFolder
from sweeper.policy import Action, Candidate, Status
from sweeper.torchzip import Kind, Mode


@dataclass(frozen=True, slots=True)
class PlanEntry:
    root: str
    folder: FolderRef
    name: str
    path: str
    action: Action
    reason: str
    size: int
    output: str | None  # the inference copy's path, for extract and delete
    bytes_written: int  # expected
    bytes_deleted: int  # expected
    dev: int
    ino: int
    mtime_ns: int
    uid: int
    epoch: int | None
    metric: tuple[str, float] | None
    extract_first: bool = False

    @property
    def reclaimed_bytes(self) -> int:
        return self.bytes_deleted - self.bytes_written


@dataclass(frozen=True, slots=True)
class SweepPlan:
    entries: tuple[PlanEntry, ...]
    problems: tuple[tuple[str, str], ...]

    @property
    def expected_reclaimed_bytes(self) -> int:
        return sum(entry.reclaimed_bytes for entry in self.entries)

    def count(self, action: Action) -> int:
        return sum(1 for entry in self.entries if entry.action is action)


def _status(file: FileEntry) -> Status:
    if file.symlink:
        return Status.SYMLINK
    if file.writing:
        return Status.WRITING
    if file.own_output:
        return Status.OWN_OUTPUT
    if file.problem is not None or file.kind is None:
        return Status.UNUSABLE
    if file.kind is Kind.FULL:
        return Status.FULL
    if file.kind is Kind.INFERENCE:
        return Status.INFERENCE
    if file.kind is Kind.WEIGHTS:
        return Status.WEIGHTS
    return Status.UNUSABLE


def to_candidate(file: FileEntry) -> Candidate:
    status = _status(file)
    problem = file.problem
    if status is Status.UNUSABLE and problem is None:
        problem = "not a checkpoint"
    copy = file.copy
    return Candidate(
        name=file.name,
        status=status,
        size=file.size,
        mtime_ns=file.mtime_ns,
        epoch=file.epoch,
        step=file.step,
        problem=problem,
        nlink=file.nlink,
        pinned=file.pinned,
        copy_exists=copy.exists if copy else False,
        copy_matches=copy.matches if copy else False,
        copy_name=copy.name if copy else None,
    )


def plan_sweep(
    inventory: Inventory,
    *,
    keep_full: int,
    min_age_seconds: int,
    now_ns: int,
    settle_seconds: float = 0,
) -> SweepPlan:
    entries: list[PlanEntry] = []
    for run in inventory.runs:
        entries.extend(
            plan_run(
                run,
                keep_full=keep_full,
                min_age_seconds=min_age_seconds,
                now_ns=now_ns,
                settle_seconds=settle_seconds,
            )
        )
    return SweepPlan(tuple(entries), inventory.problems)


def plan_run(
    run: RunFolder,
    *,
    keep_full: int,
    min_age_seconds: int,
    now_ns: int,
    settle_seconds: float = 0,
) -> tuple[PlanEntry, ...]:
    """The plan entries of one run folder (retention is decided per run folder)."""
    decisions = policy.decide(
        [to_candidate(f) for f in run.files],
        keep_full=keep_full,
        min_age_seconds=min_age_seconds,
        now_ns=now_ns,
        settle_seconds=settle_seconds,
    )
    return tuple(
        _entry(run.root, run.folder, file, decision)
        for file, decision in zip(run.files, decisions, strict=True)
    )


def _entry(root: str, folder: FolderRef, file: FileEntry, decision: policy.Decision) -> PlanEntry:
    written = deleted = 0
    output = None
    if decision.action in (Action.EXTRACT, Action.DELETE):
        output = os.path.join(folder.display, output_name(file.name, Mode.INFERENCE))
        assert file.output_bytes is not None
        if decision.action is Action.EXTRACT or decision.extract_first:
            written = file.output_bytes
        if decision.action is Action.DELETE:
            deleted = file.size
    return PlanEntry(
        root=root,
        folder=folder,
        name=file.name,
        path=file.display,
        action=decision.action,
        reason=decision.reason,
        size=file.size,
        output=output,
        bytes_written=written,
        bytes_deleted=deleted,
        dev=file.dev,
        ino=file.ino,
        mtime_ns=file.mtime_ns,
        uid=file.uid,
        epoch=file.epoch,
        metric=file.metric,
        extract_first=decision.extract_first,
    )
