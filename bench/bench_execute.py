"""Time a real sweep (extract, verify, ledger, delete) against an older sweeper, side by side.

    python bench/bench_execute.py --baseline SRC [--files 600] [--per-run 3] [--rounds 5]

SRC is a sweeper source tree (``git worktree add SRC REV``).  Each round copies one tree of
``--files`` small full checkpoints (bench/make_tree.py; ``--per-run`` to a run folder) twice and
runs ``sweeper sweep`` (``keep_full=1``: every checkpoint gets a copy, all but the newest of a run
are deleted) on one copy with this sweeper and on the other with the baseline, in alternating
order.  What differs between them is what each file costs in writes and fsyncs -- the ledger's
records above all -- so the figure is the ratio of median wall times.  Both must leave the same
tree and the same totals (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from make_tree import build_tree


def _names(top: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(folder, name), top)
        for folder, _, files in os.walk(top)
        for name in files
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, metavar="SRC")
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--per-run", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/sweeper-bench-execute")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    source = os.path.join(args.workdir, "source")
    log = os.path.join(args.workdir, "stderr.log")
    os.makedirs(args.workdir, exist_ok=True)
    build_tree(source, args.files, args.per_run)
    baseline = baseline_command(args.baseline)
    methods = {"sweeper": (sweeper_command(), CHILD_ENV), "baseline": baseline}
    walls: dict[str, list[float]] = {name: [] for name in methods}
    cpus: dict[str, list[float]] = {name: [] for name in methods}
    try:
        for number in range(args.rounds + 1):  # round 0 warms the caches, untimed
            order = list(methods) if number % 2 else list(reversed(methods))
            results = {}
            for name in order:
                tree = os.path.join(args.workdir, name)
                shutil.rmtree(tree, ignore_errors=True)
                subprocess.run(["cp", "-a", source, tree], check=True)
                subprocess.run(["sync"], check=True)
                ledger = os.path.join(tree, "ledger.jsonl")
                command, env = methods[name]
                sweep = ["sweep", os.path.join(tree, "data"), "--ledger", ledger, "--json"]
                sweep += ["min_age_seconds=0", "keep_full=1", "patterns=[checkpoint_epoch_*.pt]"]
                out = os.path.join(args.workdir, f"{name}.json")
                with open(out, "wb") as stdout:
                    timed = timed_process([*command, *sweep], log, stdout, env)
                with open(out) as file:
                    report = json.load(file)
                results[name] = (_names(os.path.join(tree, "data")), report["reclaimed_bytes"])
                if number:
                    walls[name].append(timed.wall_s)
                    cpus[name].append(timed.cpu_s)
            if results["sweeper"] != results["baseline"]:
                raise CommandFailed("the two sweeps left different trees or totals")
    except CommandFailed as error:
        print(f"bench_execute: {error}", file=sys.stderr)
        return 1
    median = {name: statistics.median(values) for name, values in walls.items()}
    cpu = {name: statistics.median(values) for name, values in cpus.items()}
    result = {
        "files": args.files,
        "per_run": args.per_run,
        "rounds": args.rounds,
        "median_wall_s": median,
        "median_cpu_s": cpu,
        "wall_ratio_sweeper_over_baseline": median["sweeper"] / median["baseline"],
        "cpu_ratio_sweeper_over_baseline": cpu["sweeper"] / cpu["baseline"],
        "machine": machine(args.workdir),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.files} checkpoints, {args.per_run} to a run folder, keep_full=1; "
              f"{args.rounds} rounds")  # fmt: skip
        for name in methods:
            print(f"  {name:9} median wall {median[name]:.3f} s, cpu {cpu[name]:.3f} s "
                  f"(min-max wall {min(walls[name]):.3f}-{max(walls[name]):.3f})")  # fmt: skip
        print(f"  sweeper/baseline: wall {result['wall_ratio_sweeper_over_baseline']:.2f}, "
              f"cpu {result['cpu_ratio_sweeper_over_baseline']:.2f}")  # fmt: skip
    shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
