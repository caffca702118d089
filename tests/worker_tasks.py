"""Work for the exec'd workers of test_workers: importable by name, and light to import (a fresh
interpreter imports it before it can take a task)."""

from __future__ import annotations

import os
import signal
import time


def exec_task(task: tuple[str, float], fds: list[int]) -> tuple[bytes, int]:
    """What the exec'd worker does: read the first descriptor it was sent, die, sleep, or
    allocate ``task[1]`` MiB."""
    what, amount = task
    if what == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "sleep":
        time.sleep(amount)
    if what == "allocate":
        bytearray(int(amount) * 1024 * 1024)
    return os.pread(fds[0], 64, 0) if fds else b"", os.getpid()
