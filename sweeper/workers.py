"""Forked worker processes that survive their own deaths: one task per worker at a time.

``multiprocessing.Pool.imap`` waits for ever for the result of a task whose worker died (an
OOM kill, ``kill -9``), and a sweep under the timer unit then hangs for hours with SIGTERM
ignored.  Here each worker takes one task over its own pipe, the parent watches every busy
worker's pipe *and* its process sentinel, and a worker that dies fails only the task it held:
that result is a :class:`WorkerDied`, a fresh worker takes its place, and the rest go on.  The
parent polls ``should_stop`` while it waits, so a stop request ends everything promptly.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkProcess
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class WorkerDied:
    """The result of a task that did not complete: its worker died, or the task raised."""

    how: str  # "killed by SIGKILL", "exited with status 3", "raised MemoryError: ..."


class Stopped(Exception):
    """``should_stop`` said so while tasks were still running; every worker has been ended."""


@dataclass
class _Worker:
    process: ForkProcess
    conn: Connection
    task: int | None = None  # index of the task it holds


def _die_with(parent_pid: int) -> None:
    """Be killed when the parent dies (``kill -9``, an OOM kill): an orphaned worker would
    hold the parent's locks for ever.  Pipes alone cannot tell, since every worker inherits
    the parent's ends of them."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the request took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _serve(
    conn: Connection,
    parent_end: Connection,
    parent_pid: int,
    initializer: Callable[[], None],
    work: Callable[[object], object],
) -> None:
    _die_with(parent_pid)
    parent_end.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's handlers only set its flags
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    initializer()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, task = message
        try:
            answer: tuple[str, object] = ("ok", work(task))
        except BaseException as error:  # reported to the parent as this task's failure
            answer = ("error", f"raised {type(error).__name__}: {error}")
        conn.send((index, *answer))


class WorkerPool(Generic[T, R]):
    """``processes`` forked workers running ``work`` (after ``initializer``) on tasks in order.

    ``work`` and ``initializer`` reach the workers by fork, so closures are fine; tasks and
    results are pickled over pipes.
    """

    def __init__(
        self,
        processes: int,
        work: Callable[[T], R],
        initializer: Callable[[], None] = lambda: None,
    ) -> None:
        self._context = multiprocessing.get_context("fork")
        self._processes = max(1, processes)
        self._work = work
        self._initializer = initializer

    def _start(self) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve,
            args=(child, parent, os.getpid(), self._initializer, self._work),
            daemon=True,
        )
        process.start()
        child.close()
        return _Worker(process, parent)

    def map(
        self, tasks: Sequence[T], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[tuple[T, R | WorkerDied]]:
        """Each task with its result (or :class:`WorkerDied`), in the order of ``tasks``.
        Raises :class:`Stopped` when ``should_stop`` turns true first."""
        # Results held back for order stay bounded, with room to work past one slow folder.
        window = max(64, self._processes * 16)
        results: dict[int, R | WorkerDied] = {}
        workers = [self._start() for _ in range(min(self._processes, len(tasks)))]
        sent = done = 0
        try:
            while done < len(tasks):
                if should_stop():
                    raise Stopped()
                for position, worker in enumerate(workers):
                    if worker.task is None and not worker.process.is_alive():
                        worker.process.join()  # died idle: replaced, no task blamed
                        worker.conn.close()
                        workers[position] = worker = self._start()
                    if worker.task is None and sent < len(tasks) and sent - done < window:
                        worker.task = sent
                        # if it died, its sentinel says so below, and the task fails
                        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                            worker.conn.send((sent, tasks[sent]))
                        sent += 1
                busy = [w for w in workers if w.task is not None]
                ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                                 timeout=_POLL_SECONDS))  # fmt: skip
                if should_stop():  # (a stop signal to the process group reaches workers too)
                    raise Stopped()
                for position, worker in enumerate(workers):
                    if worker.task is None:
                        continue
                    if worker.conn in ready and self._receive(worker, results):
                        continue
                    if worker.process.sentinel in ready or not worker.process.is_alive():
                        worker.process.join()
                        results[worker.task] = WorkerDied(_how(worker.process.exitcode))
                        worker.conn.close()
                        workers[position] = self._start()
                while done in results:
                    yield tasks[done], results.pop(done)
                    done += 1
        finally:
            self._end(workers)

    @staticmethod
    def _receive(worker: _Worker, results: dict[int, R | WorkerDied]) -> bool:
        try:
            index, status, value = worker.conn.recv()
        except (EOFError, OSError):
            return False  # it died mid-answer: the sentinel branch fails the task
        results[index] = value if status == "ok" else WorkerDied(value)
        worker.task = None
        return True

    @staticmethod
    def _end(workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.task is None:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)  # orderly: an idle worker exits by itself
            else:
                worker.process.terminate()
        for worker in workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()


def _how(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"
