"""Dry runs of a tree of N small checkpoints with and without the persistent scan cache, and the
floors of a walk and of a read, side by side.

    python bench/bench_scan_cache.py [--files 10000] [--rounds 3] [--no-baseline]

Rows, each the median of ``--rounds`` runs (peak RSS the largest):
- ``--no-cache``: every file's pickle read (what every run cost before the cache);
- cold: the cache empty (every file read, and its row written);
- warm: the cache filled by an earlier run and nothing changed (a ``stat`` and a row per file);
- walk floor: a Python ``os.scandir`` + ``lstat`` walk of the same tree, in one process (what
  a warm run is measured against);
- read floor: ``bench/floor_read.py`` as a whole process: the walk, and for each file its end
  records, central directory and ``data.pkl`` read (nothing parsed), in as many processes as
  sweeper uses (what a cold run is measured against).
Then the cache file's size per file.  The tree is ``bench/make_tree.py --distinct``'s (no two
pickles the same; reused when built).  ``--no-baseline`` leaves out the ``--no-cache`` row (for
the largest trees, where it costs as much as the cold one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence

from harness import CHILD_ENV, Timed, machine, sweeper_command, timed_process
from make_tree import build_tree, glob_root


def floor_walk(top: str) -> float:
    """scandir + lstat of every entry below ``top``: the least a warm sweep must do."""
    start = time.perf_counter()
    stack = [top]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                del info
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/sweeper-bench-cache")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--no-baseline", action="store_true", help="no --no-cache row")
    args = parser.parse_args(argv)
    tree = os.path.join(args.workdir, "tree")
    state = os.path.join(args.workdir, "state")
    os.makedirs(state, exist_ok=True)
    build_tree(tree, args.files, distinct=True)
    ledger = os.path.join(state, "ledger.jsonl")
    cache = ledger + ".scan-cache"
    base = [*sweeper_command(), "sweep", glob_root(tree), "--dry-run", "--json"]
    base += ["--ledger", ledger, "min_age_seconds=0"]
    log = os.path.join(args.workdir, "stderr.log")

    def run(*extra: str) -> tuple[float, float, int]:
        timing = timed_process([*base, *extra], log, env=CHILD_ENV)
        return timing.wall_s, timing.cpu_s, timing.peak_rss_kib

    floor_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_read.py")

    def run_floor_read() -> Timed:
        return timed_process([sys.executable, floor_script, glob_root(tree)], log, env=CHILD_ENV)

    def drop_cache() -> None:
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(cache + suffix):
                os.unlink(cache + suffix)

    names = ("cold", "warm") if args.no_baseline else ("no-cache", "cold", "warm")
    rows: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
    walks: list[float] = []
    reads: list[float] = []
    processes = len(os.sched_getaffinity(0))  # as many as sweeper's classifiers
    for _ in range(args.rounds):
        if not args.no_baseline:
            rows["no-cache"].append(run("--no-cache"))
        drop_cache()
        rows["cold"].append(run())
        rows["warm"].append(run())
        walks.append(floor_walk(tree))
        reads.append(run_floor_read().wall_s)
    cache_bytes = sum(
        os.path.getsize(cache + s) for s in ("", "-wal") if os.path.exists(cache + s)
    )
    summary = {
        name: {
            "wall_s": statistics.median(r[0] for r in runs),
            "cpu_s": statistics.median(r[1] for r in runs),
            "peak_rss_mib": max(r[2] for r in runs) / 1024,
        }
        for name, runs in rows.items()
    }
    walk_s, read_s = statistics.median(walks), statistics.median(reads)
    result: dict[str, object] = {
        "files": args.files,
        "rows": summary,
        "floor_walk_s": walk_s,
        "floor_read_s": read_s,
        "warm_vs_walk_floor": summary["warm"]["wall_s"] / walk_s,
        "cold_vs_read_floor": summary["cold"]["wall_s"] / read_s,
        "cache_bytes_per_file": cache_bytes / args.files,
        "machine": machine(tree),
    }
    if not args.no_baseline:
        result["warm_vs_no_cache"] = summary["warm"]["wall_s"] / summary["no-cache"]["wall_s"]
        result["cold_vs_no_cache"] = summary["cold"]["wall_s"] / summary["no-cache"]["wall_s"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.files} checkpoints, median of {args.rounds}")
    print(f"{'run':>10} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}")
    for name, row in summary.items():
        print(f"{name:>10} {row['wall_s']:8.2f} {row['cpu_s']:8.2f} {row['peak_rss_mib']:9.1f}")
    print(f"{'walk':>10} {walk_s:8.2f}  (floor: scandir + lstat walk, one process)")
    print(f"{'read':>10} {read_s:8.2f}  (floor: walk + end record, directory, data.pkl; "
          f"{processes} processes)")  # fmt: skip
    print(
        f"warm / walk floor: {result['warm_vs_walk_floor']:.1f}x; cold / read floor: "
        f"{result['cold_vs_read_floor']:.1f}x; cache: {cache_bytes / args.files:.0f} bytes per file"
    )
    if not args.no_baseline:
        print(
            f"warm / no-cache: {result['warm_vs_no_cache']:.2f}x; "
            f"cold / no-cache: {result['cold_vs_no_cache']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
