"""What the people who run sweeper can see without the journal: ``sweeper status`` (the real
daemon, then the real command) and the Prometheus textfile a sweep and the daemon write,
checked with the official ``prometheus_client`` parser."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import run_cli
from daemon_harness import Daemon, NotifySocket, Status, daemon_status, wait_until
from prometheus_client.parser import text_string_to_metric_families
from trees import ledger_lines, outcome_total, save_full

from sweeper import __version__
from sweeper.ledger import Action, Ledger, new_record
from sweeper.report import human_size

YESTERDAY = datetime.now(timezone.utc) - timedelta(days=1, hours=1)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A root with one run folder of three old full checkpoints: the catch-up demotes one."""
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    for epoch in (1, 2, 3):
        save_full(run / f"epoch_{epoch}.pt", epoch=epoch, mtime_ns=10**18 + epoch)
    return tmp_path / "root"


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    """A ledger with yesterday's history: 5 MiB reclaimed under another root."""
    path = tmp_path / "state" / "ledger.jsonl"
    with Ledger.open(path) as writer:
        writer.append(
            new_record(
                now=YESTERDAY,
                action=Action.DELETE,
                path="/data/old/run/e1.pt",
                owner="alice",
                uid=1000,
                reason="test",
                run_id="r0",
                root="/data/old",
                bytes_deleted=5 << 20,
                reclaimed_bytes=5 << 20,
            )
        )
    return path


StartDaemon = Callable[..., Daemon]


@pytest.fixture
def start(tmp_path: Path, tree: Path, ledger: Path, notify: NotifySocket) -> Iterator[StartDaemon]:
    """``start(*settings)``: ``sweeper watch`` on the tree; every daemon is stopped at the end."""
    daemons: list[Daemon] = []

    def run(*more: str) -> Daemon:
        daemon = Daemon(
            tmp_path,
            [str(tree), "min_age_seconds=0", "settle_seconds=0.5", "rescan_seconds=600", *more],
            notify=notify,
            ledger=ledger,
            name=f"daemon{len(daemons)}",
        )
        daemons.append(daemon)
        return daemon

    yield run
    for daemon in daemons:
        daemon.stop()


def metrics(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a textfile, as the official parser reads it."""
    samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_status_says_what_the_daemon_does_and_exits_3_once_it_stopped(
    tmp_path: Path, ledger: Path, notify: NotifySocket, start: StartDaemon
) -> None:
    missing = run_cli("status", "--ledger", tmp_path / "nowhere" / "ledger.jsonl")
    assert missing.returncode == 3 and missing.stdout == ""
    assert len(missing.stderr_lines) == 1 and "no daemon has run" in missing.stderr

    killed_mid_write = ledger.parent / f".{ledger.name}.status.tmp-0badf00d"
    killed_mid_write.write_text("{")
    daemon = start()
    daemon.wait_ready()
    assert not killed_mid_write.exists()  # what a killed daemon left is cleaned at start
    records = ledger_lines(ledger)
    assert "catch-up sweep done in " in daemon.log()
    assert "4 files acted on, 0 failed; reclaimed" in daemon.log()
    wait_until(lambda: daemon_status(ledger)["phase"] == "watching", "the watching phase")

    state = daemon_status(ledger)
    assert state["running"] is True and state["pid"] == daemon.process.pid
    assert (state["queued"], state["settling"], state["working_on"]) == (0, 0, [])
    assert state["total_bytes"] == outcome_total(records)  # yesterday's too: from the ledger
    assert state["today_bytes"] == outcome_total(records) - (5 << 20)
    assert state["today_files"] == 4  # three copies written, one checkpoint deleted
    assert state["last_full_scan"] is not None and state["last_full_scan_seconds"] >= 0
    assert state["last_error"] is None and state["not_acting"] is None
    text = run_cli("status", "--ledger", ledger)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith("sweeper watch: running since ")
    assert "phase: watching" in lines
    assert f"{human_size(state['total_bytes'])} in total (5 files)" in text.stdout
    # systemd's STATUS= says the same, in the same words
    last = notify.statuses(daemon.since)[-1]
    assert last == Status("watching", 0, 0, 0, 5, 0, human_size(state["total_bytes"]))
    status_file = Path(f"{ledger}.status")
    assert stat.S_IMODE(status_file.stat().st_mode) == 0o644

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    stopped = run_cli("status", "--ledger", ledger)
    assert stopped.returncode == 3
    assert stopped.stdout.startswith("sweeper watch: not running (last seen ")
    assert daemon_status(ledger)["running"] is False

    # A daemon killed without a word reads as not running too: its pid is asked, not the file.
    again = start()
    again.wait_ready()
    wait_until(lambda: daemon_status(ledger)["running"], "the second daemon's status")
    again.signal(signal.SIGKILL)
    again.wait_exit()
    killed = run_cli("status", "--ledger", ledger, "--json")
    assert killed.returncode == 3 and killed.json()["running"] is False
    assert killed.json()["phase"] == "watching"  # what it was doing when it died


def test_the_daemon_writes_metrics_whose_counters_survive_a_restart(
    tmp_path: Path, tree: Path, ledger: Path, start: StartDaemon
) -> None:
    textfiles = tmp_path / "textfile_collector"
    textfiles.mkdir()
    prom = textfiles / "sweeper.prom"
    daemon = start(f"metrics_file={prom}")
    daemon.wait_ready()
    wait_until(lambda: prom.exists() and daemon_status(ledger)["phase"] == "watching", "metrics")
    wait_until(
        lambda: (
            metrics(prom).get(("sweeper_queue_length", ())) == 0
            and ("sweeper_last_sweep_timestamp_seconds", ()) in metrics(prom)
        ),
        "metrics after the catch-up",
    )
    first = metrics(prom)
    records = ledger_lines(ledger)
    outcomes = [r for r in records if r["reclaimed_bytes"] is not None]
    root = str(tree)
    assert first[("sweeper_reclaimed_bytes_total", (("root", root),))] == sum(
        r["reclaimed_bytes"] for r in outcomes if r["root"] == root
    )
    assert first[("sweeper_reclaimed_bytes_total", (("root", "/data/old"),))] == 5 << 20
    assert first[("sweeper_written_bytes_total", ())] == sum(r["bytes_written"] for r in outcomes)
    assert first[("sweeper_deleted_bytes_total", ())] == sum(r["bytes_deleted"] for r in outcomes)
    assert first[("sweeper_files_total", (("action", "extract"), ("result", "ok")))] == 3
    assert first[("sweeper_files_total", (("action", "delete"), ("result", "ok")))] == 2
    assert first[("sweeper_reclaimable_bytes", (("root", root),))] == 0  # all done
    assert first[("sweeper_errors_total", (("kind", "action"),))] == 0
    assert first[("sweeper_build_info", (("version", __version__),))] == 1
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert sorted(os.listdir(textfiles)) == ["sweeper.prom"]  # no temporary file left behind
    # labels name configured roots and the filesystems they are on, never a file
    paths = {"root", "filesystem"}
    assert not any("/" in value for key in first for _, value in key[1] if _ not in paths)
    (filesystem,) = [key[1] for key in first if key[0] == "sweeper_pressure_active"]
    assert first[("sweeper_pressure_active", filesystem)] in (0, 1)
    assert first[("sweeper_free_bytes", filesystem)] > 0

    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    prom.unlink()
    again = start(f"metrics_file={prom}")
    again.wait_ready()
    wait_until(prom.exists, "the restarted daemon's metrics")
    after = metrics(prom)
    counters = [key for key in first if key[0].endswith("_total")]
    assert counters and {key: after[key] for key in counters} == {
        key: first[key] for key in counters
    }


def test_a_sweep_writes_the_metrics_textfile_readable_whatever_the_umask(
    tmp_path: Path, tree: Path, ledger: Path
) -> None:
    quoted = tmp_path / 'a "quoted\\" root'  # a label value that needs escaping
    (quoted / "run").mkdir(parents=True)
    save_full(quoted / "run" / "e1.pt", epoch=1, mtime_ns=10**18)
    prom = tmp_path / "textfile" / "sweeper.prom"
    prom.parent.mkdir()
    umask_077 = ["sh", "-c", 'umask 077 && exec "$@"', "sh"]
    options = ["min_age_seconds=0", f"metrics_file={prom}", "--ledger", ledger]

    dry = run_cli("sweep", tree, quoted, "--dry-run", *options, prefix=umask_077)
    assert dry.returncode == 0, dry.stderr
    assert not prom.exists()  # a dry run changes nothing
    swept = run_cli("sweep", tree, quoted, "--json", *options, prefix=umask_077)
    assert swept.returncode == 0, swept.stderr

    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert os.listdir(prom.parent) == ["sweeper.prom"]
    samples = metrics(prom)
    outcomes = [r for r in ledger_lines(ledger) if r["reclaimed_bytes"] is not None]
    for root in (str(tree), str(quoted)):
        assert samples[("sweeper_reclaimed_bytes_total", (("root", root),))] == sum(
            r["reclaimed_bytes"] for r in outcomes if r["root"] == root
        )
        assert samples[("sweeper_reclaimable_bytes", (("root", root),))] == 0
    assert samples[("sweeper_reclaimed_bytes_total", (("root", "/data/old"),))] == 5 << 20
    assert samples[("sweeper_files_total", (("action", "extract"), ("result", "ok")))] == 4
    assert samples[("sweeper_last_sweep_duration_seconds", ())] > 0
    assert ("sweeper_queue_length", ()) not in samples  # the daemon's alone


def test_metrics_file_must_be_an_absolute_prom_path(tmp_path: Path, tree: Path) -> None:
    for value, words in (("relative.prom", "sweeper.prom"), ("/x/sweeper.txt", ".prom")):
        done = run_cli("sweep", tree, "--dry-run", f"metrics_file={value}", cwd=tmp_path)
        if value == "relative.prom":  # made absolute, like the ledger
            assert done.returncode == 0, done.stderr
            continue
        assert done.returncode == 2 and "metrics_file" in done.stderr and words in done.stderr
