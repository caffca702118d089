"""Extraction on a filesystem that shares blocks (issue 14): sweeper against `cp --reflink`
and `cp` + `sync`, on a loop-mounted XFS made with ``reflink=1``.

    sudo python bench/bench_reflink.py [--rounds R] [--workdir DIR] [--keep] [--json]

Builds (bench/make_checkpoint.py, once; kept with --keep) the seed guide's ~1.0 GB full training
checkpoint, makes a sparse 3 GiB image in DIR, formats it XFS with reflink=1, loop-mounts it,
copies the checkpoint in (a plain copy: its blocks shared with nothing) and times, as whole
processes, interleaved for R rounds:

  sweeper     sweeper extract SRC -o OUT    (clone, copy heads and tails, fsync, read back, rename)
  reflink     cp --reflink=always SRC OUT   (the whole file, shared; no fsync)
  cp+sync     cp --reflink=never SRC OUT && sync OUT   (the whole file, copied)
  cp+sync-out cp --reflink=never F OUT && sync OUT     (F: a file of sweeper's output's size)

and, for each, the new space it took: the filesystem's used blocks after the run (and a sync)
minus before.  The source is warm in the page cache for every method (one untimed read, one
untimed run of each method first); before every timed run the previous output is removed and
the system synced.  Needs root (mkfs.xfs from xfsprogs, a loop device); the mount is undone and
the image removed at the end, whatever happens.

A benchmark, not a test (STYLE.md rule 15): it prints ratios against the issue's targets
(sweeper <= 0.05 x cp+sync wall; new space <= 1% of the output's size) and never fails on them;
it exits non-zero only if a command fails.  Progress goes to stderr; the table (or, with --json,
one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness import CommandFailed, machine, sweeper_command, timed_process

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WORKDIR = os.path.join(BENCH_DIR, "out", "reflink")
IMAGE_BYTES = 3 * 1024**3
FULL_SHAPE = (4096, 5)  # the seed guide's checkpoint, as bench_extract.py builds it
METHODS = ("sweeper", "reflink", "cp+sync", "cp+sync-out")
TARGET_WALL_OVER_CP_SYNC = 0.05
TARGET_NEW_SPACE_OVER_OUTPUT = 0.01
MIB = 1024 * 1024


@dataclass
class Series:
    method: str
    command: str
    output_bytes: int = 0
    walls: list[float] = field(default_factory=list)
    new_space: list[int] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(self.walls)

    @property
    def new_bytes(self) -> int:
        return int(statistics.median(self.new_space))


def used_bytes(path: str) -> int:
    """The filesystem's used bytes once it is quiet: XFS frees a removed file's blocks in the
    background after the unlink (and the sync), so read until the figure holds for 0.25 s."""
    os.sync()
    last, steady, deadline = -1, 0, time.monotonic() + 10
    while steady < 5 and time.monotonic() < deadline:
        vfs = os.statvfs(path)
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        steady = steady + 1 if used == last else 0
        last = used
        time.sleep(0.05)
    return last


def run(argv: Sequence[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CommandFailed(f"{what}: {' '.join(argv)}: {done.stderr.strip()[-300:]}")


def read_through(path: str) -> None:
    buffer = bytearray(MIB)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def remove(path: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)


def build_checkpoint(path: str, log: str) -> None:
    if os.path.exists(path):  # make_checkpoint.py writes atomically: a file here is whole
        print(f"reusing {path}", file=sys.stderr)
        return
    print(f"building {path} ...", file=sys.stderr)
    maker = os.path.join(BENCH_DIR, "make_checkpoint.py")
    width, layers = FULL_SHAPE
    timed_process([sys.executable, maker, path, "--width", str(width), "--layers", str(layers)],
                  log)  # fmt: skip


def mount_xfs(image: str, mount_point: str) -> None:
    if shutil.which("mkfs.xfs") is None:
        raise CommandFailed("mkfs.xfs is missing: apt-get install -y xfsprogs")
    with open(image, "wb") as file:
        file.truncate(IMAGE_BYTES)
    run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", image], "mkfs")
    os.makedirs(mount_point, exist_ok=True)
    run(["mount", "-o", "loop", image, mount_point], "mount")  # -o loop: detached on umount


def benchmark(rounds: int, workdir: str, keep: bool) -> tuple[list[Series], int, dict[str, object]]:
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "stderr.log")
    built = os.path.join(workdir, "full-{}x{}.pt".format(*FULL_SHAPE))
    image, disk = os.path.join(workdir, "xfs.img"), os.path.join(workdir, "xfs")
    build_checkpoint(built, log)
    mount_xfs(image, disk)
    try:
        source, sized = os.path.join(disk, "full.pt"), os.path.join(disk, "output-size.bin")
        outputs = {m: os.path.join(disk, f"out-{m.replace('+', '-')}.pt") for m in METHODS}
        sweeper = sweeper_command()
        commands = {
            "sweeper": [[*sweeper, "extract", source, "-o", outputs["sweeper"]]],
            "reflink": [["cp", "--reflink=always", source, outputs["reflink"]]],
            # --reflink=never: coreutils >= 9 shares blocks by default where it can.
            "cp+sync": [
                ["cp", "--reflink=never", source, outputs["cp+sync"]],
                ["sync", outputs["cp+sync"]],
            ],
            "cp+sync-out": [
                ["cp", "--reflink=never", sized, outputs["cp+sync-out"]],
                ["sync", outputs["cp+sync-out"]],
            ],
        }
        shutil.copyfile(built, source)
        print("warming up (untimed) ...", file=sys.stderr)
        read_through(source)
        for argv in commands["sweeper"]:
            timed_process(argv, log)
        shutil.copyfile(outputs["sweeper"], sized)  # a plain copy of exactly that size
        read_through(sized)
        for method in METHODS:
            if method != "sweeper":
                for argv in commands[method]:
                    timed_process(argv, log)
            remove(outputs[method])
        series = {
            m: Series(m, " && ".join(" ".join(argv) for argv in commands[m])) for m in METHODS
        }
        for number in range(1, rounds + 1):
            for method in METHODS:
                before = used_bytes(disk)
                wall = sum(timed_process(argv, log).wall_s for argv in commands[method])
                entry = series[method]
                entry.walls.append(wall)
                entry.new_space.append(used_bytes(disk) - before)
                entry.output_bytes = os.path.getsize(outputs[method])
                new = entry.new_space[-1] / MIB
                print(f"round {number}/{rounds}  {method:<12} {wall:7.3f} s  "
                      f"new space {new:9.3f} MiB", file=sys.stderr)  # fmt: skip
                remove(outputs[method])
                os.sync()  # untimed: the next run starts with nothing dirty
        return list(series.values()), os.path.getsize(source), machine(disk)
    finally:
        subprocess.run(["umount", disk], check=False)
        remove(image)
        if os.path.isdir(disk):
            os.rmdir(disk)
        if not keep:
            remove(built)
            remove(log)


def ratios(series: list[Series]) -> list[tuple[str, float, float | None]]:
    by = {s.method: s for s in series}
    sweeper = by["sweeper"]
    return [
        ("sweeper / cp+sync wall", sweeper.wall_s / by["cp+sync"].wall_s,
         TARGET_WALL_OVER_CP_SYNC),
        ("sweeper new space / its output", sweeper.new_bytes / sweeper.output_bytes,
         TARGET_NEW_SPACE_OVER_OUTPUT),
        ("sweeper / cp+sync-out wall", sweeper.wall_s / by["cp+sync-out"].wall_s, None),
        ("sweeper / reflink wall", sweeper.wall_s / by["reflink"].wall_s, None),
    ]  # fmt: skip


def render(series: list[Series], source_bytes: int, rounds: int) -> str:
    lines = [
        f"loop XFS (reflink=1); source {source_bytes / MIB:.1f} MiB; {rounds} interleaved rounds; "
        "medians",
        "",
        f"{'method':<12} {'wall s':>8} {'min':>8} {'max':>8} {'new space MiB':>14} "
        f"{'output MiB':>11}",
    ]
    for s in series:
        lines.append(
            f"{s.method:<12} {s.wall_s:8.3f} {min(s.walls):8.3f} {max(s.walls):8.3f} "
            f"{s.new_bytes / MIB:14.3f} {s.output_bytes / MIB:11.1f}"
        )
    lines.append("")
    for name, value, target in ratios(series):
        verdict = (
            ""
            if target is None
            else f"  target <= {target:g}: " + ("met" if value <= target else "MISSED")
        )
        lines.append(f"{name:<32} {value:9.4f}{verdict}")
    return "\n".join(lines)


def to_json(series: list[Series], source_bytes: int, rounds: int, where: object) -> object:
    return {
        "benchmark": "reflink",
        "rounds": rounds,
        "machine": where,
        "source_bytes": source_bytes,
        "methods": {
            s.method: {
                "command": s.command,
                "output_bytes": s.output_bytes,
                "median_wall_s": round(s.wall_s, 4),
                "wall_s": [round(w, 4) for w in s.walls],
                "median_new_space_bytes": s.new_bytes,
                "new_space_bytes": s.new_space,
            }
            for s in series
        },
        "ratios": [
            {"name": n, "value": round(v, 5), "target_max": t, "met": None if t is None else v <= t}
            for n, v, t in ratios(series)
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time sweeper extract on a loop XFS.")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="for the checkpoint and the image (bench/out/reflink)")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="keep the built checkpoint, and reuse it next time")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if os.geteuid() != 0:
        print("bench_reflink: needs root (mkfs.xfs, mount -o loop)", file=sys.stderr)
        return 1
    workdir = os.path.abspath(args.workdir)
    try:
        series, source_bytes, where = benchmark(args.rounds, workdir, args.keep)
    except CommandFailed as error:
        print(f"bench_reflink: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(to_json(series, source_bytes, args.rounds, where), indent=2))
    else:
        print(render(series, source_bytes, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
