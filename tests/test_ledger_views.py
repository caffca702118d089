"""Per-owner views of the ledger: a user who is not root sees their own files' records, and
nothing of anyone else's.

The ledger is written as root (in this process, and once by a real sweep); the readers are the
real CLI running as test uids that have no passwd entry, so nothing on the machine is theirs but
what the tests give them.  Hostile users are real processes of those uids.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import REPO_ROOT, CliRun, run_cli, untimed
from trees import days_ago, ledger_lines, outcome_total, save_full

from sweeper.ledger import Action, AppendEach, Ledger, LedgerRecord, encode_record, new_record
from sweeper.ledger_views import view_path_for, views_dir_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="views are written by a root writer, and readers need other uids"
)

ALICE, BOB, CAROL = 54321, 54322, 54323

# Run as root first with its output thrown away, then as the uid: the interpreter's own files may
# be closed to a test uid (a Python under /root), so the rehearsal loads every module the command
# needs.  `sweeper ledger` only reads, so the rehearsal changes nothing; everything the second run
# does on disk, the kernel checks against the uid alone (no groups, no capabilities).
_AS_USER = """
import contextlib, os, sys
from sweeper.cli import main
uid, argv = int(sys.argv[1]), sys.argv[2:]
with open(os.devnull, "w") as devnull:
    with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        main(argv)
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
sys.exit(main(argv))
"""


def sweeper_as(
    uid: int, *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> CliRun:
    """``sweeper ARGS`` as a process of ``uid``."""
    command = [sys.executable, "-c", _AS_USER, str(uid), *(os.fspath(arg) for arg in args)]
    environ = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    environ.pop("JOURNAL_STREAM", None)
    done = subprocess.run(
        command, cwd="/", env=environ, capture_output=True, text=True, timeout=120, check=False
    )
    return CliRun(done.returncode, done.stdout, untimed(done.stderr))


def shell_as(
    uid: int, script: str, *args: str | os.PathLike[str]
) -> subprocess.CompletedProcess[str]:
    """``sh -c SCRIPT`` as ``uid`` (no groups): what a hostile or curious user can do by hand."""
    return subprocess.run(
        ["sh", "-c", script, "sh", *(os.fspath(arg) for arg in args)],
        user=uid,
        group=uid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder other uids can traverse (tmp_path's parents are closed to them)."""
    folder = Path(tempfile.mkdtemp(prefix="sweeper-views-"))
    folder.chmod(0o711)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def record(uid: int, name: str, deleted: int, written: int = 0) -> LedgerRecord:
    return new_record(
        now=datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc),
        action=Action.DELETE,
        path=f"/data/{uid}/run/{name}",
        owner=str(uid),
        uid=uid,
        reason="older than the 2 newest full checkpoints",
        run_id="r1",
        root=f"/data/{uid}",
        bytes_deleted=deleted,
        bytes_written=written,
        reclaimed_bytes=deleted - written,
    )


RECORDS = [
    record(ALICE, "a1.pt", 5000, 100),
    record(BOB, "b1.pt", 700_000),
    record(0, "r1.pt", 9_000_000),  # root's own file: in the ledger only
    record(ALICE, "a2.pt", 3000),
    new_record(  # an intent: in the view, but it never counts
        now=datetime(2026, 3, 1, 11, 0, tzinfo=timezone.utc),
        action=Action.DELETE_INTENT,
        path=f"/data/{ALICE}/run/a3.pt",
        owner=str(ALICE),
        uid=ALICE,
        reason="older",
        run_id="r1",
        root=f"/data/{ALICE}",
    ),
]


def write(ledger: Path, records: Sequence[LedgerRecord]) -> None:
    with Ledger.open(ledger) as writer:
        for each in records:
            writer.append(each)


@pytest.fixture
def ledger(shared: Path) -> Path:
    path = shared / "state" / "ledger.jsonl"
    write(path, RECORDS)
    return path


def totals(done: CliRun) -> tuple[dict[str, int], int]:
    """key -> reclaimed bytes from ``sweeper ledger --json``, and the count of the whole."""
    assert done.returncode == 0, done.stderr
    result = done.json()
    return (
        {row["key"]: row["reclaimed_bytes"] for row in result["rows"]},
        sum(row["count"] for row in result["rows"]),
    )


def mode_and_owner(path: Path) -> tuple[int, int]:
    info = path.lstat()
    return stat.S_IMODE(info.st_mode), info.st_uid


# --- what each user sees --------------------------------------------------------------------------


def test_each_user_sees_their_own_totals_and_nothing_else(ledger: Path) -> None:
    alice = sweeper_as(ALICE, "ledger", "--ledger", ledger, "--json", "--by", "owner")
    bob = sweeper_as(BOB, "ledger", "--ledger", ledger, "--json", "--by", "root")
    alice_total = sweeper_as(ALICE, "ledger", "--ledger", ledger)

    assert totals(alice) == ({str(ALICE): 4900 + 3000}, 2)
    assert totals(bob) == ({f"/data/{BOB}": 700_000}, 1)
    for done in (alice, bob):
        assert len(done.stderr_lines) == 1, done.stderr
        assert "showing only the files owned by" in done.stderr
        assert "Permission denied" not in done.stderr
    assert alice_total.returncode == 0
    assert "7.7 KiB" in alice_total.stdout  # 7900 B; the whole ledger would be 9.3 MiB
    assert f"showing only the files owned by {ALICE}:" in alice_total.stderr


def test_root_and_the_ledger_owner_still_read_everything(ledger: Path) -> None:
    everything = {str(ALICE): 7900, str(BOB): 700_000, "0": 9_000_000}

    as_root = sweeper_as(0, "ledger", "--ledger", ledger, "--json", "--by", "owner")
    assert totals(as_root) == (everything, 4)
    assert as_root.stderr == ""

    os.chown(ledger, BOB, BOB)  # BOB's own ledger (as if BOB ran sweeper): he reads all of it
    as_owner = sweeper_as(BOB, "ledger", "--ledger", ledger, "--json", "--by", "owner")
    assert totals(as_owner) == (everything, 4)
    assert as_owner.stderr == ""


def test_a_view_holds_exactly_its_owners_ledger_lines(ledger: Path) -> None:
    for uid in (ALICE, BOB):
        view = Path(view_path_for(ledger, uid))
        expected = b"".join(encode_record(r) for r in RECORDS if r.uid == uid)
        assert view.read_bytes() == expected
        read = shell_as(uid, 'cat "$1"', view)  # the user's own tools work too
        assert read.returncode == 0 and read.stdout.encode() == expected
    assert sorted(os.listdir(views_dir_for(ledger))) == [str(ALICE), str(BOB)]  # none for root


def test_a_user_cannot_read_list_or_stat_anyone_elses(ledger: Path) -> None:
    views = Path(views_dir_for(ledger))
    bob_view = Path(view_path_for(ledger, BOB))
    attempts = {
        "the ledger": ('cat "$1"', ledger),
        "the ledger's folder": ('ls "$1"', ledger.parent),
        "the views folder": ('ls "$1"', views),
        "BOB's view": ('cat "$1"', bob_view),
        "BOB's view's size and age": ('stat "$1"', bob_view),
        "BOB's folder": ('ls "$1"', views / str(BOB)),
    }
    for what, (script, path) in attempts.items():
        done = shell_as(ALICE, script, path)
        assert done.returncode != 0 and "Permission denied" in done.stderr, what
        assert done.stdout == "", what


def test_no_view_yet_gives_a_clear_note_and_an_empty_summary(ledger: Path) -> None:
    as_json = sweeper_as(CAROL, "ledger", "--ledger", ledger, "--json")
    as_text = sweeper_as(CAROL, "ledger", "--ledger", ledger, "--by", "day")

    assert totals(as_json) == ({"total": 0}, 0)
    assert as_text.returncode == 0
    assert as_text.stdout.strip() == "ledger is empty"
    for done in (as_json, as_text):
        assert done.stderr_lines == [
            f"INFO sweeper: no records of files owned by {CAROL} in {ledger}"
        ]
    assert not Path(view_path_for(ledger, CAROL)).parent.exists()  # reading made nothing


def test_a_folder_closed_to_the_user_is_explained(ledger: Path) -> None:
    ledger.parent.chmod(0o700)  # as sweeper 0.1 and the old units left it

    done = sweeper_as(ALICE, "ledger", "--ledger", ledger)

    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr_lines) == 1 and "0711" in done.stderr and str(ledger) in done.stderr


# --- a real sweep of two users' files -------------------------------------------------------------


def test_a_real_sweep_gives_each_owner_their_view(shared: Path, tmp_path: Path) -> None:
    roots = {ALICE: tmp_path / "alice", BOB: tmp_path / "bob"}
    for uid, root in roots.items():
        run = root / "run"
        run.mkdir(parents=True)
        for epoch in (1, 2, 3):
            path = run / f"e{epoch}.pt"
            save_full(path, epoch=epoch, seed=uid + epoch)
            os.chown(path, uid, uid)
            os.utime(path, ns=(days_ago(1) + epoch, days_ago(1) + epoch))
    state = shared / "state"
    ledger = state / "ledger.jsonl"

    # As the systemd units run it: root, UMask=0077, the state folder made by sweeper.
    umask_077 = ["sh", "-c", 'umask 077 && exec "$@"', "sh"]
    swept = run_cli("sweep", *roots.values(), "--json", "--ledger", ledger, prefix=umask_077)
    assert swept.returncode == 0, swept.stderr

    views = Path(views_dir_for(ledger))
    assert mode_and_owner(state) == (0o711, 0)
    assert mode_and_owner(ledger) == (0o600, 0)
    assert mode_and_owner(views) == (0o711, 0)
    lines = ledger_lines(ledger)
    for uid, root in roots.items():
        view = Path(view_path_for(ledger, uid))
        assert mode_and_owner(view.parent) == (0o500, uid)
        assert mode_and_owner(view) == (0o400, uid)
        own = [line for line in lines if line["uid"] == uid]
        counted = [line for line in own if line["reclaimed_bytes"] is not None]
        assert counted  # at least the extracts, whatever the retention policy decides
        assert ledger_lines(view) == own

        mine = sweeper_as(uid, "ledger", "--ledger", ledger, "--json", "--by", "root")
        # The default path, as a user finds it: the units' $STATE_DIRECTORY.
        by_default = sweeper_as(uid, "ledger", "--json", env={"STATE_DIRECTORY": str(state)})
        assert totals(mine) == ({str(root): outcome_total(own)}, len(counted))
        assert totals(by_default) == ({"total": outcome_total(own)}, len(counted))
    assert {line["uid"] for line in lines} == set(roots)


# --- hostile users and broken views ---------------------------------------------------------------


def plant(kind: str, view: Path, victim: Path) -> None:
    """ALICE replaces her own view with something else, as she may: she owns its folder."""
    scripts = {
        "symlink to a root file": 'ln -s "$2" "$1"',
        "symlink to a missing file": 'ln -s "$2.new" "$1"',
        "fifo": 'mkfifo "$1"',
        "directory": 'mkdir "$1"',
    }
    done = shell_as(
        ALICE, f'chmod u+w "$(dirname "$1")" && rm -f "$1" && {scripts[kind]}', view, victim
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "kind", ["symlink to a root file", "symlink to a missing file", "fifo", "directory"]
)
def test_a_hostile_view_is_refused_and_the_ledger_still_appends(
    ledger: Path, shared: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    victim = shared / "victim"
    victim.write_bytes(b"root's data\n")
    victim.chmod(0o600)
    view = Path(view_path_for(ledger, ALICE))
    plant(kind, view, victim)
    before = ledger.read_bytes()
    bob_before = Path(view_path_for(ledger, BOB)).read_bytes()
    late = [record(ALICE, "a9.pt", 11), record(BOB, "b9.pt", 22)]

    with caplog.at_level(logging.WARNING, logger="sweeper.ledger_views"):
        write(ledger, late)  # raises nothing

    assert ledger.read_bytes() == before + b"".join(encode_record(r) for r in late)
    assert victim.read_bytes() == b"root's data\n"
    assert mode_and_owner(victim) == (0o600, 0)
    assert not (shared / "victim.new").exists()
    assert view.is_symlink() == kind.startswith("symlink")
    assert Path(view_path_for(ledger, BOB)).read_bytes() == bob_before + encode_record(late[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(view) in warnings[0], warnings
    # ALICE spoiled only her own view; reading it, she is told what is wrong with it.
    done = sweeper_as(ALICE, "ledger", "--ledger", ledger, "--json")
    if kind in ("directory", "fifo"):
        assert done.returncode == 1 and "not a regular file" in done.stderr
    else:
        assert done.returncode == 1 and "symlink" in done.stderr


_LEASE_HOLDER = """
import fcntl, os, signal, sys
uid, path = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGIO, signal.SIG_IGN)  # told to give the lease up, it just keeps it
os.setgroups([])
os.setgid(uid)
os.setuid(uid)
fd = os.open(path, os.O_RDONLY)
fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
print("leased", flush=True)
sys.stdin.read()
"""


def test_a_lease_on_a_view_does_not_stall_the_ledger(
    ledger: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A user may take a write lease on a file they own: an open for writing then waits for them
    (up to fs.lease-break-time, 45 s by default) with the writer lock held.  sweeper does not."""
    view = Path(view_path_for(ledger, ALICE))
    holder = subprocess.Popen(
        [sys.executable, "-c", _LEASE_HOLDER, str(ALICE), str(view)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert holder.stdout is not None
        if holder.stdout.readline() != "leased\n":
            holder.kill()
            pytest.skip(f"cannot take a lease here: {holder.communicate()[1][-300:]}")
        late = record(ALICE, "a9.pt", 11)

        with caplog.at_level(logging.WARNING, logger="sweeper.ledger_views"):
            write(ledger, [late])

        assert holder.poll() is None  # still holding its lease: nothing waited for it to go
        assert ledger.read_bytes().endswith(encode_record(late))
        assert len(caplog.records) == 1 and str(view) in caplog.records[0].getMessage()
    finally:
        holder.kill()
        holder.communicate()


def test_a_view_the_user_tore_or_emptied_only_spoils_their_own(ledger: Path) -> None:
    view = Path(view_path_for(ledger, ALICE))
    done = shell_as(ALICE, 'chmod 600 "$1" && printf "%s" "{\\"v\\":1,\\"ti" > "$1"', view)
    assert done.returncode == 0, done.stderr

    write(ledger, [record(ALICE, "a9.pt", 11)])

    mine = sweeper_as(ALICE, "ledger", "--ledger", ledger, "--json")
    assert totals(mine) == ({"total": 11}, 1)  # the torn fragment is skipped, the new line counts
    assert "line 1: corrupt record skipped" in mine.stderr
    assert mode_and_owner(view) == (0o600, ALICE)  # her chmod stands; she owns the file
    everything = sweeper_as(0, "ledger", "--ledger", ledger, "--json")
    assert totals(everything) == ({"total": 7900 + 700_000 + 9_000_000 + 11}, 5)


def test_a_view_left_half_made_is_made_again(ledger: Path) -> None:
    """A crash between creating a view and giving it to its owner leaves a root-owned file: it is
    never given away (it might be a link to a file of root's), but replaced."""
    view = Path(view_path_for(ledger, ALICE))
    view.unlink()
    view.write_bytes(b"root's\n")
    view.chmod(0o400)
    other = view.parent.parent / "kept"
    os.link(view, other)

    write(ledger, [record(ALICE, "a9.pt", 11)])

    assert mode_and_owner(view) == (0o400, ALICE)
    assert view.read_bytes() == encode_record(record(ALICE, "a9.pt", 11))
    assert other.read_bytes() == b"root's\n" and mode_and_owner(other) == (0o400, 0)


@pytest.mark.parametrize("state", ["symlink", "writable by others", "owned by a user"])
def test_a_views_folder_sweeper_did_not_make_is_not_used(
    shared: Path, state: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = shared / "state" / "ledger.jsonl"
    ledger.parent.mkdir()
    views = Path(views_dir_for(ledger))
    elsewhere = shared / "elsewhere"
    elsewhere.mkdir()
    if state == "symlink":
        views.symlink_to(elsewhere)
    else:
        views.mkdir()
        if state == "writable by others":
            views.chmod(0o777)
        else:
            os.chown(views, ALICE, ALICE)

    with caplog.at_level(logging.WARNING, logger="sweeper.ledger_views"):
        write(ledger, [record(ALICE, "a1.pt", 5)])

    assert ledger_lines(ledger) == ledger_lines_of([record(ALICE, "a1.pt", 5)])
    assert os.listdir(elsewhere) == []
    if state != "symlink":
        assert os.listdir(views) == []
    assert len(caplog.records) == 1 and str(views) in caplog.records[0].getMessage()


def test_a_views_folder_left_closed_is_opened_again(shared: Path) -> None:
    """As a run stopped between its mkdir (under UMask=0077) and its chmod would leave it."""
    ledger = shared / "state" / "ledger.jsonl"
    views = Path(views_dir_for(ledger))
    views.mkdir(parents=True, mode=0o700)
    views.chmod(0o700)

    write(ledger, [record(ALICE, "a1.pt", 5)])

    assert mode_and_owner(views) == (0o711, 0)
    mine = sweeper_as(ALICE, "ledger", "--ledger", ledger, "--json")
    assert totals(mine) == ({"total": 5}, 1)


def ledger_lines_of(records: Sequence[LedgerRecord]) -> list[object]:
    return [json.loads(encode_record(r)) for r in records]


def test_the_daemons_writer_makes_views_too(shared: Path) -> None:
    ledger = shared / "ledger.jsonl"
    AppendEach(str(ledger)).append(record(BOB, "b1.pt", 1))

    assert Path(view_path_for(ledger, BOB)).read_bytes() == encode_record(record(BOB, "b1.pt", 1))
