"""Planning: inventory + retention policy -> an immutable plan, one entry per file considered.

Nothing here touches disk.  The plan states the exact bytes each entry will write, delete and
reclaim (apparent sizes), so a dry run's ``expected_reclaimed_bytes`` equals what a real run
then reclaims on the same tree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sweeper import policy
from sweeper.formats.layouts import FolderCheckpoint, Part
from sweeper.inventory import FileEntry, FolderRef, Inventory, RunFolder
from sweeper.policy import Action, Candidate, CopyStatus, Rules, Status
from sweeper.pressure import Space
from sweeper.torchzip import Kind
from sweeper.trash import TrashItem


@dataclass(frozen=True, slots=True)
class Need:
    """A file whose presence justifies a deletion, as it was when planned: the deletion goes
    ahead only while this name still holds this very file."""

    name: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    # A checkpoint folder: the files that make it resumable, each re-checked (not its total)
    parts: tuple[Part, ...] = ()


@dataclass(frozen=True, slots=True)
class PlanEntry:
    root: str
    folder: FolderRef
    name: str
    path: str
    action: Action
    reason: str
    size: int
    output: str | None  # the inference copy's path, when one is written, refreshed or checked
    bytes_written: int  # expected
    bytes_deleted: int  # expected (a refreshed copy's old bytes count as deleted)
    dev: int
    ino: int
    mtime_ns: int
    uid: int
    epoch: int | None
    metric: tuple[str, float] | None
    extract_first: bool = False
    needs: tuple[Need, ...] = ()  # DELETE: re-checked just before the unlink
    replaces: tuple[int, int, int, int] | None = None  # the stale copy a refresh replaces
    keep_as: str | None = None  # where that stale copy is kept instead of being overwritten
    # A checkpoint folder: DELETE removes its training state only (bytes_deleted), after its
    # weights verify; they stay in place.
    layout: FolderCheckpoint | None = None
    # DELETE: moved into the trash for this long, not unlinked (the undo window); its bytes are
    # freed, and counted, when it is purged, so they are not in bytes_deleted
    undo_seconds: int = 0

    @property
    def trash(self) -> bool:
        return self.undo_seconds > 0

    @property
    def reclaimed_bytes(self) -> int:
        return self.bytes_deleted - self.bytes_written


@dataclass(frozen=True, slots=True)
class Purge:
    """A file in a trash folder to unlink now: its undo window has passed, or its filesystem is
    under disk pressure.  ``top`` is its root folder, as a scan reopens one."""

    item: TrashItem
    top: FolderRef
    reason: str

    @property
    def reclaimed_bytes(self) -> int:
        return self.item.size


@dataclass(frozen=True, slots=True)
class Pressure:
    """A filesystem under disk pressure, as the planner is told of it: how much must be freed
    there to reach ``pressure.free_target``, and what ``keep_full`` is lowered to."""

    space: Space
    needed_bytes: int
    keep_full: int


@dataclass(frozen=True, slots=True)
class SweepPlan:
    entries: tuple[PlanEntry, ...]
    problems: tuple[tuple[str, str], ...]
    failed: int = 0  # run folders not planned because classifying them failed: exit 1
    temp_folders: tuple[FolderRef, ...] = ()  # where an interrupted extraction may have left temps
    pressure: tuple[Pressure, ...] = ()  # the filesystems planned for under disk pressure
    purges: tuple[Purge, ...] = ()  # trashed files to unlink, before any entry is acted on

    @property
    def expected_reclaimed_bytes(self) -> int:
        entries = sum(entry.reclaimed_bytes for entry in self.entries)
        return entries + sum(purge.reclaimed_bytes for purge in self.purges)

    @property
    def trashed_bytes(self) -> int:
        """What the plan moves into the trash: freed only when purged, in a later run."""
        return sum(e.size for e in self.entries if e.trash and e.action is Action.DELETE)

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


def to_candidates(files: Iterable[FileEntry]) -> list[Candidate]:
    """The candidates of one run folder's files; a hard-linked file whose every link is one of
    them is told its other names (an alias, as timm's ``last.pth.tar`` is of an epoch file)."""
    files = list(files)
    names: dict[tuple[int, int], list[str]] = {}
    for file in files:
        names.setdefault((file.dev, file.ino), []).append(file.name)
    candidates = []
    for file in files:
        linked = names[(file.dev, file.ino)]
        aliases = () if file.nlink < 2 or len(linked) != file.nlink else linked
        candidates.append(to_candidate(file, tuple(n for n in aliases if n != file.name)))
    return candidates


def to_candidate(file: FileEntry, aliases: tuple[str, ...] = ()) -> Candidate:
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
        aliases=aliases,
        pinned=file.pinned,
        copy=copy.status if copy else CopyStatus.NONE,
        copy_name=copy.name if copy else None,
        copy_made_here=copy.made_here if copy else False,
        copy_pinned=copy.pinned if copy else False,
        copy_problem=copy.problem if copy and copy.status is CopyStatus.FOREIGN else None,
        uid=file.uid,
        metrics=file.metrics,
        verified=file.verified,
        in_use=file.in_use,
        source_name=file.source_name if file.kind is Kind.INFERENCE else None,
        layout=file.layout.layout if file.layout is not None else None,
        resumable=file.layout.resumable if file.layout is not None else True,
        series=file.layout.series if file.layout is not None else True,
    )


def plan_sweep(inventory: Inventory, rules: Rules, *, now_ns: int) -> SweepPlan:
    entries: list[PlanEntry] = []
    for run in inventory.runs:
        entries.extend(plan_run(run, rules, now_ns=now_ns))
    return SweepPlan(tuple(entries), inventory.problems, inventory.failed, inventory.temp_folders)


def plan_under_pressure(
    inventory: Inventory,
    rules: Rules,
    pressured: Rules,
    pressure: Sequence[Pressure],
    *,
    now_ns: int,
) -> SweepPlan:
    """The plan for a tree some of whose filesystems are under disk pressure.

    Every run folder is planned with ``rules``; then, on each filesystem in ``pressure``, the
    run folders that ``pressured`` rules would get most extra bytes back from are planned with
    those instead, largest first, until what the plan reclaims on that filesystem reaches its
    ``needed_bytes`` (or no folder has more to give).  Only as much as needed is planned, so
    the plan stays exact; those folders come first in it, so they are acted on first.  An
    entry that only the harder pace deletes says so in its reason.  Pure, like
    :func:`plan_sweep`; ``pressured`` must differ from ``rules`` only in pace
    (:func:`sweeper.pressure.pressured_rules`).
    """
    runs = inventory.runs
    planned = [plan_run(run, rules, now_ns=now_ns) for run in runs]
    first: list[int] = []
    for under in pressure:
        here = [index for index, run in enumerate(runs) if run.folder.dev == under.space.dev]
        left = under.needed_bytes - sum(_reclaimed(planned[index]) for index in here)
        harder = {
            index: _under_pressure(
                planned[index], plan_run(runs[index], pressured, now_ns=now_ns), under
            )
            for index in here
        }
        gains = {index: _reclaimed(harder[index]) - _reclaimed(planned[index]) for index in here}
        for index in sorted(here, key=lambda index: -gains[index]):
            if left <= 0 or gains[index] <= 0:
                break
            planned[index] = harder[index]
            left -= gains[index]
            first.append(index)
    chosen = set(first)
    order = first + [index for index in range(len(runs)) if index not in chosen]
    entries = tuple(entry for index in order for entry in planned[index])
    return SweepPlan(
        entries, inventory.problems, inventory.failed, inventory.temp_folders, tuple(pressure)
    )


def plan_purges(
    held: Iterable[tuple[FolderRef, TrashItem]],
    pressure: Sequence[Pressure],
    *,
    now: float,
) -> tuple[tuple[Purge, ...], tuple[Pressure, ...]]:
    """The trashed files to purge: those whose undo window has passed, and, on a filesystem
    under disk pressure, the oldest others until what they free reaches what is needed there
    (before any further demotion).  Returns them and the pressure left for demotions to
    relieve (``needed_bytes`` less what the purges free).  Pure."""
    purges = []
    left = {under.space.dev: under.needed_bytes for under in pressure}
    for top, item in sorted(held, key=lambda pair: (pair[1].trashed, pair[1].key)):
        dev = item.identity[0]
        if item.purge_after <= now:
            reason = "purged: its undo window has passed"
        elif left.get(dev, 0) > 0:
            reason = "purged early: its filesystem is under disk pressure"
        else:
            continue
        purges.append(Purge(item, top, reason))
        if dev in left:
            left[dev] -= item.size
    remaining = tuple(
        dataclasses.replace(under, needed_bytes=max(0, left[under.space.dev])) for under in pressure
    )
    return tuple(purges), remaining


def with_undo(plan: SweepPlan, undo_seconds: int, *, purges: tuple[Purge, ...] = ()) -> SweepPlan:
    """``plan`` with an undo window of ``undo_seconds`` (0: none): each full checkpoint it
    demotes is moved into the trash instead of unlinked, its bytes counted when it is purged.
    Not on a filesystem under disk pressure (a trashed byte frees nothing: those delete at
    once), nor a checkpoint folder's training state (deleted at once).  ``purges`` are added."""
    if undo_seconds <= 0:
        return dataclasses.replace(plan, purges=purges)
    pressing = {under.space.dev for under in plan.pressure}
    note = f"; held in the trash for {undo_seconds} s (undo_seconds)"
    entries = tuple(
        dataclasses.replace(
            entry,
            undo_seconds=undo_seconds,
            bytes_deleted=entry.bytes_deleted - entry.size,
            reason=entry.reason + note,
        )
        if entry.action is Action.DELETE and entry.layout is None and entry.dev not in pressing
        else entry
        for entry in plan.entries
    )
    return dataclasses.replace(plan, entries=entries, purges=purges)


def plan_all(
    inventory: Inventory,
    rules: Rules,
    pressured: Rules,
    pressure: Sequence[Pressure],
    held: Iterable[tuple[FolderRef, TrashItem]],
    *,
    now_ns: int,
    undo_seconds: int,
    refused: Sequence[tuple[str, str]] = (),
) -> SweepPlan:
    """The whole plan of a sweep: due purges of the trash first (and, under disk pressure, the
    oldest others), then demotions at the pace each filesystem calls for, with the undo window
    where it applies.  Pure: :func:`plan_purges`, :func:`plan_under_pressure` (or
    :func:`plan_sweep`) and :func:`with_undo` in turn.  ``refused``: (path, why) of trash
    folders refused (nothing purged from them): problems that fail the sweep, as a bad file
    does."""
    purges, left = plan_purges(held, pressure, now=now_ns / 1e9)
    if pressure:
        planned = plan_under_pressure(inventory, rules, pressured, left, now_ns=now_ns)
        planned = dataclasses.replace(planned, pressure=tuple(pressure))
    else:
        planned = plan_sweep(inventory, rules, now_ns=now_ns)
    planned = with_undo(planned, undo_seconds, purges=purges)
    if not refused:
        return planned
    return dataclasses.replace(
        planned,
        problems=(*planned.problems, *refused),
        failed=planned.failed + len(refused),
    )


def _reclaimed(entries: Iterable[PlanEntry]) -> int:
    return sum(entry.reclaimed_bytes for entry in entries)


def _under_pressure(
    usual: tuple[PlanEntry, ...], harder: tuple[PlanEntry, ...], under: Pressure
) -> tuple[PlanEntry, ...]:
    """``harder``, each entry whose action the usual pace would not take saying why it is."""
    note = (
        f"disk pressure on {under.space.filesystem}: keep_full lowered to {under.keep_full}, "
        "min_age_seconds to settle_seconds"
    )
    return tuple(
        entry
        if entry.action is before.action
        else dataclasses.replace(entry, reason=f"{entry.reason} ({note})")
        for before, entry in zip(usual, harder, strict=True)
    )


# A run folder's candidates and the decisions made on them (for the same rules and time).
Decided = tuple[tuple[Candidate, ...], tuple[policy.Decision, ...]]


def plan_run(
    run: RunFolder, rules: Rules, *, now_ns: int, decided: Decided | None = None
) -> tuple[PlanEntry, ...]:
    """The plan entries of one run folder (retention is decided per run folder).  Run folders
    should come through :func:`sweeper.intact.verify_run` first: a deletion that counts on a
    full checkpoint not yet read in full is planned as keep.  ``decided``: what
    :func:`sweeper.intact.verified_decisions` decided for this very run, not decided again."""
    if decided is not None:
        candidates, decisions = decided
    else:
        candidates = tuple(to_candidates(run.files))
        decisions = policy.decide(candidates, rules, now_ns=now_ns, folder_uid=run.owner_uid)
    unverified = policy.needs_verification(candidates, decisions)
    if unverified:  # fail safe: a deletion never rests on a file nobody read in full
        decisions = tuple(_hold(d, unverified) for d in decisions)
    files = {file.name: file for file in run.files}
    return tuple(
        _entry(run.root, run.folder, file, decision, files)
        for file, decision in zip(run.files, decisions, strict=True)
    )


def _hold(decision: policy.Decision, unverified: set[str]) -> policy.Decision:
    counted_on = unverified & {*decision.needs, *decision.counts_on}
    if decision.action is not Action.DELETE or not counted_on:
        return decision
    waiting = ", ".join(sorted(counted_on))
    reason = f"{decision.reason}; not deleted: {waiting}, which it counts on, is not verified"
    if decision.with_copy and decision.extract_first:
        return policy.Decision(decision.name, Action.EXTRACT, reason)
    return policy.Decision(decision.name, Action.KEEP, reason)


def _entry(
    root: str,
    folder: FolderRef,
    file: FileEntry,
    decision: policy.Decision,
    files: dict[str, FileEntry],
) -> PlanEntry:
    written = deleted = 0
    output = None
    replaces = None
    keep_as = None
    copy = file.copy
    if file.layout is not None:
        if decision.action is Action.DELETE:
            deleted = file.layout.training_bytes
    elif decision.action is Action.DELETE:
        deleted = file.size
    if file.layout is not None:
        pass  # its weights are its copy: nothing written
    elif decision.action in (Action.EXTRACT, Action.REFRESH) or (
        decision.action is Action.DELETE and decision.with_copy
    ):
        assert copy is not None and file.output_bytes is not None
        output = os.path.join(folder.display, copy.name)
        if decision.action is not Action.DELETE or decision.extract_first:
            written = file.output_bytes
            if copy.status is CopyStatus.STALE:
                replaces = copy.identity
                if decision.keep_stale:
                    keep_as = copy.aside
                else:
                    deleted += copy.size
    elif decision.action is Action.DELETE and copy is not None and decision.keep_stale:
        # demoted with no copy of its own: another version's stale copy is still kept aside
        assert copy.status is CopyStatus.STALE
        replaces, keep_as = copy.identity, copy.aside
    needs = tuple(_need(files[name]) for name in decision.needs)
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
        needs=needs,
        replaces=replaces,
        keep_as=keep_as,
        layout=file.layout,
    )


def _need(file: FileEntry) -> Need:
    parts = () if file.layout is None else (*file.layout.weights, *file.layout.training)
    return Need(file.name, file.dev, file.ino, file.size, file.mtime_ns, parts)
