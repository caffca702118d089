"""The retention policy as a pure function: table-driven, no files, ``now`` passed in.

Each row gives one run folder's candidates and the decision expected for every file, as
``(name, action, reason substring)``.  Actions are written as the plan states them:
``extract`` (copy written, full file stays), ``keep``, ``skip``, ``delete`` (copy already
present and verified, so only deleted) and ``extract+delete`` (copy written first, then deleted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pytest

from sweeper.policy import (
    Action,
    BestMode,
    Candidate,
    CopyStatus,
    Decision,
    InferenceRules,
    Rules,
    Status,
    decide,
    needs_verification,
)

SECOND = 1_000_000_000
NOW = 1_800_000_000 * SECOND
OLD = NOW - 30 * 24 * 3600 * SECOND  # a month old: no min_age used here protects it
MIN_AGE = 600


def full(
    name: str,
    epoch: int | None = None,
    *,
    step: int | None = None,
    mtime_ns: int = OLD,
    **changes: object,
) -> Candidate:
    """An intact full checkpoint with no inference copy yet."""
    candidate = Candidate(
        name=name,
        status=Status.FULL,
        size=1000,
        mtime_ns=mtime_ns,
        epoch=epoch,
        step=step,
        copy_name=name.replace(".pt", "_inference.pt"),
    )
    return replace(candidate, **changes)  # type: ignore[arg-type]


def other(name: str, status: Status, **changes: object) -> Candidate:
    """Anything that is not an intact full checkpoint (it may still claim a high epoch)."""
    return replace(Candidate(name, status, 1000, NOW - SECOND), **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Row:
    candidates: Sequence[Candidate]
    expected: Sequence[tuple[str, str, str]]
    keep_full: int = 2
    min_age_seconds: int = 0
    now_ns: int = NOW
    settle_seconds: float = 0
    keep_best: int = 0
    best_metric: str = "auto"
    best_mode: BestMode = BestMode.auto
    keep_every: int = 0
    keep_inference: InferenceRules = field(default_factory=InferenceRules)
    folder_uid: int | None = None

    @property
    def rules(self) -> Rules:
        return Rules(
            keep_full=self.keep_full,
            min_age_seconds=self.min_age_seconds,
            keep_best=self.keep_best,
            best_metric=self.best_metric,
            best_mode=self.best_mode,
            keep_every=self.keep_every,
            keep_inference=self.keep_inference,
            settle_seconds=self.settle_seconds,
        )


def spelled(decision: Decision) -> str:
    if decision.action is Action.DELETE and decision.extract_first:
        return "extract+delete"
    return decision.action.value


ROWS = {
    # --- the daemon's settle time --------------------------------------------------------
    "a file changed within settle_seconds is left alone and does not count": Row(
        [
            full("e3.pt", 3, mtime_ns=NOW - 5 * SECOND),
            full("e2.pt", 2),
            full("e1.pt", 1),
        ],
        [
            ("e3.pt", "skip", "not yet quiet for settle_seconds=30"),
            ("e2.pt", "extract", "kept: the newest intact full checkpoint (epoch 2)"),
            ("e1.pt", "extract", "kept: one of the 2 newest"),
        ],
        settle_seconds=30,
    ),
    "a file quiet for exactly settle_seconds is acted on": Row(
        [full("e3.pt", 3, mtime_ns=NOW - 30 * SECOND), full("e2.pt", 2), full("e1.pt", 1)],
        [
            ("e3.pt", "extract", "kept: the newest"),
            ("e2.pt", "extract", "kept: one of the 2 newest"),
            ("e1.pt", "extract+delete", "demoted"),
        ],
        settle_seconds=30,
    ),
    # --- what "newest" means -------------------------------------------------------------
    "names never decide: epoch 10 is newer than epoch 9": Row(
        [
            full("checkpoint_epoch_10.pt", 10, mtime_ns=OLD),
            full("checkpoint_epoch_8.pt", 8, mtime_ns=OLD + 2 * SECOND),
            full("checkpoint_epoch_9.pt", 9, mtime_ns=OLD + SECOND),
        ],
        [
            (
                "checkpoint_epoch_10.pt",
                "extract",
                "kept: the newest intact full checkpoint (epoch 10)",
            ),
            ("checkpoint_epoch_8.pt", "extract", "the most recently written intact full"),
            (
                "checkpoint_epoch_9.pt",
                "extract+delete",
                "older than the 1 newest intact full checkpoints, by epoch/step and by mtime "
                "(epoch 9)",
            ),
        ],
        keep_full=1,
    ),
    "N newest by epoch and N newest by mtime, both kept when they disagree": Row(
        [
            full("a.pt", 12, mtime_ns=OLD),
            full("b.pt", 3, mtime_ns=OLD + 9 * SECOND),
            full("c.pt", 11, mtime_ns=OLD + 5 * SECOND),
            full("d.pt", 4, mtime_ns=OLD + 7 * SECOND),
            full("e.pt", 2, mtime_ns=OLD + 1 * SECOND),
        ],
        [
            ("a.pt", "extract", "kept: the newest intact full checkpoint (epoch 12)"),
            ("b.pt", "extract", "kept: the most recently written intact full checkpoint"),
            ("c.pt", "extract", "kept: one of the 2 newest intact full checkpoints (epoch 11)"),
            ("d.pt", "extract", "one of the 2 most recently written intact full checkpoints"),
            ("e.pt", "extract+delete", "(epoch 2); inference copy written first"),
        ],
    ),
    "step decides when no epoch is stored": Row(
        [
            full("step_1000.pt", step=1000, mtime_ns=OLD),
            full("step_200.pt", step=200, mtime_ns=OLD + 2 * SECOND),
            full("step_500.pt", step=500, mtime_ns=OLD + SECOND),
        ],
        [
            ("step_1000.pt", "extract", "newest intact full checkpoint (step 1000)"),
            ("step_200.pt", "extract", "restart: steps start over at 500 after step 1000"),
            ("step_500.pt", "extract+delete", "(step 500)"),
        ],
        keep_full=1,
    ),
    "epoch outranks step": Row(
        [full("x.pt", 1, step=99_999), full("y.pt", 2, step=10)],
        [("x.pt", "extract+delete", "(epoch 1)"), ("y.pt", "extract", "newest")],
        keep_full=1,
    ),
    "mtime only breaks a tie in epoch": Row(
        [
            full("later.pt", 7, mtime_ns=OLD + SECOND),
            full("earlier.pt", 7, mtime_ns=OLD),
            full("older_epoch_newest_mtime.pt", 6, mtime_ns=OLD + 60 * SECOND),
        ],
        [
            ("later.pt", "extract", "newest"),
            ("earlier.pt", "extract+delete", "(epoch 7)"),
            ("older_epoch_newest_mtime.pt", "extract", "the most recently written"),
        ],
        keep_full=1,
    ),
    "mtime orders files that store neither epoch nor step": Row(
        [
            full("z_first.pt", mtime_ns=OLD),
            full("a_second.pt", mtime_ns=OLD + SECOND),
            full("m_third.pt", mtime_ns=OLD + 2 * SECOND),
        ],
        [
            ("z_first.pt", "extract+delete", "no epoch or step stored"),
            ("a_second.pt", "extract", "one of the 2 newest"),
            ("m_third.pt", "extract", "the newest intact full checkpoint"),
        ],
    ),
    "restarted run: the run being trained keeps its resume point, and the restart is named": Row(
        [
            full("run_epoch_5.pt", 5, mtime_ns=OLD),
            full("run_epoch_3.pt", 3, mtime_ns=OLD + 3600 * SECOND),  # resumed from epoch 2
            full("run_epoch_4.pt", 4, mtime_ns=OLD - 3600 * SECOND),
        ],
        [
            ("run_epoch_5.pt", "extract", "the newest intact full checkpoint (epoch 5)"),
            (
                "run_epoch_3.pt",
                "extract",
                "the most recently written intact full checkpoint — restart: epochs start "
                "over at 3 after epoch 5 (epoch 3)",
            ),
            ("run_epoch_4.pt", "extract+delete", "(epoch 4)"),
        ],
        keep_full=1,
    ),
    "the issue's restart: old_epoch8..10 a day old, restart_epoch1..3 in the last hour": Row(
        [
            *(full(f"old_epoch{n}.pt", n, mtime_ns=NOW - 86400 * SECOND + n) for n in (8, 9, 10)),
            *(full(f"restart_epoch{n}.pt", n, mtime_ns=NOW - 3600 * SECOND + n) for n in (1, 2, 3)),
        ],
        [
            ("old_epoch8.pt", "extract+delete", "(epoch 8)"),
            ("old_epoch9.pt", "extract", "one of the 2 newest intact"),
            ("old_epoch10.pt", "extract", "the newest intact"),
            ("restart_epoch1.pt", "extract+delete", "(epoch 1)"),
            ("restart_epoch2.pt", "extract", "restart: epochs start over at 1 after epoch 10"),
            ("restart_epoch3.pt", "extract", "the most recently written"),
        ],
    ),
    "copied files: fresh mtimes in the wrong order, epochs decide": Row(
        [
            full("e1.pt", 1, mtime_ns=NOW - 10 * SECOND),
            full("e2.pt", 2, mtime_ns=NOW - 30 * SECOND),
            full("e3.pt", 3, mtime_ns=NOW - 20 * SECOND),
        ],
        [
            ("e1.pt", "extract", "the most recently written"),
            ("e2.pt", "extract", "(epoch 2)"),
            ("e3.pt", "extract", "newest"),
        ],
    ),
    "keep_full=3 keeps three": Row(
        [full(f"e{n}.pt", n) for n in range(1, 6)],
        [
            ("e1.pt", "extract+delete", "older than the 3 newest"),
            ("e2.pt", "extract+delete", "older than the 3 newest"),
            ("e3.pt", "extract", "one of the 3 newest"),
            ("e4.pt", "extract", "one of the 3 newest"),
            ("e5.pt", "extract", "newest"),
        ],
        keep_full=3,
    ),
    # --- what never counts toward N and is never deleted ---------------------------------
    "a truncated newest file does not count; the N newest intact stay full": Row(
        [
            other("e9.pt", Status.UNUSABLE, problem="truncated archive: no end record"),
            full("e3.pt", 3),
            full("e2.pt", 2),
            full("e1.pt", 1),
        ],
        [
            ("e9.pt", "skip", "skipped: truncated archive: no end record"),
            ("e3.pt", "extract", "newest"),
            ("e2.pt", "extract", "one of the 2 newest"),
            ("e1.pt", "extract+delete", "(epoch 1)"),
        ],
    ),
    "only unusable files: nothing at all is deleted": Row(
        [
            other("a.pt", Status.UNUSABLE, problem="corrupt", mtime_ns=OLD),
            other("b.pt", Status.UNUSABLE, mtime_ns=OLD),
        ],
        [("a.pt", "skip", "skipped: corrupt"), ("b.pt", "skip", "skipped: unusable")],
        keep_full=1,
    ),
    "the newest intact is never deleted, even with its copy in place": Row(
        [full("only.pt", 1, copy=CopyStatus.CURRENT)],
        [("only.pt", "keep", "kept: the newest intact full checkpoint (epoch 1)")],
        keep_full=1,
        min_age_seconds=0,
    ),
    # --- protections for files older than the N newest -----------------------------------
    "min_age_seconds: exactly that old may go, one nanosecond younger may not": Row(
        [
            full("newest.pt", 9, mtime_ns=NOW - MIN_AGE * SECOND + 2),
            full("exactly.pt", 2, mtime_ns=NOW - MIN_AGE * SECOND),
            full("just_younger.pt", 1, mtime_ns=NOW - MIN_AGE * SECOND + 1),
        ],
        [
            ("newest.pt", "extract", "newest"),
            ("exactly.pt", "extract+delete", "(epoch 2)"),
            ("just_younger.pt", "extract", "younger than min_age_seconds=600"),
        ],
        keep_full=1,
        min_age_seconds=MIN_AGE,
    ),
    "now is passed in, never read: a 1970 file is young when now says so": Row(
        [full("newest.pt", 9, mtime_ns=10 * SECOND), full("old.pt", 1, mtime_ns=10 * SECOND)],
        [("newest.pt", "extract", "newest"), ("old.pt", "extract", "younger than min_age")],
        keep_full=1,
        min_age_seconds=MIN_AGE,
        now_ns=20 * SECOND,
    ),
    "pins: a .keep file, a shared flock, the target of a symlink": Row(
        [
            full("newest.pt", 9),
            full("kept.pt", 1, pinned="pinned by kept.pt.keep"),
            full("locked.pt", 2, pinned="pinned by a shared flock"),
            full("linked.pt", 3, pinned="target of a symlink"),
            full("free.pt", 4),
        ],
        [
            ("newest.pt", "extract", "newest"),
            ("kept.pt", "extract", "kept: pinned by kept.pt.keep (epoch 1)"),
            ("locked.pt", "extract", "kept: pinned by a shared flock"),
            ("linked.pt", "extract", "kept: target of a symlink"),
            ("free.pt", "extract+delete", "(epoch 4)"),
        ],
        keep_full=1,
    ),
    "a pinned file whose copy is already present is simply kept": Row(
        [
            full("newest.pt", 9),
            full("kept.pt", 1, pinned="pinned by kept.pt.keep", copy=CopyStatus.CURRENT),
        ],
        [("newest.pt", "extract", "newest"), ("kept.pt", "keep", "pinned by kept.pt.keep")],
        keep_full=1,
    ),
    "more than one hard link, elsewhere: kept, and no copy (one per link would fill the disk)": Row(
        [full("newest.pt", 9), full("linked.pt", 1, nlink=2)],
        [
            ("newest.pt", "extract", "newest"),
            ("linked.pt", "keep", "has 2 hard links, some outside this folder; never counted"),
        ],
        keep_full=1,
    ),
    "names of one file in one folder: one copy, for the first name": Row(
        [
            full("newest.pt", 9),
            full("b.pt", 1, nlink=3, aliases=("a.pt", "last.pt")),
            full("a.pt", 1, nlink=3, aliases=("b.pt", "last.pt")),
            full("last.pt", 1, nlink=3, aliases=("a.pt", "b.pt")),
        ],
        [
            ("newest.pt", "extract", "newest"),
            ("b.pt", "keep", "its copy is a.pt's (one copy per file, not per name)"),
            ("a.pt", "extract", "hard-linked as b.pt, last.pt in this folder (an alias)"),
            ("last.pt", "keep", "its copy is a.pt's"),
        ],
        keep_full=1,
    ),
    # --- the inference copy beside an older checkpoint -----------------------------------
    "existing copy: matches -> delete only; differs -> keep; missing -> write, then delete": Row(
        [
            full("newest.pt", 9),
            full("matches.pt", 3, copy=CopyStatus.CURRENT),
            full("differs.pt", 2, copy=CopyStatus.FOREIGN),
            full("missing.pt", 1),
        ],
        [
            ("newest.pt", "extract", "newest"),
            ("matches.pt", "delete", "inference copy present"),
            ("differs.pt", "keep", "differs_inference.pt exists and is not this checkpoint's"),
            ("missing.pt", "extract+delete", "inference copy written first"),
        ],
        keep_full=1,
    ),
    "kept ones: copy present -> keep; differs -> keep, not overwritten; missing -> extract": Row(
        [
            full("a.pt", 3, copy=CopyStatus.CURRENT),
            full("b.pt", 2, copy=CopyStatus.FOREIGN),
            full("c.pt", 1),
        ],
        [
            ("a.pt", "keep", "inference copy present"),
            ("b.pt", "keep", "b_inference.pt exists and is not this checkpoint's copy; never"),
            ("c.pt", "extract", "inference copy to write"),
        ],
        keep_full=3,
    ),
    # --- rolling names, owners and links never count ------------------------------------
    "rolling names: never demoted, never take a keep_full slot, always get a copy": Row(
        [
            full("best_model.pt", 2, mtime_ns=NOW - 10 * SECOND),
            full("last.pt", 9, mtime_ns=NOW - 5 * SECOND),
            full("epoch_1.pt", 1),
            full("epoch_2.pt", 2),
            full("epoch_3.pt", 3),
        ],
        [
            ("best_model.pt", "extract", "kept: a rolling name (rolling_names 'best*')"),
            ("last.pt", "extract", "rolling_names 'last*'"),
            ("epoch_1.pt", "extract+delete", "(epoch 1)"),
            ("epoch_2.pt", "extract", "one of the 2 newest"),
            ("epoch_3.pt", "extract", "the newest"),
        ],
    ),
    "an old rolling name with a current copy is simply kept": Row(
        [full("model_best.pt", 1, copy=CopyStatus.CURRENT), full("e9.pt", 9)],
        [("model_best.pt", "keep", "rolling name"), ("e9.pt", "extract", "newest")],
        keep_full=1,
    ),
    "a rolling name rewritten since its copy was made here: the stale copy is replaced": Row(
        [full("best_model.pt", 7, copy=CopyStatus.STALE, copy_made_here=True), full("e9.pt", 9)],
        [
            ("best_model.pt", "refresh", "stale best_model_inference.pt (made from an earlier"),
            ("e9.pt", "extract", ""),
        ],
        keep_full=1,
    ),
    "a rolling name's stale copy made elsewhere (a copied folder) is kept aside": Row(
        [full("best_model.pt", 7, copy=CopyStatus.STALE), full("e9.pt", 9)],
        [
            ("best_model.pt", "refresh", "kept aside as another version's copy, a fresh copy"),
            ("e9.pt", "extract", ""),
        ],
        keep_full=1,
    ),
    "a kept epoch file re-trained in place: its stale copy is kept aside, never overwritten": Row(
        [full("e9.pt", 9, copy=CopyStatus.STALE, copy_made_here=True)],
        [("e9.pt", "refresh", "stale e9_inference.pt kept aside as another version's copy")],
        keep_full=1,
    ),
    "another owner's file in the folder never counts and is never deleted": Row(
        [
            full("dropped.pt", 99, uid=666, mtime_ns=NOW - 700 * SECOND),
            full("e2.pt", 2, uid=1000),
            full("e1.pt", 1, uid=1000),
        ],
        [
            ("dropped.pt", "extract", "owned by uid 666, not the folder's owner (uid 1000)"),
            ("e2.pt", "extract", "the newest intact"),
            ("e1.pt", "extract+delete", "(epoch 1)"),
        ],
        keep_full=1,
        folder_uid=1000,
    ),
    "a hard link to someone's epoch-99 file does not push the owner's out": Row(
        [full("linked.pt", 99, nlink=2, mtime_ns=NOW - 700 * SECOND), full("e2.pt", 2)],
        [
            ("linked.pt", "keep", "has 2 hard links, some outside this folder; never counted"),
            ("e2.pt", "extract", "newest"),
        ],
        keep_full=1,
    ),
    "a file some process holds open (reading) is not deleted": Row(
        [full("e3.pt", 3), full("e1.pt", 1, in_use=True)],
        [("e3.pt", "extract", "newest"), ("e1.pt", "extract", "kept: open by a process")],
        keep_full=1,
    ),
    # --- stale and foreign copies of demoted files ---------------------------------------
    "a demoted file with a stale copy: the stale copy kept aside, a fresh one, then deleted": Row(
        [full("e3.pt", 3), full("e1.pt", 1, copy=CopyStatus.STALE, copy_made_here=True)],
        [
            ("e3.pt", "extract", ""),
            (
                "e1.pt",
                "extract+delete",
                "stale e1_inference.pt kept aside as another version's copy, a fresh copy "
                "written first",
            ),
        ],
        keep_full=1,
    ),
    "keep_inference rules that cannot judge a checkpoint never drop its copy": Row(
        [full(f"e{n}.pt", n) for n in (1, 2, 3)] + [full("s.pt", step=5)],
        [
            ("e1.pt", "extract+delete", "inference copy written first"),
            ("e2.pt", "extract+delete", "inference copy written first"),
            ("e3.pt", "extract", "newest"),
            ("s.pt", "extract+delete", "inference copy written first"),
        ],
        keep_full=1,
        keep_inference=InferenceRules(all=False, best=1, every=7),
    ),
    # --- keep_best and keep_every, as a union with keep_full -----------------------------
    "keep_best (auto metric: best_val_acc, higher is better)": Row(
        [
            full(f"e{n}.pt", n, metrics=(("best_val_acc", acc),))
            for n, acc in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6), (5, 0.8))
        ],
        [
            ("e1.pt", "extract+delete", "older than the 1 newest"),
            ("e2.pt", "extract", "keep_best: best_val_acc=0.9, the highest"),
            ("e3.pt", "extract+delete", "kept by none of keep_best=2"),
            ("e4.pt", "extract+delete", ""),
            ("e5.pt", "extract", "the newest intact full checkpoint; keep_best: best_val_acc=0.8"),
        ],
        keep_full=1,
        keep_best=2,
    ),
    "keep_best auto: a loss one level down is lower-is-better": Row(
        [
            full("e1.pt", 1, metrics=(("metrics.val_loss", 0.2),)),
            full("e2.pt", 2, metrics=(("metrics.val_loss", 0.5),)),
            full("e3.pt", 3, metrics=(("metrics.val_loss", 0.3),)),
        ],
        [
            ("e1.pt", "extract", "keep_best: val_loss=0.2, the lowest"),
            ("e2.pt", "extract+delete", ""),
            ("e3.pt", "extract", "the newest"),
        ],
        keep_full=1,
        keep_best=1,
    ),
    "best_mode=min overrides auto; a named best_metric": Row(
        [
            full("e1.pt", 1, metrics=(("score", 3.0),)),
            full("e2.pt", 2, metrics=(("score", 1.0),)),
            full("e3.pt", 3, metrics=(("score", 2.0),)),
        ],
        [
            ("e1.pt", "extract+delete", ""),
            ("e2.pt", "extract", "keep_best: score=1, the lowest"),
            ("e3.pt", "extract", "newest"),
        ],
        keep_full=1,
        keep_best=1,
        best_metric="score",
        best_mode=BestMode.min,
    ),
    "keep_every: every epoch divisible by E stays full; a file kept twice names both rules": Row(
        [full(f"e{n}.pt", n) for n in range(1, 7)],
        [
            ("e1.pt", "extract+delete", "kept by none of keep_every=3"),
            ("e2.pt", "extract+delete", ""),
            ("e3.pt", "extract", "keep_every: epoch divisible by 3"),
            ("e4.pt", "extract+delete", ""),
            ("e5.pt", "extract+delete", ""),
            ("e6.pt", "extract", "the newest intact full checkpoint; keep_every: epoch divisible"),
        ],
        keep_full=1,
        keep_every=3,
    ),
    # --- keep_inference: thinning copies whose full checkpoint is gone -------------------
    "keep_inference all (default): orphan copies are never touched": Row(
        [
            other("e1_inference.pt", Status.OWN_OUTPUT, epoch=1, source_name="e1.pt"),
            full("e5.pt", 5),
        ],
        [("e1_inference.pt", "skip", "sweeper's own output"), ("e5.pt", "extract", "newest")],
        keep_full=1,
    ),
    "keep_inference last=1, every=2: the rest are thinned, or demoted without a copy": Row(
        [
            other("e1_inference.pt", Status.OWN_OUTPUT, epoch=1, source_name="e1.pt"),
            other("e2_inference.pt", Status.OWN_OUTPUT, epoch=2, source_name="e2.pt"),
            other("best_inference.pt", Status.OWN_OUTPUT, epoch=0, source_name="best.pt"),
            other("mine_inference.pt", Status.OWN_OUTPUT, epoch=1),  # names no source
            full("e3.pt", 3),
            full("e4.pt", 4, copy=CopyStatus.CURRENT),
            full("e5.pt", 5),
            full("e6.pt", 6),
        ],
        [
            ("e1_inference.pt", "delete", "thinned: inference copy of e1.pt (now deleted)"),
            ("e2_inference.pt", "skip", "sweeper's own output"),
            ("best_inference.pt", "skip", "sweeper's own output"),
            ("mine_inference.pt", "skip", "sweeper's own output"),
            ("e3.pt", "delete", "no inference copy kept (keep_inference last=1, every=2)"),
            ("e4.pt", "delete", "inference copy present"),
            ("e5.pt", "extract+delete", "inference copy written first"),
            ("e6.pt", "extract", "newest"),
        ],
        keep_full=1,
        keep_inference=InferenceRules(all=False, last=1, every=2),
    ),
    "keep_inference never thins another owner's, a pinned, an open or a hard-linked copy": Row(
        [
            other("a_inference.pt", Status.OWN_OUTPUT, epoch=1, source_name="a.pt", uid=7),
            other("b_inference.pt", Status.OWN_OUTPUT, epoch=1, source_name="b.pt", pinned="x"),
            other("c_inference.pt", Status.OWN_OUTPUT, epoch=1, source_name="c.pt", in_use=True),
            other("d_inference.pt", Status.OWN_OUTPUT, epoch=1, source_name="d.pt", nlink=2),
            other("e_inference.pt", Status.OWN_OUTPUT, epoch=1, source_name="e.pt"),
            full("e9.pt", 9),
        ],
        [
            ("a_inference.pt", "skip", "sweeper's own output"),
            ("b_inference.pt", "skip", "sweeper's own output"),
            ("c_inference.pt", "skip", "sweeper's own output"),
            ("d_inference.pt", "skip", "sweeper's own output"),
            ("e_inference.pt", "delete", "thinned"),  # the control
            ("e9.pt", "extract", "newest"),
        ],
        keep_full=1,
        keep_inference=InferenceRules(all=False, every=100),
        folder_uid=0,
    ),
    "keep_inference last: a checkpoint storing neither epoch nor step keeps its copy": Row(
        [full("e5.pt", 5), full("e4.pt", 4), full("e3.pt", 3), full("plain.pt", mtime_ns=OLD - 9)],
        [
            ("e5.pt", "extract", "newest"),
            ("e4.pt", "extract+delete", "inference copy written first"),  # last=1 keeps it
            ("e3.pt", "delete", "no inference copy kept"),
            ("plain.pt", "extract+delete", "inference copy written first"),  # cannot be placed
        ],
        keep_full=1,
        keep_inference=InferenceRules(all=False, last=1),
    ),
    "empty folder": Row([], []),
}

SKIPPED = {
    Status.UNUSABLE: "skipped: not a zip archive",
    Status.WRITING: "skipped: open for writing by a process",
    Status.SYMLINK: "skipped: a symlink, never followed",
    Status.OWN_OUTPUT: "skipped: sweeper's own output",
    Status.INFERENCE: "skipped: already an inference checkpoint",
    Status.WEIGHTS: "skipped: already bare weights",
}


def check(row: Row) -> None:
    decisions = decide(row.candidates, row.rules, now_ns=row.now_ns, folder_uid=row.folder_uid)
    # One decision per candidate, in the candidates' order.
    assert [d.name for d in decisions] == [c.name for c in row.candidates]
    got = [(d.name, spelled(d), d.reason) for d in decisions]
    for (name, action, reason), (want_name, want_action, want_reason) in zip(
        got, row.expected, strict=True
    ):
        assert (name, action) == (want_name, want_action), got
        assert want_reason in reason, (name, reason)
    for decision in decisions:
        assert decision.extract_first == (spelled(decision) == "extract+delete")
        # only a rolling name's copy made here is overwritten: any other stale copy is kept
        if decision.keep_stale is False and "stale" in decision.reason:
            assert "rolling name" in decision.reason, decision
        if decision.action is Action.DELETE:  # a deletion always rests on the kept files
            assert decision.needs or decision.reason.startswith("thinned"), decision


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_decide(row: Row) -> None:
    check(row)


@pytest.mark.parametrize("status", SKIPPED, ids=lambda s: s.value)
@pytest.mark.parametrize("keep_full", [1, 2])
def test_what_is_not_an_intact_full_checkpoint_never_counts_nor_goes(
    status: Status, keep_full: int
) -> None:
    """It claims the highest epoch and the freshest mtime, and is old, unpinned, one link:
    everything that would make a full checkpoint count.  It still neither counts toward N nor
    is deleted, and the N newest *intact* full checkpoints stay."""
    problem = "not a zip archive" if status is Status.UNUSABLE else None
    impostor = other("impostor.pt", status, epoch=99, mtime_ns=OLD + 60 * SECOND, problem=problem)
    fulls = [full(f"e{n}.pt", n) for n in (1, 2, 3)]
    expected = [("impostor.pt", "skip", SKIPPED[status])]
    for n in (1, 2, 3):
        action = "extract" if n > 3 - keep_full else "extract+delete"
        expected.append((f"e{n}.pt", action, f"(epoch {n})"))
    check(Row([impostor, *fulls], expected, keep_full=keep_full))


def test_only_the_files_a_deletion_counts_on_need_verifying() -> None:
    """Lazy verification: the kept files are checked only when something is to be deleted."""
    unverified = [full("e3.pt", 3, verified=False), full("e2.pt", 2, verified=False)]
    rules = Rules(keep_full=1, min_age_seconds=0)
    decisions = decide(unverified, rules, now_ns=NOW)
    assert needs_verification(unverified, decisions) == {"e3.pt"}
    assert decisions[1].needs == ("e3.pt",)
    only = [full("e3.pt", 3, verified=False)]
    assert needs_verification(only, decide(only, rules, now_ns=NOW)) == set()


def test_a_corrupt_newest_justifies_nothing() -> None:
    """Once verification finds the newest corrupt (it becomes unusable), the next one is kept."""
    files = [
        other("e3.pt", Status.UNUSABLE, problem="CRC mismatch in record 'archive/data/0'"),
        full("e2.pt", 2),
        full("e1.pt", 1),
    ]
    check(
        Row(
            files,
            [
                ("e3.pt", "skip", "CRC mismatch"),
                ("e2.pt", "extract", "the newest intact"),
                ("e1.pt", "extract+delete", "(epoch 1)"),
            ],
            keep_full=1,
        )
    )


@pytest.mark.parametrize("keep_full", [0, -1])
def test_keep_full_below_one_is_refused(keep_full: int) -> None:
    with pytest.raises(ValueError, match="keep_full"):
        decide([full("a.pt", 1)], Rules(keep_full=keep_full, min_age_seconds=0), now_ns=NOW)
