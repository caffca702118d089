"""The retention policy as a pure function: table-driven, no files, ``now`` passed in.

Each row gives one run folder's candidates and the decision expected for every file, as
``(name, action, reason substring)``.  Actions are written as the plan states them:
``extract`` (copy written, full file stays), ``keep``, ``skip``, ``delete`` (copy already
present and verified, so only deleted) and ``extract+delete`` (copy written first, then deleted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import pytest

from sweeper.policy import Action, Candidate, Decision, Status, decide

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
            ("checkpoint_epoch_8.pt", "extract+delete", "older than the 1 newest"),
            ("checkpoint_epoch_9.pt", "extract+delete", "(epoch 9)"),
        ],
        keep_full=1,
    ),
    "N newest by epoch, whatever the mtimes say": Row(
        [
            full("a.pt", 12, mtime_ns=OLD),
            full("b.pt", 3, mtime_ns=OLD + 9 * SECOND),
            full("c.pt", 11, mtime_ns=OLD + 5 * SECOND),
            full("d.pt", 4, mtime_ns=OLD + 7 * SECOND),
        ],
        [
            ("a.pt", "extract", "kept: the newest intact full checkpoint (epoch 12)"),
            ("b.pt", "extract+delete", "demoted: older than the 2 newest"),
            ("c.pt", "extract", "kept: one of the 2 newest intact full checkpoints (epoch 11)"),
            ("d.pt", "extract+delete", "(epoch 4); inference copy written first"),
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
            ("step_200.pt", "extract+delete", "(step 200)"),
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
            ("older_epoch_newest_mtime.pt", "extract+delete", "(epoch 6)"),
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
    "restarted run: a lower epoch written later still loses": Row(
        [
            full("run_epoch_5.pt", 5, mtime_ns=OLD),
            full("run_epoch_3.pt", 3, mtime_ns=OLD + 3600 * SECOND),  # resumed from epoch 2
            full("run_epoch_4.pt", 4, mtime_ns=OLD - 3600 * SECOND),
        ],
        [
            ("run_epoch_5.pt", "extract", "the newest intact full checkpoint (epoch 5)"),
            ("run_epoch_3.pt", "extract+delete", "(epoch 3)"),
            ("run_epoch_4.pt", "extract", "one of the 2 newest intact full checkpoints (epoch 4)"),
        ],
    ),
    "copied files: fresh mtimes in the wrong order, epochs decide": Row(
        [
            full("e1.pt", 1, mtime_ns=NOW - 10 * SECOND),
            full("e2.pt", 2, mtime_ns=NOW - 30 * SECOND),
            full("e3.pt", 3, mtime_ns=NOW - 20 * SECOND),
        ],
        [
            ("e1.pt", "extract+delete", "(epoch 1)"),
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
        [full("only.pt", 1, copy_exists=True, copy_matches=True)],
        [("only.pt", "keep", "kept: the newest intact full checkpoint (epoch 1)")],
        keep_full=1,
        min_age_seconds=0,
    ),
    # --- protections for files older than the N newest -----------------------------------
    "min_age_seconds: exactly that old may go, one nanosecond younger may not": Row(
        [
            full("newest.pt", 9),
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
            full(
                "kept.pt", 1, pinned="pinned by kept.pt.keep", copy_exists=True, copy_matches=True
            ),
        ],
        [("newest.pt", "extract", "newest"), ("kept.pt", "keep", "pinned by kept.pt.keep")],
        keep_full=1,
    ),
    "more than one hard link": Row(
        [full("newest.pt", 9), full("linked.pt", 1, nlink=2)],
        [("newest.pt", "extract", "newest"), ("linked.pt", "extract", "has 2 hard links")],
        keep_full=1,
    ),
    # --- the inference copy beside an older checkpoint -----------------------------------
    "existing copy: matches -> delete only; differs -> keep; missing -> write, then delete": Row(
        [
            full("newest.pt", 9),
            full("matches.pt", 3, copy_exists=True, copy_matches=True),
            full("differs.pt", 2, copy_exists=True, copy_matches=False),
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
            full("a.pt", 3, copy_exists=True, copy_matches=True),
            full("b.pt", 2, copy_exists=True, copy_matches=False),
            full("c.pt", 1),
        ],
        [
            ("a.pt", "keep", "inference copy present"),
            ("b.pt", "keep", "b_inference.pt exists and differs"),
            ("c.pt", "extract", "inference copy to write"),
        ],
        keep_full=3,
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
    decisions = decide(
        row.candidates,
        keep_full=row.keep_full,
        min_age_seconds=row.min_age_seconds,
        now_ns=row.now_ns,
        settle_seconds=row.settle_seconds,
    )
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


@pytest.mark.parametrize("keep_full", [0, -1])
def test_keep_full_below_one_is_refused(keep_full: int) -> None:
    with pytest.raises(ValueError, match="keep_full"):
        decide([full("a.pt", 1)], keep_full=keep_full, min_age_seconds=0, now_ns=NOW)
