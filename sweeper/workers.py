"""Worker processes that survive their own deaths: one task per worker at a time.

``multiprocessing.Pool.imap`` waits for ever for the result of a task whose worker died (an
OOM kill, ``kill -9``), and a sweep under the timer unit then hangs for hours with SIGTERM
ignored.  Here each worker takes one task over its own pipe, the parent watches every busy
worker's pipe *and* its process sentinel, and a worker that dies fails only the task it held:
that result is a :class:`WorkerDied`, a fresh worker takes its place, and the rest go on.  The
parent polls ``should_stop`` while it waits, so a stop request ends everything promptly.

:class:`WorkerPool` forks its workers, for one-shot commands; :class:`ExecWorker` is one
long-lived worker started from a fresh interpreter, for the daemon, whose threads a fork would
copy mid-step (a lock one of them holds stays held in the child for ever).  Either kind can cap
its own address space (:func:`limit_address_space`), so that reading a hostile file fails with
MemoryError in the worker instead of growing a process until the OOM killer ends it.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkProcess
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POLL_SECONDS = 0.25
# What a worker that reads untrusted files may map beyond what it starts with, unless
# configured (classify_memory_limit).  A file that passes there is then copied by its parent
# (read, written, read back and compared) at up to ~2x what reading it took: 869 MiB for the
# costliest file we could craft to pass 512 MiB, inside the units' MemoryMax=2G.  Real
# checkpoints fit: 60,000 parameter tensors with AdamW state take 354 MiB to read (100,000 take
# ~600 MiB: raise this, and MemoryMax, for such).
READER_MEMORY_LIMIT = 512 * 1024**2


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
    initializer: Callable[[], object],
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
        initializer: Callable[[], object] = lambda: None,
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
        self,
        tasks: Iterable[T],
        should_stop: Callable[[], bool] = lambda: False,
        *,
        window: int | None = None,
    ) -> Iterator[tuple[T, R | WorkerDied]]:
        """Each task with its result (or :class:`WorkerDied`), in the order of ``tasks``, which
        are taken from the iterable only as workers are ready for them.  At most ``window``
        tasks are in flight or held back for order (by default 16 per process, at least 64:
        room to work past one slow task).  Raises :class:`Stopped` when ``should_stop`` turns
        true first."""
        window = window if window is not None else max(64, self._processes * 16)
        source = iter(tasks)
        pending: dict[int, T] = {}  # sent, and not yet yielded
        results: dict[int, R | WorkerDied] = {}
        workers: list[_Worker] = []
        sent = done = 0
        exhausted = False
        try:
            while True:
                if should_stop():
                    raise Stopped()
                for position, worker in enumerate(workers):
                    if worker.task is None and not worker.process.is_alive():
                        worker.process.join()  # died idle: replaced, no task blamed
                        worker.conn.close()
                        workers[position] = self._start()
                while not exhausted and sent - done < window:
                    idle = next((w for w in workers if w.task is None), None)
                    if idle is None and len(workers) >= self._processes:
                        break
                    try:
                        task = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    if idle is None:  # workers start as tasks come: none for none
                        idle = self._start()
                        workers.append(idle)
                    pending[sent] = task
                    idle.task = sent
                    # if it died, its sentinel says so below, and the task fails
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        idle.conn.send((sent, task))
                    sent += 1
                if exhausted and done == sent:
                    return
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
                    yield pending.pop(done), results.pop(done)
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


def limit_address_space(extra: int) -> bool:
    """Cap this process's address space (RLIMIT_AS) at what it maps now plus ``extra`` bytes:
    past it an allocation fails with MemoryError instead of growing the process until the OOM
    killer ends it.  False when the limit could not be set (a seccomp filter that denies
    setrlimit/prlimit64 answers EPERM), in which case nothing changed."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        ceiling = mapped + extra
        if hard != resource.RLIM_INFINITY:
            ceiling = min(ceiling, hard)
        resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    except (OSError, ValueError):
        return False
    return True


def address_space_limit_problem() -> str | None:
    """Why this process (and so its workers) cannot lower its RLIMIT_AS, or None when it can:
    set to what it already is, which changes nothing."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, resource.getrlimit(resource.RLIMIT_AS))
    except (OSError, ValueError) as error:
        return str(getattr(error, "strerror", None) or error)
    return None


def _nothing() -> None:
    pass


class ExecWorker(Generic[T, R]):
    """One worker process, started by exec of a fresh interpreter that imports this very
    sweeper, and reused call after call: ``call(task, fds)`` runs ``work(task, fds)`` there and
    returns its result, or :class:`WorkerDied` when the worker died (or ``work`` raised); the
    next call starts a fresh worker.  Open file descriptors travel with the task (SCM_RIGHTS),
    so the worker reads exactly the file its parent opened.

    ``work`` and ``initializer`` must be importable (module-level functions, or partials of
    them): they reach the worker pickled.  Calls are serialised; ``close`` ends the worker (a
    later call starts another).
    """

    def __init__(
        self,
        work: Callable[[T, list[int]], R],
        initializer: Callable[[], object] = _nothing,
    ) -> None:
        self._work = work
        self._initializer = initializer
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._sock: socket.socket | None = None
        self.started = 0  # workers started so far: a new number means a fresh worker

    def ensure_started(self) -> int:
        """Start the worker unless one is running; the number of the running one."""
        with self._lock:
            self._ensure()
            return self.started

    def call(
        self, task: T, fds: Sequence[int] = (), should_stop: Callable[[], bool] = lambda: False
    ) -> R | WorkerDied:
        """Raises :class:`Stopped` (the worker ended) when ``should_stop`` turns true first."""
        with self._lock:
            conn, sock = self._ensure()
            # if it died, the closed pipe says so below, and the task fails
            with contextlib.suppress(OSError):
                conn.send((task, len(fds)))
                if fds:
                    reduction.sendfds(sock, list(fds))
            while True:
                ready = wait([conn], timeout=_POLL_SECONDS)
                if should_stop():
                    self._end(kill=True)
                    raise Stopped()
                if not ready:
                    continue
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):  # it died: its end of the pipe closed
                    return WorkerDied(self._end(kill=False))
                return value if status == "ok" else WorkerDied(value)

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._end(kill=False, orderly=True)

    def _ensure(self) -> tuple[Connection, socket.socket]:
        if self._process is not None and self._conn is not None and self._sock is not None:
            return self._conn, self._sock
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with child:
            # -P: never import from the working directory; the parent's sweeper goes first.
            self._process = subprocess.Popen(
                [sys.executable, "-P", *_inherited_flags(), "-c", _EXEC_BOOT,
                 str(child.fileno()), str(os.getpid()), _sweeper_parent()],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )  # fmt: skip
        self._conn = Connection(os.dup(parent.fileno()))
        self._sock = parent
        self.started += 1
        with contextlib.suppress(OSError):
            self._conn.send((self._initializer, self._work))
        return self._conn, self._sock

    def _end(self, *, kill: bool, orderly: bool = False) -> str:
        """End (or reap) the worker; how it ended, in words."""
        process, conn, sock = self._process, self._conn, self._sock
        self._process = self._conn = self._sock = None
        assert process is not None and conn is not None and sock is not None
        if orderly:
            with contextlib.suppress(OSError):
                conn.send(None)  # an idle worker exits by itself
        elif kill:
            process.kill()
        conn.close()
        sock.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return _how(process.returncode)


_EXEC_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[3]); from sweeper.workers import _serve_exec; "
    "_serve_exec(int(sys.argv[1]), int(sys.argv[2]))"
)


def _sweeper_parent() -> str:
    """The folder that holds the sweeper package this process runs."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inherited_flags() -> list[str]:
    flags = sys.flags
    chosen = [("-I", flags.isolated), ("-E", flags.ignore_environment), ("-s", flags.no_user_site),
              ("-S", flags.no_site), ("-B", flags.dont_write_bytecode)]  # fmt: skip
    return [flag for flag, wanted in chosen if wanted]


def _serve_exec(fd: int, parent_pid: int) -> None:
    """The loop of an :class:`ExecWorker`: its initializer and work come first, then tasks."""
    conn = Connection(fd)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(fd))
    _die_with(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        initializer, work = conn.recv()
    except EOFError:
        return
    initializer()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        task, count = message
        fds = reduction.recvfds(sock, count) if count else []
        try:
            answer: tuple[str, object] = ("ok", work(task, fds))
        except BaseException as error:  # reported to the parent as this task's failure
            answer = ("error", f"raised {type(error).__name__}: {error}")
        finally:
            for received in fds:
                os.close(received)
        conn.send(answer)
