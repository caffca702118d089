"""The classifiers' workers: a worker that dies fails only its task; a stop ends it all.

Real forked (and exec'd) processes throughout; the deaths are real signals.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from trees import days_ago, save_full
from worker_tasks import exec_task

from sweeper.inventory import RunFolder, Scan
from sweeper.workers import ExecWorker, Stopped, WorkerDied, WorkerPool, limit_address_space


def _square_or_die(task: int) -> int:
    if task == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # an OOM kill, as the kernel does it
    if task == 5:
        raise MemoryError("address space ceiling")
    return task * task


def test_a_dead_worker_fails_only_its_task_and_the_rest_go_on() -> None:
    results = list(WorkerPool(2, _square_or_die).map(list(range(10))))

    assert [task for task, _ in results] == list(range(10))  # in order
    assert results[3][1] == WorkerDied("killed by SIGKILL")
    assert results[5][1] == WorkerDied("raised MemoryError: address space ceiling")
    assert [r for t, r in results if t not in (3, 5)] == [
        t * t for t in range(10) if t not in (3, 5)
    ]
    assert multiprocessing.active_children() == []


def _sleep(task: float) -> float:
    time.sleep(task)
    return task


def test_a_stop_request_ends_the_workers_promptly() -> None:
    started = time.monotonic()
    deadline = started + 0.5

    with pytest.raises(Stopped):
        list(WorkerPool(2, _sleep).map([60.0] * 4, lambda: time.monotonic() > deadline))

    assert time.monotonic() - started < 10
    assert multiprocessing.active_children() == []


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as children:
            found += [int(child) for child in children.read().split()]
    return found


def test_a_sweep_whose_classifiers_are_killed_finishes_and_loses_no_folder(tmp_path: Path) -> None:
    """Many run folders, classified in forked workers a chunk at a time; the workers are killed
    mid-scan (the whole sweep is frozen with SIGSTOP so the kill lands while there is work).
    The sweep must finish, not wait for ever; the killed chunks' folders are classified again
    one by one, so every folder is planned (a folder that kills its classifier each time is
    named: the next test)."""
    root = tmp_path / "root"
    for run in range(120):
        (root / f"run{run:03d}").mkdir(parents=True)
        for epoch in (1, 2):
            save_full(root / f"run{run:03d}" / f"e{epoch}.pt", epoch=epoch, mtime_ns=days_ago(1))
    command = [sys.executable, "-m", "sweeper", "sweep", str(root), "--dry-run", "--ledger",
               str(tmp_path / "ledger.jsonl")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    sweep = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    expected = min(len(os.sched_getaffinity(0)), 120)  # the pool's size
    try:
        deadline = time.monotonic() + 30
        while (
            len(_children(sweep.pid)) < expected
            and sweep.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        time.sleep(0.02)  # every worker started, and given a folder (the pool no longer forks)
        os.killpg(sweep.pid, signal.SIGSTOP)
        workers = _children(sweep.pid)
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        os.killpg(sweep.pid, signal.SIGCONT)
        for _ in range(60):
            try:
                stdout, stderr = sweep.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:
                # A worker forked while the group stop was delivered can miss the SIGCONT.
                os.killpg(sweep.pid, signal.SIGCONT)
        else:
            raise AssertionError("the sweep did not finish")
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert workers, "the sweep ended before its workers could be seen"
    assert sweep.returncode == 0, stderr
    assert "not swept" not in stdout
    assert all(f"run{run:03d}" in stdout for run in range(120)), stdout


def _render_or_die(run: RunFolder) -> str:
    if run.folder.display.endswith("run007"):
        os.kill(os.getpid(), signal.SIGKILL)  # each time this folder is classified
    return run.folder.display


def test_a_run_folder_that_kills_its_classifier_is_named_and_the_rest_are_classified(
    tmp_path: Path,
) -> None:
    """The chunk holding it dies; its folders are tried again one by one: only the folder
    that kills its classifier every time is lost, and named (the sweep then exits 1)."""
    root = tmp_path / "root"
    for run in range(40):
        (root / f"run{run:03d}").mkdir(parents=True)
        save_full(root / f"run{run:03d}" / "e1.pt", epoch=1, mtime_ns=days_ago(1))
    walk = Scan([str(root)], ("*.pt",), processes=2)

    done = [rendered.value for rendered in walk.rendered(_render_or_die)]

    assert sorted(done) == [str(root / f"run{run:03d}") for run in range(40) if run != 7]
    assert walk.failed == 1
    assert walk.problems == [(str(root / "run007"), "not swept: its classifier killed by SIGKILL")]


def _die_by_realtime_signal(task: int) -> int:
    if task == 1:
        os.kill(os.getpid(), signal.SIGRTMIN + 2)
    return task


def test_a_worker_killed_by_an_unnamed_signal_fails_only_its_task() -> None:
    results = dict(WorkerPool(2, _die_by_realtime_signal).map([0, 1, 2]))

    assert results[1] == WorkerDied(f"killed by signal {signal.SIGRTMIN + 2}")
    assert (results[0], results[2]) == (0, 2)


def test_workers_die_with_their_parent(tmp_path: Path) -> None:
    """``kill -9`` of a sweep must not leave its workers running (they would hold its locks)."""
    script = (
        "import time\n"
        "from sweeper.workers import WorkerPool\n"
        "list(WorkerPool(2, time.sleep).map([600.0] * 4))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 30
        while len(_children(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = _children(parent.pid)
        assert len(workers) == 2
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


# ---------------------------------------------------------------------------------------------
# ExecWorker: one long-lived worker from a fresh interpreter, for a process that has threads.


@pytest.fixture
def importable_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exec'd worker imports its work by name: worker_tasks must be on its path."""
    tests = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, str(REPO_ROOT)]))


@pytest.mark.usefixtures("importable_tests")
def test_an_exec_worker_reads_what_it_is_sent_and_a_dead_one_is_replaced(tmp_path: Path) -> None:
    """Started while another thread runs (where a fork would copy that thread's locks); the
    descriptor it reads is the one it was sent, even once the file's name is gone."""
    busy = threading.Event()
    spinner = threading.Thread(target=busy.wait, daemon=True)
    spinner.start()
    (tmp_path / "f").write_bytes(b"the file the parent opened")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    (tmp_path / "f").unlink()
    worker: ExecWorker[tuple[str, float], tuple[bytes, int]] = ExecWorker(exec_task)
    try:
        first = worker.call(("read", 0), [fd])
        died = worker.call(("die", 0))
        after = worker.call(("read", 0), [fd])
    finally:
        worker.close()
        os.close(fd)
        busy.set()

    assert isinstance(first, tuple) and first[0] == b"the file the parent opened"
    assert died == WorkerDied("killed by SIGKILL")
    assert isinstance(after, tuple) and after[0] == first[0] and after[1] != first[1]
    assert worker.started == 2
    assert first[1] != os.getpid() and not os.path.exists(f"/proc/{after[1]}/status")


@pytest.mark.usefixtures("importable_tests")
def test_an_exec_worker_under_an_address_space_limit_fails_with_memory_error() -> None:
    """64 MiB more than it starts with: a 256 MiB allocation fails there, as MemoryError (the
    task fails, the worker lives on); without the limit the same allocation succeeds."""
    limited: ExecWorker[tuple[str, float], tuple[bytes, int]] = ExecWorker(
        exec_task, functools.partial(limit_address_space, 64 * 1024 * 1024)
    )
    free: ExecWorker[tuple[str, float], tuple[bytes, int]] = ExecWorker(exec_task)
    try:
        refused = limited.call(("allocate", 256))
        small = limited.call(("allocate", 16))
        unlimited = free.call(("allocate", 256))
    finally:
        limited.close()
        free.close()

    assert isinstance(refused, WorkerDied) and refused.how.startswith("raised MemoryError")
    assert isinstance(small, tuple) and limited.started == 1
    assert isinstance(unlimited, tuple)


@pytest.mark.usefixtures("importable_tests")
def test_a_stop_request_ends_an_exec_worker_promptly() -> None:
    worker: ExecWorker[tuple[str, float], tuple[bytes, int]] = ExecWorker(exec_task)
    pid = worker.call(("read", 0))
    assert isinstance(pid, tuple)
    started = time.monotonic()

    with pytest.raises(Stopped):
        worker.call(("sleep", 600), should_stop=lambda: time.monotonic() > started + 0.5)

    assert time.monotonic() - started < 10
    assert not os.path.exists(f"/proc/{pid[1]}/status")
    worker.close()


@pytest.mark.usefixtures("importable_tests")
def test_an_exec_worker_dies_with_its_parent() -> None:
    script = (
        "from sweeper.workers import ExecWorker\n"
        "from worker_tasks import exec_task\n"
        "print(ExecWorker(exec_task).call(('read', 0))[1], flush=True)\n"
        "ExecWorker(exec_task).call(('sleep', 600))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        parent.stdout.readline()  # the first worker answered: the second is about to start
        deadline = time.monotonic() + 30
        while len(_children(parent.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = _children(parent.pid)
        assert workers
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)
