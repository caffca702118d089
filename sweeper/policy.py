"""Retention: a pure function from one run folder's checkpoints to a decision for each.

No I/O and no clock: ``now_ns`` is passed in.  Every decision carries its reason in words.

Keep rules are a union (as Orbax's preservation policies): a full checkpoint stays full when
any rule keeps it.  Only *counted* checkpoints take part in the rules: intact full checkpoints
owned by the run folder's owner, with one link, not under a rolling name.  Everything else is
never deleted by them.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class Action(enum.Enum):
    EXTRACT = "extract"  # write the inference copy; the full checkpoint stays
    DELETE = "delete"  # demote: make sure the inference copy exists and verifies, then delete
    REFRESH = "refresh"  # replace a stale inference copy with a current one; the full stays
    KEEP = "keep"  # nothing to do
    SKIP = "skip"  # not a usable full checkpoint; reported, never touched


class Status(enum.Enum):
    FULL = "full"  # complete full training checkpoint (intact once ``verified``)
    INFERENCE = "inference"  # content is already an inference checkpoint
    WEIGHTS = "weights"  # content is bare weights
    OWN_OUTPUT = "own-output"  # named like sweeper's outputs (*_inference.*, *_weights.*)
    SYMLINK = "symlink"
    WRITING = "writing"  # a process holds it open for writing
    UNUSABLE = "unusable"  # truncated, corrupt, unsafe, unreadable, not a checkpoint


class CopyStatus(enum.Enum):
    NONE = "none"  # no file under the copy's name
    CURRENT = "current"  # the copy of this very version
    STALE = "stale"  # sweeper's copy of an earlier version of the same name: refreshed
    FOREIGN = "foreign"  # someone else's file under the copy's name: never overwritten


class BestMode(enum.Enum):
    auto = "auto"  # min for names with loss/error/perplexity/wer, else max
    max = "max"
    min = "min"


AUTO_METRICS = (
    "best_val_acc",
    "val_acc",
    "eval_accuracy",  # a Hugging Face Trainer checkpoint's evaluation at its step
    "best_val_loss",
    "val_loss",
    "eval_loss",
    "best_metric",
    "metric",
    "loss",
)
DEFAULT_ROLLING_NAMES = ("best*", "last*", "latest*", "model_best*", "*_best.*", "*_last.*")
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "wer")


@dataclass(frozen=True, slots=True)
class InferenceRules:
    """Which inference copies stay once their full checkpoint is gone (``all``: every one)."""

    all: bool = True
    last: int = 0
    best: int = 0
    every: int = 0

    def describe(self) -> str:
        if self.all:
            return "keep_inference.all"
        rules = (("last", self.last), ("best", self.best), ("every", self.every))
        parts = [f"{name}={value}" for name, value in rules if value]
        return "keep_inference " + ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Rules:
    """The retention policy; validated by :mod:`sweeper.config`."""

    keep_full: int = 2
    min_age_seconds: int = 600
    keep_best: int = 0
    best_metric: str = "auto"
    best_mode: BestMode = BestMode.auto
    keep_every: int = 0
    rolling_names: tuple[str, ...] = DEFAULT_ROLLING_NAMES
    keep_inference: InferenceRules = field(default_factory=InferenceRules)
    settle_seconds: float = 0

    def __post_init__(self) -> None:
        if self.keep_full < 1:
            raise ValueError("keep_full must be at least 1")


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
    # Its other names in this folder, when they are all its other links: an alias (timm's
    # CheckpointSaver links last.pth.tar and model_best.pth.tar to epoch files), not a file
    # shared with another folder.  Still never counted or deleted.
    aliases: tuple[str, ...] = ()
    pinned: str | None = None
    copy: CopyStatus = CopyStatus.NONE
    copy_name: str | None = None
    copy_made_here: bool = False  # a stale copy made from this folder's file of that name
    copy_pinned: bool = False  # a .keep file or a flock pins the copy itself
    copy_problem: str | None = None  # why the file under the copy's name is not this one's copy
    uid: int = 0
    metrics: tuple[tuple[str, float], ...] = ()
    verified: bool = True  # every record's CRC checked; only verified files may justify deletions
    in_use: bool = False  # some process holds it open (reading counts)
    source_name: str | None = None  # own outputs: the file of this folder it was made from
    # A checkpoint folder (sweeper.formats.layouts): its weights stay in place as its inference
    # copy; demoting it deletes only its training state, whatever keep_inference says.
    layout: str | None = None
    resumable: bool = True  # False: a folder whose interrupted demotion left part of its state
    # False: a checkpoint folder that is not one of a numbered series (checkpoint-500/,
    # checkpoint_3/) but an experiment's own save: never counted among its neighbours
    series: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    name: str
    action: Action
    reason: str
    extract_first: bool = False  # DELETE only: the copy is written (and verified) first
    # DELETE only: the files whose presence justifies it (the ones kept by the keep rules); each
    # must be verified intact before the plan counts on it, and unchanged when the deletion runs.
    needs: tuple[str, ...] = ()
    # DELETE only: files it also counts on that this run demotes (their copies are written
    # first): verified like ``needs``, not re-checked, since this run deletes them.
    counts_on: tuple[str, ...] = ()
    with_copy: bool = True  # DELETE of a full checkpoint: False when keep_inference drops its copy
    # REFRESH, or DELETE with extract_first, over a stale copy: keep the stale copy under another
    # name (it may be all that is left of those weights) instead of replacing it.  Only the copy
    # of a rolling name made from this folder's file is replaced outright.
    keep_stale: bool = False


def _progress_key(candidate: Candidate) -> tuple[int, int, int]:
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


def rolling_pattern(name: str, patterns: tuple[str, ...]) -> str | None:
    """The first ``rolling_names`` pattern ``name`` matches: a file the trainer rewrites."""
    if not _any_pattern(patterns)(name):
        return None
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


@functools.lru_cache(maxsize=16)
def _any_pattern(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled regex for all the patterns: most names match none, and say so at once."""
    if not patterns:
        return lambda name: None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


def lower_is_better(metric: str, mode: BestMode) -> bool:
    if mode is BestMode.auto:
        return any(word in metric.lower() for word in _LOWER_IS_BETTER)
    return mode is BestMode.min


def metric_value(candidate: Candidate, metric: str) -> float | None:
    """``metric`` stored at the top level, else one level down (``metrics.val_acc``)."""
    values = dict(candidate.metrics)
    value = values.get(metric)
    if value is None:
        value = next((v for k, v in candidate.metrics if k.endswith("." + metric)), None)
    return None if value is None or math.isnan(value) else value


def choose_metric(candidates: Sequence[Candidate], best_metric: str) -> str | None:
    """The metric keep_best ranks by: the configured name, or under ``auto`` the first of
    :data:`AUTO_METRICS` that any of these checkpoints stores."""
    names = (best_metric,) if best_metric != "auto" else AUTO_METRICS
    for name in names:
        if any(metric_value(c, name) is not None for c in candidates):
            return name
    return None


def _best(
    candidates: Sequence[Candidate], count: int, metric: str | None, mode: BestMode
) -> list[Candidate]:
    if count < 1 or metric is None:
        return []
    scored = [(metric_value(c, metric), c) for c in candidates]
    ranked = [(v, c) for v, c in scored if v is not None]
    low = lower_is_better(metric, mode)
    ranked.sort(key=lambda item: (item[0] if low else -item[0], -item[1].mtime_ns))
    return [c for _, c in ranked[:count]]


def _restart(counted: Sequence[Candidate]) -> str | None:
    """'restart: epochs start over at 1 after epoch 10' when a file written later stores
    less progress than one written before it."""
    highest: Candidate | None = None
    for candidate in sorted(counted, key=lambda c: c.mtime_ns):
        if candidate.epoch is None and candidate.step is None:
            continue
        if highest is not None and _progress_key(candidate)[:2] < _progress_key(highest)[:2]:
            unit, again = (
                ("epochs", candidate.epoch)
                if candidate.epoch is not None
                else ("steps", candidate.step)
            )
            return f"restart: {unit} start over at {again} after {_describe(highest)}"
        if highest is None or _progress_key(candidate)[:2] > _progress_key(highest)[:2]:
            highest = candidate
    return None


def decide(
    candidates: Sequence[Candidate],
    rules: Rules,
    *,
    now_ns: int,
    folder_uid: int | None = None,
) -> tuple[Decision, ...]:
    """Decide every file of one run folder.

    A full checkpoint stays full while any rule keeps it: among the ``keep_full`` newest by
    the epoch/step stored in it *or* among the ``keep_full`` most recently written;
    ``keep_best`` best by ``best_metric``; an epoch divisible by ``keep_every``.  Rolling names
    (``best_model.pt``, ``last.ckpt``), hard-linked files and files of another owner never
    count and are never deleted.  Every full checkpoint gets a current inference copy (a stale
    one is refreshed), unless ``keep_inference`` drops the copy of one being demoted.  Any
    other full checkpoint is deleted once its copy exists and verifies, except when it is
    younger than ``min_age_seconds``, pinned, held open, or when a foreign file holds its
    copy's name.  Copies whose full checkpoint is gone are thinned only as ``keep_inference``
    says.  Anything else (incomplete, corrupt, open for writing, not a full checkpoint) is
    skipped.  A file changed within ``settle_seconds`` is not acted on yet.
    """
    decisions: dict[str, Decision] = {}
    counted: list[Candidate] = []
    uncounted: list[tuple[Candidate, str]] = []
    partial: list[Candidate] = []  # never counted; what is left of their training state goes
    for candidate in candidates:
        if candidate.status is Status.FULL:
            age_s = (now_ns - candidate.mtime_ns) / 1e9
            rolling = rolling_pattern(candidate.name, rules.rolling_names)
            if age_s < rules.settle_seconds:
                decisions[candidate.name] = Decision(
                    candidate.name,
                    Action.SKIP,
                    f"skipped: changed {age_s:.0f} s ago, not yet quiet for "
                    f"settle_seconds={rules.settle_seconds:g}",
                )
            elif candidate.nlink > 1 and not candidate.aliases:
                # Links in other folders: a copy per link would let one file make root write
                # its weights once per folder it is linked into.
                decisions[candidate.name] = Decision(
                    candidate.name,
                    Action.KEEP,
                    f"kept: has {candidate.nlink} hard links, some outside this folder; never "
                    f"counted or deleted, and no copy written (one per link could fill the disk) "
                    f"({_describe(candidate)})",
                )
            elif candidate.nlink > 1 and candidate.name != min(
                (*candidate.aliases, candidate.name)
            ):
                first = min(candidate.aliases)
                decisions[candidate.name] = Decision(
                    candidate.name,
                    Action.KEEP,
                    f"kept: hard-linked as {', '.join(candidate.aliases)} in this folder (an "
                    f"alias); never counted or deleted; its copy is {first}'s (one copy per file, "
                    f"not per name) ({_describe(candidate)})",
                )
            elif rolling is not None:
                why = f"a rolling name (rolling_names {rolling!r}), rewritten in place"
                uncounted.append((candidate, why))
            elif candidate.nlink > 1 and candidate.aliases:
                why = f"hard-linked as {', '.join(candidate.aliases)} in this folder (an alias)"
                uncounted.append((candidate, why))
            elif candidate.nlink > 1:
                uncounted.append((candidate, f"has {candidate.nlink} hard links"))
            elif folder_uid is not None and candidate.uid != folder_uid:
                why = f"owned by uid {candidate.uid}, not the folder's owner (uid {folder_uid})"
                uncounted.append((candidate, why))
            elif not candidate.series:
                why = (
                    f"a {candidate.layout} save outside a numbered series of checkpoints (one "
                    "experiment's state, not one of a run's)"
                )
                uncounted.append((candidate, why))
            elif not candidate.resumable:  # (only what would otherwise count)
                partial.append(candidate)
            else:
                counted.append(candidate)
        elif candidate.status is Status.UNUSABLE:
            problem = candidate.problem or "unusable"
            decisions[candidate.name] = Decision(candidate.name, Action.SKIP, f"skipped: {problem}")
        elif candidate.status is Status.INFERENCE and candidate.layout is not None:
            why = f"skipped: {candidate.layout} checkpoint holding weights only (already demoted)"
            decisions[candidate.name] = Decision(candidate.name, Action.SKIP, why)
        elif candidate.status is not Status.OWN_OUTPUT:
            decisions[candidate.name] = Decision(
                candidate.name, Action.SKIP, _SKIP_REASONS[candidate.status]
            )
    for candidate, why in uncounted:
        reason = f"kept: {why}; never counted or deleted ({_describe(candidate)})"
        decisions[candidate.name] = _keep_with_copy(candidate, reason, rules)

    kept = _rule_reasons(counted, rules)
    needs = tuple(sorted(c.name for c in counted if c.name in kept))
    inference_kept = _inference_kept(counted, kept, candidates, rules, folder_uid)
    # Dropping a copy counts on the copies kept instead, as demotion counts on the full files
    # kept: those already there (re-checked before the deletion), and those this run writes
    # from checkpoints it demotes (verified, and written before any copy is dropped).
    kept_copies = [
        c.name for c in candidates if c.status is Status.OWN_OUTPUT and c.name in inference_kept
    ]
    copy_needs = tuple(sorted({*needs, *kept_copies}))
    written = tuple(
        sorted(c.name for c in counted if c.name in inference_kept and c.name not in kept)
    )
    for candidate in counted:
        if candidate.name in kept:
            reason = f"kept: {'; '.join(kept[candidate.name])} ({_describe(candidate)})"
            decisions[candidate.name] = _keep_with_copy(candidate, reason, rules)
        elif candidate.name in inference_kept:
            decisions[candidate.name] = _demote(candidate, rules, now_ns, needs)
        else:
            decisions[candidate.name] = _demote(
                candidate, rules, now_ns, copy_needs, copy_kept=False, counts_on=written
            )
    for candidate in partial:
        decisions[candidate.name] = _finish_demotion(candidate, rules, now_ns)
    _decide_own_outputs(
        candidates, decisions, inference_kept, rules, folder_uid, copy_needs, written
    )
    return tuple(decisions[c.name] for c in candidates)


def _rule_reasons(counted: Sequence[Candidate], rules: Rules) -> dict[str, list[str]]:
    """name -> the rules that keep it, in words."""
    n = rules.keep_full
    kept: dict[str, list[str]] = {}

    def add(candidate: Candidate, why: str) -> None:
        kept.setdefault(candidate.name, []).append(why)

    by_progress = sorted(counted, key=_progress_key, reverse=True)
    by_mtime = sorted(counted, key=lambda c: (c.mtime_ns, *_progress_key(c)), reverse=True)
    newest = {c.name for c in by_progress[:n]}
    restart = _restart(counted)
    for rank, candidate in enumerate(by_progress[:n]):
        add(
            candidate,
            "the newest intact full checkpoint"
            if rank == 0
            else f"one of the {n} newest intact full checkpoints",
        )
    for rank, candidate in enumerate(by_mtime[:n]):
        if candidate.name in newest:
            continue
        why = (
            "the most recently written intact full checkpoint"
            if rank == 0
            else f"one of the {n} most recently written intact full checkpoints"
        )
        add(candidate, why + (f" — {restart}" if restart else " — newest by mtime, not by epoch"))
    metric = choose_metric(counted, rules.best_metric)
    for rank, candidate in enumerate(_best(counted, rules.keep_best, metric, rules.best_mode)):
        assert metric is not None
        value = metric_value(candidate, metric)
        direction = "lowest" if lower_is_better(metric, rules.best_mode) else "highest"
        which = "the" if rank == 0 else f"one of the {rules.keep_best}"
        add(candidate, f"keep_best: {metric}={value:g}, {which} {direction}")
    if rules.keep_every > 0:
        for candidate in counted:
            if candidate.epoch is not None and candidate.epoch % rules.keep_every == 0:
                add(candidate, f"keep_every: epoch divisible by {rules.keep_every}")
    return kept


def _thinnable(copy: Candidate, folder_uid: int | None) -> bool:
    """A copy keep_inference may delete: sweeper's (it names its source), the folder owner's,
    one link, not pinned, not held open."""
    return (
        copy.source_name is not None
        and copy.nlink == 1
        and (folder_uid is None or copy.uid == folder_uid)
        and copy.pinned is None
        and not copy.in_use
    )


def _inference_kept(
    counted: Sequence[Candidate],
    kept_full: dict[str, list[str]],
    candidates: Sequence[Candidate],
    rules: Rules,
    folder_uid: int | None,
) -> set[str]:
    """Names (full checkpoints, and orphan copies) whose inference copy stays.  With
    ``keep_inference.all`` that is every one; otherwise those the rules pick among the folder's
    checkpoints whose full file is demoted or already gone."""
    names = {c.name for c in candidates}
    orphans = [
        c
        for c in candidates
        if c.status is Status.OWN_OUTPUT
        and c.source_name is not None
        and c.source_name not in names
    ]
    everything = {c.name for c in counted} | {c.name for c in orphans}
    inference = rules.keep_inference
    if inference.all:
        return everything
    pool = [c for c in counted if c.name not in kept_full] + orphans
    keep = set(kept_full)
    if inference.last > 0:
        keep |= {c.name for c in sorted(pool, key=_progress_key, reverse=True)[: inference.last]}
        # a checkpoint storing neither epoch nor step cannot be placed: its copy stays
        keep |= {c.name for c in pool if c.epoch is None and c.step is None}
    if inference.best > 0:
        metric = choose_metric(pool, rules.best_metric)
        keep |= {c.name for c in _best(pool, inference.best, metric, rules.best_mode)}
        # a rule that cannot judge a checkpoint (no such metric stored) never drops its copy
        keep |= {c.name for c in pool if metric is None or metric_value(c, metric) is None}
    if inference.every > 0:
        keep |= {c.name for c in pool if c.epoch is None or c.epoch % inference.every == 0}
    keep |= {c.name for c in counted if c.layout is not None}  # weights are never dropped
    for orphan in orphans:
        rolling = orphan.source_name and rolling_pattern(orphan.source_name, rules.rolling_names)
        if rolling or not _thinnable(orphan, folder_uid):
            keep.add(orphan.name)
    return keep


def _decide_own_outputs(
    candidates: Sequence[Candidate],
    decisions: dict[str, Decision],
    inference_kept: set[str],
    rules: Rules,
    folder_uid: int | None,
    needs: tuple[str, ...],
    counts_on: tuple[str, ...],
) -> None:
    """Sweeper's copies: skipped, unless ``keep_inference`` thins them."""
    by_name = {c.name: c for c in candidates}
    for candidate in candidates:
        if candidate.status is not Status.OWN_OUTPUT:
            continue
        source = by_name.get(candidate.source_name or "")
        thinned = _thinned(candidate, source, decisions, inference_kept, folder_uid)
        if thinned is None:
            why = _SKIP_REASONS[Status.OWN_OUTPUT]
            reason = f"{why}; {candidate.problem}" if candidate.problem else why
            decisions[candidate.name] = Decision(candidate.name, Action.SKIP, reason)
            continue
        whose, what = thinned
        decisions[candidate.name] = Decision(
            candidate.name,
            Action.DELETE,
            f"thinned: inference copy of {whose} {rules.keep_inference.describe()} ({what})",
            needs=needs,
            counts_on=counts_on,
            with_copy=False,
        )


def _thinned(
    copy: Candidate,
    source: Candidate | None,
    decisions: dict[str, Decision],
    inference_kept: set[str],
    folder_uid: int | None,
) -> tuple[str, str] | None:
    """Why ``keep_inference`` drops this copy (whose, and of what), or None: an orphan it does
    not keep, or the current copy of a checkpoint it demotes without one."""
    if copy.source_name is None:  # names no source: not ours to thin
        return None
    if source is None:  # an orphan: its full checkpoint is gone
        if copy.name in inference_kept:
            return None
        return f"{copy.source_name} (now deleted) not kept by", _describe(copy)
    demoted = decisions.get(source.name)
    if (
        demoted is not None
        and demoted.action is Action.DELETE
        and not demoted.with_copy
        and source.copy is CopyStatus.CURRENT  # a stale copy holds another version
        and copy.name == source.copy_name
        and _thinnable(copy, folder_uid)
    ):
        return f"{source.name}, demoted and not kept by", _describe(source)
    return None


def _demote(
    candidate: Candidate,
    rules: Rules,
    now_ns: int,
    needs: tuple[str, ...],
    *,
    copy_kept: bool = True,
    counts_on: tuple[str, ...] = (),
) -> Decision:
    what = _describe(candidate)
    age_s = (now_ns - candidate.mtime_ns) / 1e9
    protection = None
    if candidate.pinned:
        protection = candidate.pinned
    elif candidate.in_use:
        protection = "open by a process"
    elif age_s < rules.min_age_seconds:
        protection = (
            f"modified {age_s:.0f} s ago, younger than min_age_seconds={rules.min_age_seconds}"
        )
    if protection is not None:
        return _keep_with_copy(candidate, f"kept: {protection} ({what})", rules)
    older = (
        f"demoted: older than the {rules.keep_full} newest intact full checkpoints, by "
        f"epoch/step and by mtime{_other_rules(rules)} ({what})"
    )
    if not copy_kept:
        stale = ""
        if candidate.copy is CopyStatus.STALE:  # another version's weights: never dropped
            stale = f"; stale {candidate.copy_name} kept aside as another version's copy"
        return Decision(
            candidate.name,
            Action.DELETE,
            f"{older}; no inference copy kept ({rules.keep_inference.describe()}){stale}",
            needs=needs,
            counts_on=counts_on,
            with_copy=False,
            keep_stale=candidate.copy is CopyStatus.STALE,
        )
    if candidate.copy is CopyStatus.FOREIGN:
        return Decision(
            candidate.name,
            Action.KEEP,
            f"kept: {candidate.copy_name} exists and is not this checkpoint's copy"
            f"{_why_not(candidate)}; "
            f"never overwritten ({what})",
        )
    if candidate.copy is CopyStatus.CURRENT:
        return Decision(
            candidate.name, Action.DELETE, f"{older}; {_copy_present(candidate)}", needs=needs
        )
    first = "inference copy written first"
    keep_stale = False
    if candidate.copy is CopyStatus.STALE:
        keep_stale = _keeps_stale(candidate, rules)
        first = f"{_stale(candidate, keep_stale)} first"
    return Decision(
        candidate.name,
        Action.DELETE,
        f"{older}; {first}",
        extract_first=True,
        needs=needs,
        keep_stale=keep_stale,
    )


def _finish_demotion(candidate: Candidate, rules: Rules, now_ns: int) -> Decision:
    """A checkpoint folder without its optimizer state (an interrupted demotion deleted it
    first): no resume point, so nothing else need justify deleting the rest of its training
    state; pins, open files and min_age_seconds still protect it."""
    decision = _demote(candidate, rules, now_ns, ())
    if decision.action is not Action.DELETE:
        return decision
    why = (
        "demoted: its optimizer state is gone (an interrupted demotion), so it cannot resume; "
        f"the rest of its training state deleted, weights kept in place ({_describe(candidate)})"
    )
    return dataclasses.replace(decision, reason=why)


def _keeps_stale(candidate: Candidate, rules: Rules) -> bool:
    """A stale copy is replaced outright only when it is the copy of a rolling name made from
    this folder's file (best_model.pt rewritten in place: its old copy is what users expect to
    be replaced).  Any other (a run re-trained into the folder, a copy carried in from
    elsewhere) may be all that is left of those weights: it is kept under another name."""
    rolling = rolling_pattern(candidate.name, rules.rolling_names) is not None
    return not (rolling and candidate.copy_made_here and not candidate.copy_pinned)


def _stale(candidate: Candidate, keep_stale: bool) -> str:
    if keep_stale:
        return (
            f"stale {candidate.copy_name} kept aside as another version's copy, "
            "a fresh copy written"
        )
    return f"stale {candidate.copy_name} (made from an earlier version) refreshed"


def _other_rules(rules: Rules) -> str:
    parts = [f"keep_best={rules.keep_best}"] if rules.keep_best else []
    if rules.keep_every:
        parts.append(f"keep_every={rules.keep_every}")
    return f"; kept by none of {', '.join(parts)}" if parts else ""


def _keep_with_copy(candidate: Candidate, reason: str, rules: Rules) -> Decision:
    if candidate.copy is CopyStatus.NONE:
        return Decision(candidate.name, Action.EXTRACT, f"{reason}; inference copy to write")
    if candidate.copy is CopyStatus.CURRENT:
        if candidate.layout is not None:
            return Decision(candidate.name, Action.KEEP, f"{reason}; stays complete")
        return Decision(candidate.name, Action.KEEP, f"{reason}; inference copy present")
    if candidate.copy is CopyStatus.STALE:
        keep_stale = _keeps_stale(candidate, rules)
        return Decision(
            candidate.name,
            Action.REFRESH,
            f"{reason}; {_stale(candidate, keep_stale)}",
            keep_stale=keep_stale,
        )
    return Decision(
        candidate.name,
        Action.KEEP,
        f"{reason}; {candidate.copy_name} exists and is not this checkpoint's copy"
        f"{_why_not(candidate)}; "
        "never overwritten",
    )


def _copy_present(candidate: Candidate) -> str:
    if candidate.layout is not None:
        return "training state deleted, weights kept in place"
    return "inference copy present"


def _why_not(candidate: Candidate) -> str:
    return f" ({candidate.copy_problem})" if candidate.copy_problem else ""


def needs_verification(candidates: Sequence[Candidate], decisions: Sequence[Decision]) -> set[str]:
    """Unverified full checkpoints (and kept copies) that a planned deletion counts on: verify
    these, mark any corrupt one unusable, and decide again, until none is left."""
    checked = (Status.FULL, Status.OWN_OUTPUT)
    unverified = {c.name for c in candidates if c.status in checked and not c.verified}
    counted_on = {
        name for d in decisions if d.action is Action.DELETE for name in (*d.needs, *d.counts_on)
    }
    return counted_on & unverified
