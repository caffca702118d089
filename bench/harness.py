"""What the benchmarks share: how children are run and timed, and which sweeper they run."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

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
