"""The command line: argparse, one function per command returning an exit code.

The one place that maps exceptions to exit codes: 0 ok, 1 finished but some items failed,
2 usage or configuration error, 3 no daemon running (``status``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import logging
import os
import re
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from datetime import time as dt_time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from sweeper import __version__, report, torchzip
from sweeper.errors import (
    AlreadyRunning,
    ConfigError,
    FileRefused,
    NotRunning,
    SweeperError,
    UsageError,
)
from sweeper.extract import (
    Located,
    extract,
    folder_identity,
    is_copy_of,
    open_regular,
    output_name,
    source_state,
)
from sweeper.logs import configure_logging
from sweeper.torchzip import Mode

if TYPE_CHECKING:  # the sweep's and the daemon's modules load only for their commands
    from sweeper.config import Settings
    from sweeper.execute import SweepReport
    from sweeper.plan import Pressure, SweepPlan

log = logging.getLogger("sweeper")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def _open_dir(path: str) -> int:
    return os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _locate_source(path: str) -> Located:
    if path.endswith("/"):
        raise FileRefused(path, "not a regular file (a directory)")
    parent, name = os.path.split(path)
    try:
        return Located(_open_dir(parent), name, path)
    except OSError as error:
        raise FileRefused(path, f"cannot open its folder: {error.strerror}") from None


def _locate_target(source: str, out: str | None, mode: Mode) -> Located:
    if out is None:
        parent, name = os.path.split(source)
        target = os.path.join(parent, output_name(name, mode))
    elif os.path.isdir(out):
        target = os.path.join(out, output_name(os.path.basename(source), mode))
    else:
        target = out
    parent, name = os.path.split(target)
    try:
        return Located(_open_dir(parent), name, target)
    except OSError as error:
        raise FileRefused(target, f"cannot open the output folder: {error.strerror}") from None


def cmd_extract(args: argparse.Namespace) -> int:
    mode = Mode.WEIGHTS if args.weights_only else Mode.INFERENCE
    source = _locate_source(args.src)
    try:
        target = _locate_target(args.src, args.output, mode)
    except BaseException:
        os.close(source.dir_fd)
        raise
    try:
        same = os.stat(target.name, dir_fd=target.dir_fd, follow_symlinks=False)
        here = os.stat(source.name, dir_fd=source.dir_fd, follow_symlinks=False)
        if (same.st_dev, same.st_ino) == (here.st_dev, here.st_ino):
            raise FileRefused(args.src, "the output path is the source itself")
        if stat.S_ISDIR(same.st_mode):
            raise FileRefused(target.display, "output path is a directory")
        if not args.force and is_copy_of(target, source, mode) is None:
            # only sweeper's own copy of this very file is rewritten without being told to
            raise FileRefused(target.display, "exists; not replaced (--force replaces it)")
    except FileNotFoundError:
        pass
    except FileRefused:
        os.close(source.dir_fd)
        os.close(target.dir_fd)
        raise
    try:
        # Without --force a file that appears at OUT meanwhile is not replaced either.
        # Without --force, the proven copy is replaced only while the name still holds it.
        ours = None if args.force else is_copy_of(target, source, mode)
        result = extract(
            source,
            target,
            mode,
            delete_source=args.delete_original,
            replace=args.force,
            replacing=ours,
        )
    finally:
        os.close(source.dir_fd)
        os.close(target.dir_fd)
    if args.json:
        _print(report.to_json(report.extract_json(result)))
    else:
        _print(report.extract_text(result))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from sweeper.inventory import limit_reading_memory, warn_if_memory_unlimited
    from sweeper.workers import READER_MEMORY_LIMIT, WorkerDied, WorkerPool

    # Read in a forked worker under an address-space limit: a file that demands more memory is
    # refused there, and this process stays small.  (inspect reads no config: the default.)
    warn_if_memory_unlimited(READER_MEMORY_LIMIT)
    pool: WorkerPool[tuple[str, bool], _Inspected] = WorkerPool(
        1, _inspect_in_worker, functools.partial(limit_reading_memory, READER_MEMORY_LIMIT)
    )
    failed = 0
    for (path, _), result in pool.map([(path, args.verify) for path in args.files]):
        if isinstance(result, WorkerDied):
            result = _Inspected(path, refused=f"refused: reading it failed ({result.how})")
        if result.refused is not None:
            failed += 1
            log.error("%s: %s", result.path, result.refused)
            if args.json:
                _print(
                    report.to_json(
                        {"path": path, "kind": "invalid", "intact": False, "error": result.refused}
                    )
                )
            continue
        _print(report.to_json(result.data) if args.json else result.text)
    return EXIT_FAILED if failed else EXIT_OK


@dataclass(frozen=True)
class _Inspected:
    """What inspecting one file gave, as its worker sends it back."""

    path: str  # the file the answer is about
    text: str = ""
    data: dict[str, object] = field(default_factory=dict)
    refused: str | None = None  # why it could not be inspected


def _inspect_in_worker(task: tuple[str, bool]) -> _Inspected:
    path, verify = task
    try:
        text, data = _inspect_one(path, verify)
    except FileRefused as error:
        return _Inspected(error.path, refused=error.reason)
    except MemoryError:
        return _Inspected(path, refused=torchzip.MEMORY_REFUSAL)
    except OSError as error:
        return _Inspected(path, refused=str(error.strerror or error))
    return _Inspected(path, text, data)


def _inspect_one(path: str, verify: bool) -> tuple[str, dict[str, object]]:
    if os.path.isdir(path) and not os.path.islink(path.rstrip("/") or "/"):
        return _inspect_folder(path.rstrip("/") or "/", verify)
    source = _locate_source(path)
    made_from: tuple[torchzip.Provenance, str] | None = None
    try:
        fd, info = open_regular(source.name, source.dir_fd, path)
        try:
            checkpoint = torchzip.open_checkpoint(fd, path)
            if verify:
                torchzip.verify_records(fd, checkpoint.archive, path)
            named = torchzip.read_provenance(fd, checkpoint.archive, path)
        finally:
            os.close(fd)
        if named is not None:
            made_from = (named, source_state(source.dir_fd, named))
        folder = folder_identity(source.dir_fd)
    finally:
        os.close(source.dir_fd)
    outputs: dict[Mode, int] = {}
    if checkpoint.kind is torchzip.Kind.FULL:
        its_copy = torchzip.provenance_of(checkpoint, source.name, info.st_mtime_ns, folder)
        outputs = {
            mode: torchzip.plan_output(checkpoint, mode, its_copy).total_size for mode in Mode
        }
    return (
        report.inspect_text(checkpoint, outputs, verify, made_from),
        report.inspect_json(checkpoint, outputs, verify, made_from),
    )


def _inspect_folder(path: str, verify: bool) -> tuple[str, dict[str, object]]:
    """A checkpoint folder (a Hugging Face checkpoint-500/): its layout and what demotion
    would delete; with ``verify``, every part checked as far as its format allows."""
    from sweeper.formats import layouts

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise FileRefused(path, f"cannot open it: {error.strerror}") from None
    try:
        found = layouts.describe_folder(fd, os.path.basename(path), path)
        if found is None:
            raise FileRefused(path, "a directory, not a checkpoint folder any layout knows")
        if verify and found.problem is None:
            layouts.verify_parts(fd, found.parts, path)
    finally:
        os.close(fd)
    return report.folder_text(found, path, verify), report.folder_json(found, path, verify)


# KEY=VALUE, also with a mistyped key (`keep-full=3`), so that the config names the nearest one.
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")


def _is_override(word: str) -> bool:
    """A config override, unless it is the path of something that exists (`lr=0.1/`) and its
    key is none of sweeper's."""
    from sweeper.config import known_keys

    if not _OVERRIDE.match(word):
        return False
    return word.partition("=")[0] in known_keys() or not os.path.lexists(word)


def _config_inputs(args: argparse.Namespace) -> tuple[Path | None, list[str], list[str]]:
    """Config file, KEY=VALUE overrides (then the dedicated flags), and ROOTs replacing roots."""
    overrides = [a for a in args.items if _is_override(a)]
    roots = [a for a in args.items if not _is_override(a)]
    if getattr(args, "keep_full", None) is not None:
        overrides.append(f"keep_full={args.keep_full}")
    if getattr(args, "ledger", None) is not None:
        overrides.append(f"ledger={_yaml_literal(args.ledger)}")
    return (Path(args.config) if args.config else None), overrides, roots


def _yaml_literal(text: str) -> str:
    """``text`` as an override value OmegaConf reads back verbatim: a YAML single-quoted
    string (no escapes but ``''``), with interpolation escaped.  ``repr`` is not YAML: it doubled
    backslashes."""
    unresolved = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    return "'" + unresolved.replace("'", "''") + "'"


def _settings(args: argparse.Namespace) -> Settings:
    from sweeper.config import check_given_roots, load_settings  # omegaconf: only when needed

    config, overrides, roots = _config_inputs(args)
    settings = load_settings(config, overrides, roots=roots)
    check_given_roots(roots)
    return settings


def cmd_watch(args: argparse.Namespace) -> int:
    from sweeper.config import check_given_roots, root_exists
    from sweeper.daemon import Watcher  # loaded only for `watch`
    from sweeper.notify import Notifier

    config, overrides, roots = _config_inputs(args)
    watcher = Watcher(config, overrides, roots, Notifier.from_environment(os.environ))
    check_given_roots(roots)
    if not any(root_exists(root) for root in watcher.settings.roots):
        # Config roots that match nothing are a warning (runs appear later), but a daemon with
        # nothing at all to watch would run for ever doing nothing.
        raise ConfigError(
            "roots",
            f"none of {', '.join(repr(r) for r in watcher.settings.roots)} exists; "
            "nothing to watch",
        )
    watcher.install_signal_handlers()
    return watcher.run()


def _table_width() -> int | None:
    """How wide tables on stdout may be: $COLUMNS, else the terminal's; no limit when stdout
    is a file or a pipe (whoever reads it gets whole paths)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return _columns(sys.stdout) if sys.stdout.isatty() and _columns(sys.stdout) else None


def _columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` is, 0 when it says none (a bare pty)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


class _Progress:
    """A progress bar on stderr, only when stderr is a terminal (and not ``--quiet``).

    Drawn by tqdm; while it is shown, log lines go through tqdm's logging redirect, which
    clears the bar, writes the line and draws the bar again below it, so the two never share a
    line.  Use as a context manager around the work."""

    def __init__(self, stream: TextIO, *, wanted: bool = True) -> None:
        self._stream = stream
        self.enabled = wanted and stream.isatty()
        self._bar: Any = None
        self._phase = ""
        self._redirect: contextlib.ExitStack | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.clear()
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None

    def _at(self, phase: str, count: int, total: int | None) -> None:
        if not self.enabled:
            return
        if self._phase != phase:
            from tqdm import tqdm

            self.clear()
            self._phase = phase
            self._bar = tqdm(
                total=total,
                desc=phase,
                unit=" files",
                file=self._stream,
                leave=False,
                mininterval=0.2,
                # follow the terminal's size; one that tells none (a bare pty) gets 80x24
                **(
                    {"dynamic_ncols": True}
                    if _columns(self._stream)
                    else {"ncols": 80, "nrows": 24}
                ),
            )
        self._bar.update(count - self._bar.n)

    def scanned(self, files: int) -> None:
        self._at("scanning", files, None)

    def executed(self, done: int, total: int) -> None:
        self._at("sweeping", done, total)

    def clear(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._phase = ""


def cmd_sweep(args: argparse.Namespace) -> int:
    with _Progress(sys.stderr, wanted=not args.quiet) as progress:
        return _sweep(args, progress)


def _sweep(args: argparse.Namespace, progress: _Progress) -> int:
    from sweeper import scan_cache
    from sweeper.execute import execute_plan
    from sweeper.intact import Verifier, verify_run
    from sweeper.inventory import RunFolder, Scan, WalkLimits, scan
    from sweeper.journal import Journal
    from sweeper.ledger import AppendEach, action_lock, check_writable
    from sweeper.ledger_segments import before_acting
    from sweeper.plan import plan_all
    from sweeper.preflight import check_plan, refused_count
    from sweeper.signals import StopFlag, install_stop_handlers
    from sweeper.trash import list_held, tidy_all

    settings = _settings(args)
    stop = StopFlag()
    install_stop_handlers(stop)

    rules = settings.rules()
    pressured = settings.rules(pressure=True)
    limits = WalkLimits(settings.max_depth, settings.max_folder_entries)
    store = scan_cache.open_beside(settings.ledger) if settings.scan_cache and args.cache else None
    # (a sweep checks a file once: what it remembers is for the daemon's rescans, and the
    # forked classifiers' copies of it would otherwise grow with the tree)
    verifier = Verifier(store=store, remember=1024)
    processes = len(os.sched_getaffinity(0))

    def verified(now_ns: int, under: Sequence[Pressure] = ()) -> Callable[[RunFolder], RunFolder]:
        usual = functools.partial(verify_run, rules=rules, now_ns=now_ns, verifier=verifier)
        pressing = {pressure.space.dev for pressure in under}
        if not pressing:
            return usual
        harder = functools.partial(verify_run, rules=pressured, now_ns=now_ns, verifier=verifier)
        return lambda run: usual(harder(run)) if run.folder.dev in pressing else usual(run)

    def plan_now(under: Sequence[Pressure]) -> SweepPlan:
        held, refused = list_held(settings.roots)
        now_ns = time.time_ns()
        inventory = scan(
            settings.roots,
            settings.patterns,
            progress=progress.scanned,
            processes=processes,
            refine=verified(now_ns, under),
            should_stop=stop,
            limits=limits,
            memory_limit=settings.classify_memory_limit,
            store=store,
        )
        progress.clear()
        planned = plan_all(
            inventory,
            rules,
            pressured,
            under,
            held,
            now_ns=now_ns,
            undo_seconds=settings.undo_seconds,
            refused=refused,
        )
        for path, reason in refused:  # nothing is purged from it: exit 1, as for a bad file
            log.error("%s: %s", path, reason)
        return check_plan(planned)

    under = _disk_pressure(settings)
    whole = under or settings.undo_seconds > 0 or list_held(settings.roots)[0]
    if args.dry_run and args.json and whole:
        # Under pressure the largest run folders go first, and the trash before them: the plan
        # needs the whole tree.
        pressed = plan_now(under)
        report.write_streamed_plan_json(
            pressed.entries,
            pressed.problems,
            sys.stdout,
            pressure=pressed.pressure,
            purges=pressed.purges,
        )
        if stop():
            return EXIT_INTERRUPTED
        return EXIT_FAILED if pressed.failed or refused_count(pressed.entries) else EXIT_OK
    if args.dry_run and args.json:
        # Streamed one run folder at a time, each planned and written as JSON where it was
        # classified (sweeper.dryrun): memory does not grow with the tree.
        from sweeper.dryrun import Piece, plan_piece, write_pieces

        now_ns = time.time_ns()
        walk = Scan(
            settings.roots,
            settings.patterns,
            processes=processes,
            limits=limits,
            memory_limit=settings.classify_memory_limit,
            store=store,
            stream=True,
        )
        render = functools.partial(plan_piece, rules=rules, now_ns=now_ns, verifier=verifier)
        pieces = (done.value for done in walk.rendered(render, progress.scanned, stop))
        refused = write_pieces(
            (piece for piece in pieces if isinstance(piece, Piece)), walk.problems, sys.stdout
        )
        progress.clear()
        if stop():
            return EXIT_INTERRUPTED
        return EXIT_FAILED if walk.failed or refused else EXIT_OK
    if args.dry_run:
        planned = plan_now(under)
        _print(report.plan_text(planned, width=_table_width(), show_all=args.all))
        if stop():
            return EXIT_INTERRUPTED
        return EXIT_FAILED if planned.failed or refused_count(planned.entries) else EXIT_OK
    # The action lock is held exclusively from scan to the last action: two sweeps (or a sweep
    # and the daemon) never act on the same tree at once, and the second sees the first's results.
    with action_lock(settings.ledger, exclusive=True, should_stop=stop) as locked:
        if not locked:
            return EXIT_INTERRUPTED
        check_writable(settings.ledger)  # no action is taken that could not be recorded
        ledger = AppendEach(str(settings.ledger))
        run_id = uuid.uuid4().hex[:12]
        before_acting(
            str(settings.ledger),
            ledger,
            run_id=run_id,
            max_bytes=settings.ledger_max_bytes,
            segments=settings.ledger_segments,
        )
        tidy_all(settings.roots)  # what a killed run left half-way in the trash
        began = time.monotonic()
        plan = plan_now(_disk_pressure(settings))  # measured again: the lock may have waited
        result = execute_plan(
            plan,
            ledger,
            run_id=run_id,
            should_stop=stop,
            progress=progress.executed,
            journal=Journal(str(settings.ledger), run_id),
        )
        progress.clear()
    if settings.metrics_file is not None:
        _write_sweep_metrics(settings, plan, result, time.monotonic() - began)
    text = report.sweep_json(plan, result) if args.json else None
    _print(
        report.to_json(text)
        if text is not None
        else report.sweep_text(plan, result, width=_table_width())
    )
    if result.interrupted or stop():
        return EXIT_INTERRUPTED
    failed = result.failures or plan.failed or refused_count(plan.entries)
    return EXIT_FAILED if failed else EXIT_OK


def _disk_pressure(settings: Settings) -> tuple[Pressure, ...]:
    """The roots' filesystems below ``pressure.free_below`` now: a one-shot sweep has no memory
    of pressure, so only the line that starts it counts."""
    from sweeper import pressure as disk
    from sweeper.plan import Pressure

    rules = settings.pressure
    return tuple(
        Pressure(space, disk.bytes_needed(space, rules), rules.keep_full)
        for space in disk.measure_roots(settings.roots)
        if disk.under_pressure(space, rules, active=False)
    )


def cmd_trash(args: argparse.Namespace) -> int:
    from sweeper.trash import list_held

    settings = _settings(args)
    held, refused = list_held(settings.roots)
    for path, reason in refused:
        log.error("%s: %s", path, reason)
    items = [item for _, item in held]
    if args.json:
        _print(report.to_json({"held": [report.trash_item_json(i) for i in items]}))
    else:
        _print(report.trash_text(items))
    return EXIT_FAILED if refused else EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from sweeper.config import load_settings
    from sweeper.execute import restore_held
    from sweeper.ledger import AppendEach, action_lock, check_writable
    from sweeper.ledger_segments import before_acting
    from sweeper.signals import StopFlag, install_stop_handlers
    from sweeper.trash import list_held, tidy_all

    overrides = [word for word in args.items if _is_override(word)]
    paths = {os.path.abspath(word) for word in args.items if not _is_override(word)}
    if not paths and args.run_id is None:
        raise UsageError("name the files to restore, or --run-id ID")
    if args.ledger is not None:
        overrides.append(f"ledger={_yaml_literal(args.ledger)}")
    settings = load_settings(Path(args.config) if args.config else None, overrides)
    stop = StopFlag()
    install_stop_handlers(stop)
    with action_lock(settings.ledger, exclusive=True, should_stop=stop) as locked:
        if not locked:
            return EXIT_INTERRUPTED
        check_writable(settings.ledger)
        ledger = AppendEach(str(settings.ledger))
        run_id = uuid.uuid4().hex[:12]
        before_acting(
            str(settings.ledger),
            ledger,
            run_id=run_id,
            max_bytes=settings.ledger_max_bytes,
            segments=settings.ledger_segments,
        )
        tidy_all(settings.roots)
        held, refused = list_held(settings.roots)
        for path, reason in refused:
            log.error("%s: %s", path, reason)
        # (a relative root records relative paths: compared as absolute, from here)
        wanted = [
            (top, item)
            for top, item in held
            if os.path.abspath(item.path) in paths
            or (args.run_id is not None and item.run_id == args.run_id)
        ]
        missing = paths - {os.path.abspath(item.path) for _, item in wanted}
        for path in sorted(missing):
            log.error("%s: not held in the trash", path)
        done = restore_held(wanted, ledger, run_id=run_id)
    if args.json:
        _print(
            report.to_json(
                {
                    "restored": [
                        {**report.trash_item_json(d.item), "ok": d.ok, "detail": d.detail}
                        for d in done
                    ]
                }
            )
        )
    else:
        _print(report.restore_text([(d.item, d.ok, d.detail) for d in done]))
    if not wanted and args.run_id is not None and not paths:
        log.error("nothing held in the trash from run %s", args.run_id)
        return EXIT_FAILED
    failed = missing or refused or any(not d.ok for d in done)
    return EXIT_FAILED if failed else EXIT_OK


def _write_sweep_metrics(
    settings: Settings, plan: SweepPlan, result: SweepReport, seconds: float
) -> None:
    """The Prometheus textfile after a sweep: the ledger's totals (read again, so that they
    are the daemon's too), what the plan left to reclaim, when and how long.  A file that
    cannot be written is a warning: the sweep itself went as it went."""
    from sweeper import pressure as disk
    from sweeper.counters import seeded_from
    from sweeper.metrics import Snapshot, reclaimable_left, write_metrics

    assert settings.metrics_file is not None
    spaces = disk.measure_roots(settings.roots)  # after the sweep: what it left free
    counters = seeded_from(str(settings.ledger), lambda message: log.warning("%s", message))
    snapshot = Snapshot(
        totals=counters.totals(),
        version=__version__,
        reclaimable=reclaimable_left(settings.roots, plan.entries, result.outcomes),
        last_sweep=time.time(),
        last_sweep_seconds=seconds,
        filesystems=tuple(
            (s.filesystem, s.free_bytes, disk.under_pressure(s, settings.pressure, active=False))
            for s in spaces
        ),
    )
    try:
        write_metrics(settings.metrics_file, snapshot)
    except OSError as error:
        log.warning("cannot write %s: %s", settings.metrics_file, error.strerror or error)


def _ledger_path(args: argparse.Namespace) -> Path:
    if args.ledger is not None:
        return Path(args.ledger)
    from sweeper.config import load_settings  # omegaconf: only when config gives the path

    return load_settings(Path(args.config) if args.config else None, []).ledger


def cmd_status(args: argparse.Namespace) -> int:
    from sweeper.status import is_running, read_status, status_path_for

    ledger = _ledger_path(args)
    where = status_path_for(ledger)
    try:
        status = read_status(ledger)
    except OSError as error:
        raise UsageError(f"cannot read {where}: {error.strerror or error}") from None
    except ValueError as error:
        raise UsageError(f"{where} is not a status sweeper wrote: {error}") from None
    if status is None:
        if args.json:
            _print(report.to_json({"running": False}))
        raise NotRunning(f"no daemon has run with the ledger {ledger} (no {where})")
    running = is_running(status)
    if args.json:
        _print(report.to_json(report.status_json(status, running)))
    else:
        _print(report.status_text(status, running))
    return EXIT_OK if running else EXIT_NOT_RUNNING


def cmd_ledger(args: argparse.Namespace) -> int:
    from sweeper.ledger import LedgerRecord, iter_ledger, summarise, user_name
    from sweeper.ledger_views import source_for

    if args.chart and (args.by is None or args.json):
        args.parser.error(
            "--chart draws the totals of --by day, owner or root, for people; --json is the data"
            if args.json
            else "--chart needs --by day, owner or root"
        )

    path = _ledger_path(args)
    try:
        os.lstat(path)
    except FileNotFoundError:
        # A typo in the path must not read as "nothing reclaimed".  (A user who may not look
        # into the ledger's folder gets their own view, or an empty one, below.)
        raise UsageError(f"no ledger at {path}") from None
    except OSError:
        pass
    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            raise ConfigError("--since", f"not an ISO date: {args.since!r}") from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=timezone.utc)
    # Root and the ledger's owner read it all; anyone else reads the view of their own files.
    source = source_for(path, os.geteuid())
    if source.view_of is not None:
        who = user_name(source.view_of)
        if source.exists:
            log.info("showing only the files owned by %s: %s is private to its owner", who, path)
        else:
            log.info("no records of files owned by %s in %s", who, path)
    # Streamed: totals only, whatever the ledger's size.
    carried: list[LedgerRecord] = []

    def noting_carries(records: Iterator[LedgerRecord]) -> Iterator[LedgerRecord]:
        for record in records:
            if record.records is not None and not carried:
                carried.append(record)
            yield record

    records = noting_carries(iter_ledger(source.path, log.warning))
    rows = summarise(records, since=since, by=args.by)
    if carried and since is not None and since.astimezone(timezone.utc).time() != dt_time(0):
        log.warning(
            "%s holds compacted totals (carry records), which --since counts by their last "
            "record's time: exact only to the UTC day (or coarser, as their reason says)",
            path,
        )
    if args.json:
        _print(report.to_json(report.ledger_json(rows, args.by)))
    elif args.chart:
        _print(report.ledger_chart(rows, args.by, width=_table_width() or 80))
    else:
        _print(report.ledger_text(rows, args.by))
    return EXIT_OK


def _tree_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The roots and overrides, and the config file, of a command that works on the tree."""
    p.add_argument(
        "items",
        nargs="*",
        metavar="ROOT|KEY=VALUE",
        help=f"{what} (replace config roots) and config overrides",
    )
    p.add_argument("-c", "--config", metavar="CONFIG", help="config file (YAML)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeper",
        description="Keep disks from filling with PyTorch training checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"sweeper {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log detail"
    )
    common.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=argparse.SUPPRESS,
        help="only warnings and errors on stderr (-qq: only errors)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
    parser.add_argument(
        "-q", "--quiet", action="count", default=0, help="only warnings and errors on stderr"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "extract", parents=[common], help="write the inference copy of one full checkpoint"
    )
    p.add_argument("src", metavar="SRC", help="full training checkpoint")
    p.add_argument("-o", "--output", metavar="OUT", help="output path (default: beside SRC)")
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="write only the model state dict, to <stem>_weights.pt",
    )
    p.add_argument(
        "--delete-original",
        action="store_true",
        help="delete SRC once the output is written, durable and verified",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it exists (by default an existing file is never replaced)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_extract, parser=p)

    p = sub.add_parser(
        "inspect", parents=[common], help="what a checkpoint holds, without reading its tensors"
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also read every record and check its CRC (reads the whole file)",
    )
    p.set_defaults(func=cmd_inspect, parser=p)

    p = sub.add_parser(
        "sweep", parents=[common], help="extract, keep the newest full checkpoints, delete older"
    )
    _tree_arguments(p, "folders to sweep")
    p.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    p.add_argument(
        "--all", action="store_true", help="list sweeper's own outputs too (folded by default)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--keep-full", type=int, metavar="N", help="full checkpoints kept per run")
    p.add_argument("--ledger", metavar="PATH", help="ledger file")
    p.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="read every file again: neither use nor update the scan cache",
    )
    p.set_defaults(func=cmd_sweep, parser=p)

    p = sub.add_parser(
        "watch", parents=[common], help="the daemon: extract and prune as checkpoints appear"
    )
    _tree_arguments(p, "folders to watch")
    p.add_argument("--ledger", metavar="PATH", help="ledger file")
    p.set_defaults(func=cmd_watch, parser=p)

    p = sub.add_parser(
        "status", parents=[common], help="what the daemon is doing now (exit 3: not running)"
    )
    p.add_argument("-c", "--config", metavar="CONFIG", help="config file (for its ledger path)")
    p.add_argument("--ledger", metavar="PATH", help="ledger file (the status file is beside it)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_status, parser=p)

    p = sub.add_parser(
        "trash", parents=[common], help="what the undo window holds, and when it is purged"
    )
    _tree_arguments(p, "roots whose trash to list")
    p.add_argument("--ledger", metavar="PATH", help="ledger file")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_trash, parser=p)

    p = sub.add_parser(
        "restore", parents=[common], help="move files held in the trash back where they were"
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="PATH|KEY=VALUE",
        help="the files' original paths, and config overrides (roots come from config)",
    )
    p.add_argument("--run-id", metavar="ID", help="every file the sweep with this run id trashed")
    p.add_argument("-c", "--config", metavar="CONFIG", help="config file (YAML)")
    p.add_argument("--ledger", metavar="PATH", help="ledger file")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_restore, parser=p)

    p = sub.add_parser("ledger", parents=[common], help="totals of reclaimed space from the ledger")
    p.add_argument("-c", "--config", metavar="CONFIG", help="config file (for its ledger path)")
    p.add_argument("--ledger", metavar="PATH", help="ledger file")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--since", metavar="DATE", help="only records at or after DATE (ISO 8601)")
    p.add_argument("--by", choices=("root", "owner", "day"), help="group totals")
    p.add_argument(
        "--chart",
        action="store_true",
        help="draw the totals as a bar chart (with --by; --json stays the data)",
    )
    p.set_defaults(func=cmd_ledger, parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse hands a nargs="*" positional only its first run of words, so in
    # `sweep ROOT --json KEY=VALUE` the KEY=VALUE comes back unparsed: give it to `items`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        items = getattr(args, "items", None)
        if not isinstance(items, list) or any(word.startswith("-") for word in extra):
            _unrecognized(getattr(args, "parser", parser), extra)
        items.extend(extra)
    configure_logging(args.verbose - args.quiet)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except (ConfigError, AlreadyRunning, UsageError) as error:
        log.error("%s", error)
        return EXIT_USAGE
    except NotRunning as error:
        log.warning("%s", error)
        return EXIT_NOT_RUNNING
    except FileRefused as error:
        log.error("%s", error)
        return EXIT_FAILED
    except SweeperError as error:
        log.error("%s", error)
        return EXIT_FAILED
    except BrokenPipeError:
        # stdout's reader left (`| head`) while a dry run streamed its plan: what it wanted it
        # has; end quietly, without the interpreter's complaint when it flushes on the way out.
        _silence_stdout()
        return EXIT_OK
    except OSError as error:
        log.error("%s", error)
        return EXIT_FAILED
    except (Exception, RecursionError):
        log.exception("unexpected error (a bug in sweeper: please report it)")
        return EXIT_FAILED


def _print(text: str) -> None:
    """One result on stdout.  A reader that has gone (`| head`) loses it, quietly: the
    command's outcome, and its exit status, stand."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _silence_stdout()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _unrecognized(parser: argparse.ArgumentParser, extra: Sequence[str]) -> NoReturn:
    """argparse's error for words it did not take, from the command's own parser (its usage,
    not the top level's), naming the nearest option of that command for each misspelt one."""
    options = [
        option
        for action in parser._actions  # argparse keeps no public list of a parser's options
        for option in action.option_strings
        if option.startswith("--")
    ]
    words = []
    for word in extra:
        close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if word.startswith("-") and close else ""
        words.append(word + hint)
    parser.error(f"unrecognized arguments: {' '.join(words)}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
