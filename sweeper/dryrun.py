"""The one-shot dry run's JSON, made where each run folder is classified.

A forked classifier verifies what the run folder's deletions would count on, plans it, checks
each action against this process's access, and writes its entries as JSON text; the parent
only joins the pieces in walk order and adds the totals.  No run folder crosses a pipe, and no
entry outlives its piece: memory stays that of a few chunks of run folders, whatever the tree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from sweeper import report
from sweeper.intact import Verifier, verified_decisions
from sweeper.inventory import RunFolder
from sweeper.plan import plan_run
from sweeper.policy import Action, Rules
from sweeper.preflight import check_entries, is_refused

log = logging.getLogger(__name__)

_ACTIONS = tuple(action.value for action in Action)


@dataclass(frozen=True, slots=True)
class Piece:
    """One run folder's part of the dry run's JSON."""

    text: str  # its entries' JSON objects, joined by ", "
    counts: tuple[int, ...]  # entries by action, in the order of ``Action``
    expected: int  # the bytes its entries would reclaim
    refused: int  # entries that make the dry run exit 1 (refused, unreadable, no access)


def plan_piece(run: RunFolder, *, rules: Rules, now_ns: int, verifier: Verifier) -> Piece:
    """``run`` verified and planned as a sweep would (``sweeper.intact.verify_run``, then
    ``plan_run``, then the access checks of ``preflight.check_entries``), as JSON text."""
    decided = None
    try:
        run, decided = verified_decisions(run, rules, now_ns=now_ns, verifier=verifier)
    except Exception:  # one folder's unforeseen failure must not stop the sweep
        log.exception("%s: unexpected error while verifying", run.folder.display)
        # unverified: the plan deletes nothing that counts on it
    counts = dict.fromkeys(_ACTIONS, 0)
    expected = refused = 0
    texts = []
    for entry in check_entries(plan_run(run, rules, now_ns=now_ns, decided=decided)):
        texts.append(report.to_json(report.plan_entry_json(entry)))
        counts[entry.action.value] += 1
        expected += entry.reclaimed_bytes
        refused += is_refused(entry)
    return Piece(", ".join(texts), tuple(counts.values()), expected, refused)


def write_pieces(
    pieces: Iterable[Piece], problems: Sequence[tuple[str, str]], stream: TextIO
) -> int:
    """The dry run's JSON object (``report.write_streamed_plan_json``'s), written piece by
    piece; the number of refused entries.  ``problems`` is read after the last piece."""
    counts = dict.fromkeys(_ACTIONS, 0)
    expected = refused = 0
    stream.write(report.PLAN_JSON_HEAD)
    first = True
    for piece in pieces:
        if piece.text:
            stream.write(piece.text if first else ", " + piece.text)
            first = False
        for action, count in zip(_ACTIONS, piece.counts, strict=True):
            counts[action] += count
        expected += piece.expected
        refused += piece.refused
    stream.write(report.plan_json_tail(counts, expected, problems))
    return refused
