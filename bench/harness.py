"""What the benchmarks share: how children are run and timed, and which sweeper they run."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

# Children run as a normal install would: this sandbox sets PYTHONDONTWRITEBYTECODE, which would
# make an editable sweeper recompile its modules on every start.
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


class CommandFailed(Exception):
    pass


def find_gnu_time() -> str | None:
    path = "/usr/bin/time"
    if not os.access(path, os.X_OK):
        return None
    probe = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return path if "GNU" in probe.stdout + probe.stderr else None


GNU_TIME = find_gnu_time()


def sweeper_command() -> list[str]:
    beside = os.path.join(os.path.dirname(sys.executable), "sweeper")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("sweeper")
    return [found] if found else [sys.executable, "-m", "sweeper"]


def baseline_command(source: str) -> tuple[list[str], dict[str, str]]:
    """Run the sweeper source tree at ``source`` (e.g. a ``git worktree`` of an older commit)
    with this interpreter's installed dependencies.  ``-S`` keeps site's ``.pth`` files out (an
    editable install's import hook would load the working tree's sweeper whatever PYTHONPATH
    says) and ``-P`` the working directory (Python >= 3.11)."""
    import site

    path = [os.path.abspath(source), *site.getsitepackages()]
    return [sys.executable, "-P", "-S", "-m", "sweeper"], {
        **CHILD_ENV,
        "PYTHONPATH": os.pathsep.join(path),
    }


def describe_digests(before: str, after: str) -> str:
    if before == after:
        return before
    return f"{before[:16]}.. -> {after[:16]}.. (sweeper's sources changed during the run)"


def filesystem_of(path: str) -> str:
    """The device and filesystem type holding ``path``, from /proc/mounts."""
    best = ("", "?", "?")
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, mount_point, fs_type = line.split()[:3]
                inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best[0]):
                    best = (mount_point, device, fs_type)
    except OSError:
        pass
    return f"{best[1]} ({best[2]} on {best[0]})"


def machine(path: str) -> dict[str, object]:
    """What the figures were measured on, with the filesystem holding ``path``."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "workdir_filesystem": filesystem_of(path),
    }


@dataclass(frozen=True)
class Timed:
    wall_s: float
    cpu_s: float  # user + system, the command's own
    peak_rss_kib: int


def timed_process(
    argv: Sequence[str],
    log_path: str,
    stdout: IO[bytes] | None = None,
    env: Mapping[str, str] = CHILD_ENV,
) -> Timed:
    """Run one process to completion: wall time from spawn to reap, its CPU time and peak RSS.

    The kernel carries the RSS high-water mark across fork and exec, so a child spawned straight
    from a benchmark never reports less than the benchmark's own RSS.  GNU time, itself tiny,
    forks the command and reports the command's own figures from its wait4; without GNU time the
    benchmark's wait4 figures are used, floor and all.  stderr goes to ``log_path``.
    """
    usage_file = log_path + ".usage"
    wrapped = [GNU_TIME, "-f", "%M %U %S", "-o", usage_file, *argv] if GNU_TIME else list(argv)
    with open(log_path, "ab") as log:
        started = time.perf_counter()
        child = subprocess.Popen(
            wrapped,
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stderr=log,
            env=dict(env),
        )
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen quiet
    if child.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} exited {child.returncode}; see {log_path}")
    peak_kib, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    if GNU_TIME:
        with open(usage_file) as report:
            fields = report.read().split()[-3:]
        os.unlink(usage_file)
        peak_kib, cpu = int(fields[0]), float(fields[1]) + float(fields[2])
    return Timed(wall, cpu, peak_kib)
