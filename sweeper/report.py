"""The presenter: turns sweeper's values into text for people and JSON for programs.

Only this module formats sizes for humans (binary units, labelled); JSON keeps raw integers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TextIO, TypeVar

from sweeper.formats.layouts import FolderCheckpoint, Part
from sweeper.logs import escape_controls
from sweeper.policy import Action
from sweeper.torchzip import Checkpoint, Kind, Mode, Provenance, key_usage

if TYPE_CHECKING:  # the sweep's modules stay unimported when extracting one file
    from sweeper.execute import SweepReport
    from sweeper.extract import ExtractResult
    from sweeper.ledger import SummaryRow
    from sweeper.plan import PlanEntry, Pressure, Purge, SweepPlan
    from sweeper.status import DaemonStatus
    from sweeper.trash import TrashItem

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_T = TypeVar("_T")


def human_size(count: int) -> str:
    """1288490188 -> '1.2 GiB' (binary units); negative sizes keep their sign."""
    sign = "-" if count < 0 else ""
    value = float(abs(count))
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def to_json(value: object) -> str:
    """Strict JSON: file names that are not UTF-8 are written with their bad bytes escaped as
    text (``\\xff``) rather than as lone surrogates, which strict parsers reject."""
    text = json.dumps(value, ensure_ascii=True)
    if "\\ud" in text:  # a lone surrogate (or a pair, cleaned the same way): clean and redo
        text = json.dumps(_clean_strings(value), ensure_ascii=True)
    return text


def _clean_strings(value: object) -> object:
    if isinstance(value, str):
        try:
            raw = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate that did not come from a file name
            raw = value.encode("utf-8", "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_clean_strings(k): _clean_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_strings(v) for v in value]
    return value


def table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> str:
    """Aligned columns; column indexes in ``right`` are right-aligned (numbers)."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def extract_json(result: ExtractResult) -> dict[str, object]:
    return {
        "source": result.source,
        "output": result.output,
        "mode": result.mode.value,
        "bytes_in": result.bytes_in,
        "bytes_out": result.bytes_out,
        "bytes_shared": result.bytes_shared,
        "bytes_deleted": result.bytes_deleted,
        "bytes_reclaimed": result.reclaimed_bytes,
        "deleted_original": result.bytes_deleted > 0,
        "seconds": round(result.seconds, 6),
        "epoch": result.epoch,
        "metrics": _metrics_json(result.metrics),
    }


def extract_text(result: ExtractResult) -> str:
    verb = "deleted the original, " if result.bytes_deleted else ""
    return (
        f"wrote {result.output} ({human_size(result.bytes_out)} of {human_size(result.bytes_in)}); "
        f"{verb}net {human_size(result.reclaimed_bytes)} reclaimed in {result.seconds:.2f} s"
    )


def _integrity(verified: bool) -> str:
    if verified:
        return "archive complete, directory consistent, every record's CRC verified"
    return (
        "archive complete, directory consistent, data.pkl CRC verified "
        "(tensor data not read; --verify reads it)"
    )


def _made_from_json(made_from: tuple[Provenance, str] | None) -> dict[str, object] | None:
    if made_from is None:
        return None
    source, state = made_from
    return {
        "name": source.name,
        "size": source.size,
        "mtime_ns": source.mtime_ns,
        "pickle_crc32": source.pickle_crc32,
        "folder": list(source.folder) if source.folder is not None else None,
        "state": state,
    }


def inspect_json(
    checkpoint: Checkpoint,
    outputs: dict[Mode, int],
    verified: bool = False,
    made_from: tuple[Provenance, str] | None = None,
) -> dict[str, object]:
    return {
        "made_from": _made_from_json(made_from),
        "path": checkpoint.path,
        "kind": checkpoint.kind.name.lower(),
        "description": checkpoint.kind.value,
        "family": checkpoint.family,
        "cannot_reduce": checkpoint.description.reason,
        "intact": True,
        "tensor_data_verified": verified,
        "integrity": _integrity(verified),
        "file_bytes": checkpoint.file_size,
        "epoch": checkpoint.epoch,
        "step": checkpoint.step,
        "metrics": _metrics_json(checkpoint.metrics),
        "keys": [
            {"key": k.key, "role": k.role, "tensor_bytes": k.tensor_bytes, "tensors": k.tensors}
            for k in key_usage(checkpoint)
        ],
        "extraction": {
            mode.value: {
                "bytes_written": size,
                "bytes_reclaimed_if_original_deleted": checkpoint.file_size - size,
            }
            for mode, size in outputs.items()
        },
    }


def _metrics_json(metrics: Sequence[tuple[str, float]]) -> dict[str, float | str]:
    """Strict JSON has no NaN or Infinity (a run's initial best loss is often inf): they are
    spelled as strings, as the ledger spells them."""
    return {key: _finite_or_name(value) for key, value in metrics}


def _finite_or_name(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


_SOURCE_STATES = {
    "current": "current (the source is still that version)",
    "stale": "STALE: the source has been rewritten since this copy was made",
    "gone": "the source is gone; this copy is all that is left of it",
    "elsewhere": "made in another folder; a file of that name here is not its source",
}


_FAMILY_NAMES = {
    "plain": "plain (model_state_dict)",
    "lightning": "PyTorch Lightning",
    "timm": "timm",
    "mmengine": "mmengine (OpenMMLab)",
    "generic": "generic (weights beside optimizer state)",
    "weights": "a bare state dict",
    "unknown": "unknown",
}


def inspect_text(
    checkpoint: Checkpoint,
    outputs: dict[Mode, int],
    verified: bool = False,
    made_from: tuple[Provenance, str] | None = None,
) -> str:
    # Key and metric names come from the file: escaped so a hostile one cannot drive the terminal.
    lines = [
        f"{printable(checkpoint.path)}: {checkpoint.kind.value}, "
        f"{human_size(checkpoint.file_size)}",
        f"  integrity: {_integrity(verified)}",
    ]
    if checkpoint.kind is not Kind.OTHER:
        lines.append(f"  layout: {_FAMILY_NAMES.get(checkpoint.family, checkpoint.family)}")
    if checkpoint.description.reason is not None:
        lines.append(f"  cannot reduce it: {printable(checkpoint.description.reason)}")
    progress = [
        (name, value)
        for name, value in (("epoch", checkpoint.epoch), ("step", checkpoint.step))
        if value is not None
    ]
    if progress:
        lines.append("  " + "  ".join(f"{name}: {value}" for name, value in progress))
    if checkpoint.metrics:
        lines.append(
            "  metrics: " + ", ".join(f"{printable(k)}={v:g}" for k, v in checkpoint.metrics)
        )
    if made_from is not None:
        source, state = made_from
        written = datetime.fromtimestamp(source.mtime_ns / 1e9, timezone.utc)
        lines.append(
            f"  made from: {printable(source.name)} ({human_size(source.size)}, modified "
            f"{written:%Y-%m-%d %H:%M:%S} UTC); {_SOURCE_STATES[state]}"
        )
    if key_usage(checkpoint):
        rows = [["key", "role", "tensors", "bytes"]]
        rows += [
            [printable(k.key), k.role, str(k.tensors), human_size(k.tensor_bytes)]
            for k in key_usage(checkpoint)
        ]
        lines += ["  " + line for line in table(rows, frozenset({2, 3})).splitlines()]
    if checkpoint.kind is Kind.FULL:
        for mode, size in outputs.items():
            lines.append(
                f"  {'inference copy' if mode is Mode.INFERENCE else 'weights only'}: "
                f"writes {human_size(size)} ({size} B), "
                f"reclaims {human_size(checkpoint.file_size - size)} "
                f"({checkpoint.file_size - size} B) if the original is deleted"
            )
    return "\n".join(lines)


def plan_entry_json(entry: PlanEntry) -> dict[str, object]:
    return {
        "path": entry.path,
        "root": entry.root,
        "action": entry.action.value,
        "reason": entry.reason,
        "bytes": entry.size,
        "output": entry.output,
        "bytes_written": entry.bytes_written,
        "bytes_deleted": entry.bytes_deleted,
        "reclaimed_bytes": entry.reclaimed_bytes,
        "epoch": entry.epoch,
        **({"trash": True, "undo_seconds": entry.undo_seconds} if entry.trash else {}),
    }


def purge_json(purge: Purge) -> dict[str, object]:
    item = purge.item
    return {
        "path": item.path,
        "root": item.root,
        "in_trash": item.trash_path,
        "reason": purge.reason,
        "bytes": item.size,
        "reclaimed_bytes": item.size,
        "trashed": item.trashed,
        "purge_after": item.purge_after,
    }


def trash_item_json(item: TrashItem) -> dict[str, object]:
    from sweeper.ledger import user_name

    return {
        "path": item.path,
        "root": item.root,
        "in_trash": item.trash_path,
        "owner": user_name(item.uid),
        "uid": item.uid,
        "bytes": item.size,
        "trashed": item.trashed,
        "purge_after": item.purge_after,
        "run_id": item.run_id,
    }


def trash_text(items: Sequence[TrashItem]) -> str:
    """``sweeper trash`` for people: what is held, oldest first, and when it goes."""
    from sweeper.ledger import user_name

    if not items:
        return "the trash holds nothing"
    rows = [["PURGED AFTER", "SIZE", "OWNER", "RUN", "FILE"]] + [
        [
            _when(item.purge_after),
            human_size(item.size),
            printable(user_name(item.uid)),
            item.run_id,
            printable(item.path),
        ]
        for item in items
    ]
    total = sum(item.size for item in items)
    return table(rows, frozenset({1})) + (
        f"\nheld: {_files(len(items))}, {human_size(total)} ({total} bytes)"
    )


def restore_text(done: Sequence[tuple[TrashItem, bool, str]]) -> str:
    if not done:
        return "nothing restored"
    return "\n".join(
        f"restored: {printable(item.path)}"
        if ok
        else f"NOT restored: {printable(item.path)}: {printable(detail)}"
        for item, ok, detail in done
    )


def trash_lines(plan: SweepPlan) -> list[str]:
    """What a plan does with the trash: files it moves in (not yet freed), files it purges."""
    lines = []
    trashed = [e for e in plan.entries if e.trash and e.action is Action.DELETE]
    if trashed:
        lines.append(
            f"into the trash: {_files(len(trashed))}, {human_size(plan.trashed_bytes)} "
            f"({plan.trashed_bytes} bytes), freed when purged (undo_seconds)"
        )
    for purge in plan.purges:
        lines.append(
            f"purge: {printable(purge.item.path)} ({human_size(purge.item.size)}): "
            f"{printable(purge.reason)}"
        )
    return lines


def pressure_json(pressure: Pressure) -> dict[str, object]:
    return {
        "filesystem": pressure.space.filesystem,
        "free_bytes": pressure.space.free_bytes,
        "total_bytes": pressure.space.total_bytes,
        "needed_bytes": pressure.needed_bytes,
        "keep_full": pressure.keep_full,
    }


def pressure_lines(pressures: Iterable[Pressure]) -> list[str]:
    """One line per filesystem a plan was made for under disk pressure."""
    return [
        f"disk pressure on {printable(p.space.filesystem)}: {human_size(p.space.free_bytes)} "
        f"free of {human_size(p.space.total_bytes)}; planned with keep_full={p.keep_full}, "
        f"largest run folders first, to free {human_size(p.needed_bytes)} "
        f"({p.needed_bytes} bytes)"
        for p in pressures
    ]


def write_streamed_plan_json(
    entries: Iterable[PlanEntry],
    problems: Sequence[tuple[str, str]],
    stream: TextIO,
    *,
    pressure: Sequence[Pressure] = (),
    purges: Sequence[Purge] = (),
) -> None:
    """The dry run's JSON object, written as the entries are planned: the totals come last,
    so no entry is held after it is written."""
    counts = dict.fromkeys((action.value for action in Action), 0)
    expected = 0
    stream.write(PLAN_JSON_HEAD)
    for index, entry in enumerate(entries):
        stream.write((", " if index else "") + to_json(plan_entry_json(entry)))
        counts[entry.action.value] += 1
        expected += entry.reclaimed_bytes
    stream.write(plan_json_tail(counts, expected, problems, pressure=pressure, purges=purges))


PLAN_JSON_HEAD = '{"dry_run": true, "entries": ['


def plan_json_tail(
    counts: dict[str, int],
    expected: int,
    problems: Sequence[tuple[str, str]],
    *,
    pressure: Sequence[Pressure] = (),
    purges: Sequence[Purge] = (),
) -> str:
    """The end of the dry run's JSON object, after its entries: the totals and problems."""
    tail: dict[str, object] = {
        "expected_reclaimed_bytes": expected,
        "counts": counts,
        "problems": [{"path": path, "reason": reason} for path, reason in problems],
    }
    if pressure:
        tail["pressure"] = [pressure_json(p) for p in pressure]
    if purges:
        tail["purges"] = [purge_json(p) for p in purges]
        tail["expected_reclaimed_bytes"] = expected + sum(p.reclaimed_bytes for p in purges)
    return "], " + to_json(tail)[1:] + "\n"


OWN_OUTPUT = "skipped: sweeper's own output"


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``epoch_2`` before ``epoch_10``: runs of digits compare as numbers."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.casefold())
        for part in re.split(r"(\d+)", text)
        if part
    )


def shorten_middle(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, its middle replaced by an ellipsis: a long
    path keeps its root and its file name."""
    if width <= 0 or len(text) <= width:
        return text
    if width < 5:
        return text[:width]
    keep = width - 1
    return text[: keep // 2] + "…" + text[len(text) - (keep - keep // 2) :]


def shorten_end(text: str, width: int) -> str:
    if width <= 0 or len(text) <= width:
        return text
    return text[: max(0, width - 1)] + "…"


@dataclass(frozen=True)
class _Group:
    """The rows of one run folder, and how many of sweeper's own outputs were folded away."""

    folder: str
    rows: tuple[tuple[str, ...], ...]
    folded: int = 0


def _fit(widths: list[int], flexible: Sequence[int], room: int) -> list[int]:
    """Column widths that fit ``room`` characters (separators included), shrinking only the
    ``flexible`` columns (each to no less than 8), the widest first."""
    widths = list(widths)
    excess = sum(widths) + 2 * (len(widths) - 1) - room
    while excess > 0:
        column = max(flexible, key=lambda i: widths[i])
        if widths[column] <= 8:
            break
        cut = min(excess, widths[column] - 8, max(1, (widths[column] - 8 + 1) // 2))
        widths[column] -= cut
        excess -= cut
    return widths


def _grouped_table(
    header: Sequence[str],
    groups: Sequence[_Group],
    *,
    right: frozenset[int],
    middle: frozenset[int],
    width: int | None,
) -> list[str]:
    """One table, its rows grouped under a line naming their run folder; ``width`` (None: no
    limit) is the terminal's, which long cells are shortened to fit: those in ``middle`` in
    the middle (paths, names), the others at the end."""
    indent = "  "
    rows = [tuple(header), *(row for group in groups for row in group.rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    if width is not None:
        flexible = [i for i in range(len(header)) if i not in right and i != 0]
        widths = _fit(widths, flexible, width - len(indent))

    def line(row: Sequence[str]) -> str:
        cells = []
        for i, cell in enumerate(row):
            cell = shorten_middle(cell, widths[i]) if i in middle else shorten_end(cell, widths[i])
            cells.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return (indent + "  ".join(cells)).rstrip()

    lines = [line(header)]
    for group in groups:
        folder = group.folder.rstrip("/") + "/"
        lines.append(shorten_middle(folder, width) if width is not None else folder)
        lines += [line(row) for row in group.rows]
        if group.folded:
            many = "s" if group.folded != 1 else ""
            lines.append(
                f"{indent}+ {group.folded} of sweeper's own output{many} (--all lists them)"
            )
    return lines


def _by_folder(
    items: Iterable[_T], folder: Callable[[_T], str], name: Callable[[_T], str]
) -> list[tuple[str, list[_T]]]:
    """``items`` grouped by run folder, folders and names in natural order."""
    groups: dict[str, list[_T]] = {}
    for item in items:
        groups.setdefault(folder(item), []).append(item)
    return [
        (key, sorted(groups[key], key=lambda item: natural_key(name(item))))
        for key in sorted(groups, key=natural_key)
    ]


def plan_text(plan: SweepPlan, *, width: int | None = None, show_all: bool = False) -> str:
    """The plan for people: one table grouped by run folder, in natural order, sweeper's own
    outputs folded into a count per folder unless ``show_all``, then the problems, the totals
    and what each owner would get back."""
    groups = []
    for folder, entries in _by_folder(plan.entries, lambda e: e.folder.display, lambda e: e.name):
        shown = [e for e in entries if show_all or e.reason != OWN_OUTPUT]
        rows = tuple(
            (
                entry.action.value,
                human_size(entry.reclaimed_bytes) if entry.reclaimed_bytes else "-",
                printable(entry.name),
                printable(entry.reason),
            )
            for entry in shown
        )
        groups.append(_Group(printable(folder), rows, len(entries) - len(shown)))
    lines = (
        _grouped_table(
            ("ACTION", "RECLAIM", "FILE", "REASON"),
            groups,
            right=frozenset({1}),
            middle=frozenset({2}),
            width=width,
        )
        if plan.entries
        else ["no checkpoints found"]
    )
    lines = pressure_lines(plan.pressure) + lines
    lines += [f"problem: {printable(path)}: {printable(reason)}" for path, reason in plan.problems]
    lines += trash_lines(plan)
    counts = ", ".join(f"{plan.count(a)} {a.value}" for a in Action)
    lines.append(
        f"plan: {counts}; expected to reclaim {human_size(plan.expected_reclaimed_bytes)} "
        f"({plan.expected_reclaimed_bytes} bytes)"
    )
    owners = owner_totals(plan.entries)
    if owners:
        lines.append("what each owner would get back:")
        owner_rows = [["OWNER", "FILES", "RECLAIM"]] + [
            [printable(owner), str(files), human_size(reclaimed)]
            for owner, files, reclaimed in owners
        ]
        lines += ["  " + line for line in table(owner_rows, frozenset({1, 2})).splitlines()]
    return "\n".join(lines)


def owner_totals(entries: Iterable[PlanEntry]) -> list[tuple[str, int, int]]:
    """(owner, files acted on, bytes reclaimed) for each owner of a file the plan writes or
    deletes, most reclaimed first."""
    from sweeper.ledger import user_name

    totals: dict[int, tuple[int, int]] = {}
    for entry in entries:
        if entry.action in (Action.KEEP, Action.SKIP):
            continue
        files, reclaimed = totals.get(entry.uid, (0, 0))
        totals[entry.uid] = (files + 1, reclaimed + entry.reclaimed_bytes)
    named = [(user_name(uid), files, reclaimed) for uid, (files, reclaimed) in totals.items()]
    return sorted(named, key=lambda row: (-row[2], natural_key(row[0])))


def sweep_json(plan: SweepPlan, result: SweepReport) -> dict[str, object]:
    return {
        "dry_run": False,
        "expected_reclaimed_bytes": plan.expected_reclaimed_bytes,
        "reclaimed_bytes": result.reclaimed_bytes,
        "failures": result.failures,
        "interrupted": result.interrupted,
        "counts": {action.value: plan.count(action) for action in Action},
        "outcomes": [
            {
                **plan_entry_json(o.entry),
                "ok": o.ok,
                "detail": o.detail,
                "bytes_written": o.bytes_written,
                "bytes_deleted": o.bytes_deleted,
                "reclaimed_bytes": o.reclaimed_bytes,
            }
            for o in result.outcomes
        ],
        "problems": [{"path": path, "reason": reason} for path, reason in plan.problems],
        **({"pressure": [pressure_json(p) for p in plan.pressure]} if plan.pressure else {}),
        **(
            {
                "purges": [
                    {**purge_json(done.purge), "ok": done.ok, "detail": done.detail}
                    for done in result.purged
                ]
            }
            if result.purged
            else {}
        ),
    }


def sweep_text(plan: SweepPlan, result: SweepReport, *, width: int | None = None) -> str:
    """What a sweep did, grouped by run folder in natural order, then problems and totals."""
    groups = [
        _Group(
            printable(folder),
            tuple(
                (
                    ("ok " if o.ok else "FAIL ") + o.entry.action.value,
                    human_size(o.reclaimed_bytes),
                    printable(o.entry.name),
                    printable(o.detail),
                )
                for o in outcomes
            ),
        )
        for folder, outcomes in _by_folder(
            result.outcomes, lambda o: o.entry.folder.display, lambda o: o.entry.name
        )
    ]
    lines = (
        _grouped_table(
            ("RESULT", "RECLAIMED", "FILE", "DETAIL"),
            groups,
            right=frozenset({1}),
            middle=frozenset({2}),
            width=width,
        )
        if result.outcomes
        else ["nothing to do"]
    )
    lines = pressure_lines(plan.pressure) + lines
    lines += [f"problem: {printable(path)}: {printable(reason)}" for path, reason in plan.problems]
    trashed = [o for o in result.outcomes if o.ok and o.entry.trash]
    if trashed:
        held = sum(o.entry.size for o in trashed)
        lines.append(
            f"into the trash: {_files(len(trashed))}, {human_size(held)} ({held} bytes), "
            "freed when purged (undo_seconds)"
        )
    lines += [
        f"{'ok' if done.ok else 'FAIL'} purge: {printable(done.purge.item.path)} "
        f"({human_size(done.purge.item.size)}): {printable(done.detail)}"
        for done in result.purged
    ]
    skipped = plan.count(Action.SKIP)
    lines.append(
        f"swept: {len(result.outcomes) - result.failures} done, {result.failures} failed, "
        f"{plan.count(Action.KEEP)} kept, {skipped} skipped; reclaimed "
        f"{human_size(result.reclaimed_bytes)} ({result.reclaimed_bytes} bytes)"
        + (" — interrupted" if result.interrupted else "")
    )
    return "\n".join(lines)


def ledger_json(rows: Sequence[SummaryRow], by: str | None) -> dict[str, object]:
    return {
        "by": by,
        "rows": [
            {
                "key": r.key,
                "count": r.count,
                "reclaimed_bytes": r.reclaimed_bytes,
                "bytes_deleted": r.bytes_deleted,
                "bytes_written": r.bytes_written,
            }
            for r in rows
        ],
        "reclaimed_bytes": sum(r.reclaimed_bytes for r in rows),
    }


def ledger_text(rows: Sequence[SummaryRow], by: str | None) -> str:
    header = [(by or "total").upper(), "ACTIONS", "RECLAIMED", "DELETED", "WRITTEN"]
    body = [
        [
            printable(r.key),
            str(r.count),
            human_size(r.reclaimed_bytes),
            human_size(r.bytes_deleted),
            human_size(r.bytes_written),
        ]
        for r in rows
    ]
    return table([header, *body], frozenset({1, 2, 3, 4})) if body else "ledger is empty"


_EIGHTHS = " ▏▎▍▌▋▊▉"


def _bar(value: int, scale: int, width: int) -> str:
    """A horizontal bar of ``value`` against ``scale`` filling ``width`` cells, in eighths of a
    cell; anything above zero shows at least an eighth, nothing at or below zero shows."""
    if value <= 0 or scale <= 0:
        return ""
    eighths = max(1, round(value / scale * width * 8))
    full, part = divmod(min(eighths, width * 8), 8)
    return "█" * full + (_EIGHTHS[part] if part else "")


def with_missing_days(rows: Sequence[SummaryRow]) -> list[SummaryRow]:
    """Day rows with the days between them that had nothing filled in as zeros, so a chart's
    rows are evenly spaced in time (up to about a year and a half of them)."""
    from datetime import date, timedelta

    from sweeper.ledger import SummaryRow

    try:
        days = [date.fromisoformat(row.key) for row in rows]
    except ValueError:  # compacted by month, or a key that is not a day
        return list(rows)
    if not days or (max(days) - min(days)).days > 550:
        return list(rows)
    known = {row.key: row for row in rows}
    filled = []
    day = min(days)
    while day <= max(days):
        key = day.isoformat()
        filled.append(known.get(key, SummaryRow(key, 0, 0, 0, 0)))
        day += timedelta(days=1)
    return filled


def ledger_chart(rows: Sequence[SummaryRow], by: str, width: int = 80) -> str:
    """The totals as a horizontal bar chart of bytes reclaimed, fitted to ``width`` columns:
    one row per day (days without records too, as zeros), or per owner or root, most first;
    then the total."""
    if by == "day":
        rows = with_missing_days(rows)
    else:  # who (or where) got the most back first
        rows = sorted(rows, key=lambda row: -row.reclaimed_bytes)
    if not rows:
        return "ledger is empty"
    keys = [printable(row.key) for row in rows]
    sizes = [human_size(row.reclaimed_bytes) for row in rows]
    key_width = min(max(len(key) for key in keys), max(10, width // 3))
    size_width = max(len(size) for size in sizes)
    bar_width = max(10, width - key_width - size_width - 4)
    scale = max(row.reclaimed_bytes for row in rows)
    lines = [f"{by.upper():<{key_width}}  RECLAIMED"]
    for key, size, row in zip(keys, sizes, rows, strict=True):
        bar = _bar(row.reclaimed_bytes, scale, bar_width)
        label = shorten_middle(key, key_width)
        lines.append(f"{label:<{key_width}}  {bar:<{bar_width}}  {size:>{size_width}}")
    total = sum(row.reclaimed_bytes for row in rows)
    lines.append(f"total: {human_size(total)} reclaimed ({total} bytes)")
    return "\n".join(lines)


def printable(text: str) -> str:
    """A path safe to print on a terminal: undecodable bytes and control characters escaped."""
    return escape_controls(text)


def _parts_json(parts: Sequence[Part]) -> list[dict[str, object]]:
    return [{"name": part.name, "bytes": part.size} for part in parts]


def folder_json(found: FolderCheckpoint, path: str, verified: bool) -> dict[str, object]:
    """``inspect --json`` of a checkpoint folder."""
    return {
        "path": path,
        "kind": found.kind.name.lower(),
        "description": found.kind.value,
        "family": found.layout,
        "cannot_reduce": found.problem if found.kind is Kind.UNREDUCIBLE else None,
        "problem": found.problem if found.kind is Kind.OTHER else None,
        "intact": found.problem is None,
        "verified": verified and found.problem is None,
        "folder_bytes": found.size,
        "epoch": found.epoch,
        "step": found.step,
        "metrics": _metrics_json(found.metrics),
        "best_model_checkpoint": found.best,
        "weights": _parts_json(found.weights),
        "training_state": _parts_json(found.training),
        "kept": _parts_json(found.others),
        "bytes_reclaimed_if_demoted": found.training_bytes,
    }


def folder_text(found: FolderCheckpoint, path: str, verified: bool) -> str:
    """``inspect`` of a checkpoint folder, for people (names escaped: they come from disk)."""
    lines = [f"{printable(path)}/: {found.layout} checkpoint folder, {found.kind.value}"]
    if found.kind is Kind.UNREDUCIBLE:
        lines.append(f"  cannot reduce it: {printable(found.problem or '')}")
    elif found.problem is not None:
        lines.append(f"  not usable: {printable(found.problem)}")
    elif verified:
        lines.append("  integrity: every part checked (safetensors by its rules, zips by CRC)")
    progress = [(n, v) for n, v in (("epoch", found.epoch), ("step", found.step)) if v is not None]
    if progress:
        lines.append("  " + "  ".join(f"{name}: {value}" for name, value in progress))
    if found.metrics:
        lines.append("  metrics: " + ", ".join(f"{printable(k)}={v:g}" for k, v in found.metrics))
    if found.best is not None:
        lines.append(f"  best_model_checkpoint: {printable(found.best)}")
    for title, parts in (
        ("weights (kept)", found.weights),
        ("training state (deleted on demotion)", found.training),
        ("kept as is", found.others),
    ):
        if parts:
            sizes = ", ".join(f"{printable(p.name)} {human_size(p.size)}" for p in parts)
            lines.append(f"  {title}: {sizes}")
    if found.kind is Kind.FULL:
        lines.append(
            f"  demotion reclaims {human_size(found.training_bytes)} ({found.training_bytes} B)"
        )
    return "\n".join(lines)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _files(count: int) -> str:
    return _plural(count, "file")


def status_phase(status: DaemonStatus) -> str:
    """What the daemon is doing, in words: the catch-up sweep, watching, or working on what."""
    if status.phase == "stopped":
        return "stopped"
    if status.working_on and status.phase != "catch-up":
        first, more = status.working_on[0], len(status.working_on) - 1
        what = "a full scan of every root" if first == "every root" else printable(first)
        return f"working on {what}" + (f" (and {more} more)" if more else "")
    return "catch-up sweep" if status.phase == "catch-up" else "watching"


def status_line(status: DaemonStatus) -> str:
    """The one line systemd shows (``STATUS=``): the same words as ``sweeper status``."""
    line = (
        f"{status_phase(status)}; {status.queued} queued, {status.settling} settling; "
        f"{status.total_files} files acted on, {status.failed} failed; reclaimed "
        f"{human_size(status.today_bytes)} today, {human_size(status.total_bytes)} in total"
    )
    if status.pressure:
        line = f"DISK PRESSURE on {printable(', '.join(status.pressure))}; {line}"
    if status.not_acting is not None:
        line = f"NOT ACTING: {printable(status.not_acting)}; {line}"
    return line


def status_text(status: DaemonStatus, running: bool) -> str:
    """``sweeper status`` for people."""
    state = (
        f"running since {_when(status.started)} (pid {status.pid})"
        if running
        else f"not running (last seen {_when(status.updated)}, pid {status.pid})"
    )
    lines = [f"sweeper watch: {state}"]
    if status.not_acting is not None:
        lines.append(f"NOT ACTING: {printable(status.not_acting)}")
    lines.append(f"phase: {status_phase(status) if running else 'stopped'}")
    lines.append(
        f"queue: {_plural(status.queued, 'folder')} queued, "
        f"{_plural(status.settling, 'file')} settling"
    )
    if status.last_full_scan is not None and status.last_full_scan_seconds is not None:
        lines.append(
            f"last full scan: {_when(status.last_full_scan)}, "
            f"took {_duration(status.last_full_scan_seconds)}"
        )
    else:
        lines.append("last full scan: none finished yet")
    lines.append(
        f"reclaimed: {human_size(status.today_bytes)} today ({_files(status.today_files)}), "
        f"{human_size(status.total_bytes)} in total ({_files(status.total_files)}); "
        f"{status.failed} failed"
    )
    if status.last_error is not None and status.last_error_time is not None:
        lines.append(f"last error: {_when(status.last_error_time)} {printable(status.last_error)}")
    else:
        lines.append("last error: none")
    for root, why in status.polled:
        lines.append(f"polled, not watched: {printable(root)} ({printable(why)})")
    for name, free, total, active in status.filesystems:
        lines.append(
            f"disk: {printable(name)}: {human_size(free)} free of {human_size(total)}"
            + ("; UNDER PRESSURE: sweeping at the harder pace" if active else "")
        )
    return "\n".join(lines)


def status_json(status: DaemonStatus, running: bool) -> dict[str, object]:
    return {"running": running, **status.to_json()}
