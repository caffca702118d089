"""Time a dry-run sweep of deep folder chains against an older sweeper, side by side.

    python bench/bench_walk.py --baseline SRC [--depths 250,2000,5000] [--rounds 3]

For each depth, a root holding one chain ``d/d/.../d`` of that many folders (made relative to the
last, since the path outgrows PATH_MAX) and one ordinary run folder; ``sweeper sweep --dry-run``
of it with this sweeper and with the baseline.  This sweeper's ``max_depth`` is raised to the
depth where it can be (up to 256: the whole chain is walked, so the figure compares the walks:
reopening every folder from the root costs depth squared, opening each relative to its parent
is linear); deeper chains are cut at 256 levels, which is what a user's chain costs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence

from harness import (
    CHILD_ENV,
    CommandFailed,
    baseline_command,
    machine,
    sweeper_command,
    timed_process,
)


def make_chain(top: str, depth: int) -> None:
    os.makedirs(top, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            below = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, metavar="SRC")
    parser.add_argument("--depths", default="250,2000,5000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/sweeper-bench-walk")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    log = os.path.join(args.workdir, "stderr.log")
    subprocess.run(["rm", "-rf", args.workdir], check=True)
    os.makedirs(args.workdir)
    baseline = baseline_command(args.baseline)
    rows = []
    try:
        for depth in (int(d) for d in args.depths.split(",")):
            root = os.path.join(args.workdir, f"root{depth}")
            make_chain(os.path.join(root, "chain"), depth)
            os.makedirs(os.path.join(root, "run"))
            sweep = ["sweep", root, "--dry-run", "--ledger", os.path.join(args.workdir, "l")]
            methods = {
                "sweeper": (
                    [*sweeper_command(), *sweep, f"max_depth={min(depth + 2, 256)}"],
                    CHILD_ENV,
                ),
                "baseline": ([*baseline[0], *sweep], baseline[1]),
            }
            walls: dict[str, list[float]] = {name: [] for name in methods}
            for number in range(args.rounds + 1):  # round 0 warms the caches, untimed
                for name, (command, env) in methods.items():
                    timed = timed_process(command, log, None, env)
                    if number:
                        walls[name].append(timed.wall_s)
            median = {name: statistics.median(values) for name, values in walls.items()}
            ratio = median["sweeper"] / median["baseline"]
            rows.append({"depth": depth, "median_wall_s": median, "ratio": ratio})
    except CommandFailed as error:
        print(f"bench_walk: {error}", file=sys.stderr)
        return 1
    finally:
        subprocess.run(["rm", "-rf", args.workdir], check=False)
    if args.json:
        print(json.dumps({"rows": rows, "rounds": args.rounds, "machine": machine("/tmp")}))
        return 0
    print(f"dry-run sweep of one folder chain; {args.rounds} rounds; median wall s")
    for row in rows:
        wall = row["median_wall_s"]
        print(f"  depth {row['depth']:>6}: sweeper {wall['sweeper']:.3f}  baseline "
              f"{wall['baseline']:.3f}  ratio {row['ratio']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
