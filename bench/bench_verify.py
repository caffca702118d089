"""What "intact means verified" costs a dry run (issue 7), side by side with a baseline.

    python bench/bench_verify.py --baseline SRC [--rounds R] [--width W] [--workdir DIR] [--keep]

Builds one run folder of three full checkpoints of the seed guide's shape (bench/make_checkpoint.py,
~1.0 GB each at the default width; the same bytes three times, mtimes an hour apart), so that
`keep_full: 2` keeps two and demotes one.  A planned deletion now counts on the two kept files,
so the dry run reads them in full to check every record's CRC; the baseline (a sweeper source
tree from before, e.g. `git worktree add SRC de18adc`) read only directories and pickles.
The floor is reading those two files and computing a CRC of them, nothing else (`cksum A B`).
Timed as whole processes, interleaved for R rounds, page cache warm (one untimed run first).

A benchmark, not a test: it prints figures and ratios and exits non-zero only when a command
fails or plans something else than expected.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Sequence

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from harness import (  # noqa: E402
    CHILD_ENV,
    CommandFailed,
    baseline_command,
    sweeper_command,
    timed_process,
)

HOUR_NS = 3600 * 10**9


def build(folder: str, width: int, log: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    first = os.path.join(folder, "checkpoint_epoch_1.pt")
    if not os.path.exists(first):
        maker = os.path.join(BENCH_DIR, "make_checkpoint.py")
        timed_process([sys.executable, maker, first, "--width", str(width)], log)
    names = [first]
    for n in (2, 3):
        path = os.path.join(folder, f"checkpoint_epoch_{n}.pt")
        if not os.path.exists(path):
            shutil.copyfile(first, path)
        names.append(path)
    base = 1_700_000_000 * 10**9
    for n, path in enumerate(names):
        os.utime(path, ns=(base + n * HOUR_NS, base + n * HOUR_NS))
    return names


def check(stdout_path: str) -> None:
    with open(stdout_path, "rb") as out:
        counts = json.load(out)["counts"]
    if (counts["extract"], counts["delete"]) != (2, 1):
        raise CommandFailed(f"planned {counts}, expected 2 extract and 1 delete")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, metavar="SRC")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=4096, help="make_checkpoint width (4096)")
    parser.add_argument("--workdir", default="/tmp/sweeper-bench-verify")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args(argv)
    folder = os.path.join(args.workdir, "run")
    log = os.path.join(args.workdir, "stderr.log")
    out = os.path.join(args.workdir, "stdout.json")
    ledger = os.path.join(args.workdir, "ledger.jsonl")
    os.makedirs(args.workdir, exist_ok=True)
    try:
        files = build(folder, args.width, log)
        sweep = ["sweep", folder, "--dry-run", "--json", "--ledger", ledger]
        baseline = baseline_command(args.baseline)
        methods = {
            "sweeper": ([*sweeper_command(), *sweep], CHILD_ENV),
            "baseline": ([*baseline[0], *sweep], baseline[1]),
            "floor": (["cksum", *files[1:]], CHILD_ENV),
        }
        walls: dict[str, list[float]] = {name: [] for name in methods}
        for number in range(args.rounds + 1):  # round 0 warms the page cache, untimed
            for name, (command, env) in methods.items():
                with open(out if name != "floor" else os.devnull, "wb") as stdout:
                    timed = timed_process(command, log, stdout, env)
                if name != "floor":
                    check(out)
                if number:
                    walls[name].append(timed.wall_s)
    except CommandFailed as error:
        print(f"bench_verify: {error}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    size = os.path.getsize(files[0]) if args.keep else None
    median = {name: statistics.median(values) for name, values in walls.items()}
    print(f"run folder of 3 full checkpoints{f' of {size} bytes' if size else ''}; "
          f"{args.rounds} rounds; median wall s")  # fmt: skip
    for name, value in median.items():
        print(f"  {name:<9} {value:8.3f}")
    print(f"sweeper / baseline               {median['sweeper'] / median['baseline']:8.2f}")
    extra = median["sweeper"] - median["baseline"]
    print(f"(sweeper - baseline) / floor     {extra / median['floor']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
