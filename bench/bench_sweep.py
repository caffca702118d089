"""Sweep planning benchmark (issue 3): `sweeper sweep --dry-run` against naive torch.load.

    python bench/bench_sweep.py [--rounds R] [--files N] [--scales A,B,...] [--workdir DIR]
                                [--keep] [--json] [--profile] [--baseline SRC]

Builds (with bench/make_tree.py) a tree of N / 10 run folders x 10 small full checkpoints
(default N = 10,000) under DIR/N/data/user*/proj*/results/checkpoints/run*, plus one tree per
extra scale, then times, as whole processes, interleaved for R rounds:

  sweeper        sweeper sweep 'DIR/N/data/*/*/results/checkpoints' --dry-run --json --no-cache
                 --ledger ...  (the root is a glob, so root expansion is part of the timing; no
                 scan cache, so every run is cold: every file's pickle is read and planned)
  naive          python bench/naive_classify.py 'DIR/N/data/*/*/results/checkpoints'
                 (os.walk + torch.load(weights_only=False) on every file, classified by its keys)
  floor          python bench/floor_read.py 'DIR/N/data/*/*/results/checkpoints'
                 (scandir, and per file the zip's end records, central directory and data.pkl
                 read, in as many forked processes as sweeper classifies with: what any cold
                 classifier must do)
  sweeper@A ...  the same dry run on the smaller trees: does peak RSS stay flat as trees grow?
  baseline       with --baseline SRC: the same dry run by the sweeper source tree at SRC (e.g.
                 `git worktree add /tmp/base REV`), side by side, to see what a change costs

Every run's stdout is parsed and checked: sweeper must plan every file of its tree (one entry
each, none skipped, and write no ledger), naive must classify every file as full, the floor
must read every file.  Wall time is
taken around each process, spawn to reap.  Peak RSS and CPU time are the command's own, from GNU
time's wait4 (``run_process`` says why not this process's wait4).  The page cache is warm for
every method: one untimed run of each comes first.

With --profile, one extra untimed dry run of the largest tree runs under cProfile and the top
entries by cumulative and by own time go to stderr.

A benchmark, not a test (STYLE.md rule 15): it prints figures against the issue's targets and
never fails on them; it exits non-zero only if a command fails or its output is wrong.
Progress goes to stderr; the table (or, with --json, one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import StringIO

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from harness import (  # noqa: E402
    CHILD_ENV,
    GNU_TIME,
    CommandFailed,
    baseline_command,
    machine,
    sweeper_command,
    timed_process,
)
from make_tree import glob_root  # noqa: E402  (bench/ is not a package)

DEFAULT_WORKDIR = "/tmp/sweeper-bench"
DEFAULT_FILES = 10_000
DEFAULT_SCALES = (2_500, 5_000)
PER_RUN = 10
KEEP_FULL = 2  # the bundled default: every run's 2 newest get an inference copy, 8 are demoted

TARGET_SWEEPER_WALL_S = 4.0
# PYTHONDONTWRITEBYTECODE (set in some sandboxes) would leave an editable sweeper recompiling its
# modules on every start; children run as a normal install does.
MIB = 1024 * 1024


@dataclass(frozen=True)
class Run:
    wall_s: float
    cpu_s: float  # user + system, the command's own
    peak_rss_kib: int


@dataclass
class Series:
    """Every timed run of one method on one tree, filled in round by round."""

    method: str
    files: int
    command: str
    argv: list[str]
    runs: list[Run] = field(default_factory=list)
    env: dict[str, str] | None = None

    @property
    def median_wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(r.cpu_s for r in self.runs)

    @property
    def median_peak_kib(self) -> float:
        return statistics.median(r.peak_rss_kib for r in self.runs)

    @property
    def files_per_s(self) -> float:
        return self.files / self.median_wall_s


@dataclass(frozen=True)
class Result:
    rounds: int
    files: int
    series: tuple[Series, ...]
    plan_counts: dict[str, int]
    naive_counts: dict[str, int]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    def find(self, method: str, files: int) -> Series:
        return next(s for s in self.series if s.method == method and s.files == files)

    @property
    def sweeper(self) -> Series:
        return self.find("sweeper", self.files)

    @property
    def naive(self) -> Series:
        return self.find("naive", self.files)

    @property
    def floor(self) -> Series:
        return self.find("floor", self.files)

    @property
    def baseline(self) -> Series | None:
        return next((s for s in self.series if s.method == "baseline"), None)

    @property
    def scaling(self) -> list[Series]:
        return sorted((s for s in self.series if s.method == "sweeper"), key=lambda s: s.files)

    @property
    def kib_per_file(self) -> float:
        """Least-squares slope of sweeper's median peak RSS over the tree size."""
        points = [(s.files, s.median_peak_kib) for s in self.scaling]
        if len(points) < 2:
            return 0.0
        mean_x = statistics.fmean(x for x, _ in points)
        mean_y = statistics.fmean(y for _, y in points)
        num = sum((x - mean_x) * (y - mean_y) for x, y in points)
        den = sum((x - mean_x) ** 2 for x, _ in points)
        return num / den


def run_process(
    argv: Sequence[str], stdout_path: str, log_path: str, env: dict[str, str] | None = None
) -> Run:
    with open(stdout_path, "wb") as out:
        timed = timed_process(argv, log_path, out, env if env is not None else CHILD_ENV)
    return Run(timed.wall_s, timed.cpu_s, timed.peak_rss_kib)


def check_plan(stdout_path: str, files: int, tree: str, ledger: str) -> dict[str, int]:
    """The dry run planned every file of the tree, skipped none and wrote no ledger."""
    with open(stdout_path, "rb") as out:
        plan = json.load(out)
    entries = plan["entries"]
    paths = {entry["path"] for entry in entries}
    counts: dict[str, int] = plan["counts"]
    if len(entries) != files or len(paths) != files:
        raise CommandFailed(f"sweeper planned {len(entries)} entries ({len(paths)} paths), "
                            f"not {files}")  # fmt: skip
    if not all(path.startswith(tree + os.sep) for path in paths):
        raise CommandFailed(f"sweeper planned a path outside {tree}")
    runs = files // PER_RUN
    expected = {"extract": KEEP_FULL * runs, "delete": (PER_RUN - KEEP_FULL) * runs,
                "refresh": 0, "keep": 0, "skip": 0}  # fmt: skip
    if "refresh" not in counts:  # a baseline from before refresh entries existed
        del expected["refresh"]
    if counts != expected:
        raise CommandFailed(f"sweeper's plan counts {counts}, expected {expected}")
    if plan["problems"]:
        raise CommandFailed(f"sweeper reported problems: {plan['problems'][:3]}")
    if os.path.lexists(ledger):
        raise CommandFailed(f"the dry run wrote {ledger}")
    return counts


def check_naive(stdout_path: str, files: int) -> dict[str, int]:
    with open(stdout_path, "rb") as out:
        result = json.load(out)
    if result["files"] != files or result["counts"].get("full") != files:
        raise CommandFailed(f"naive classified {result}, expected {files} full")
    counts: dict[str, int] = result["counts"]
    return counts


def check_floor(stdout_path: str, files: int) -> None:
    with open(stdout_path, "rb") as out:
        result = json.load(out)
    if result["files"] != files:
        raise CommandFailed(f"the floor read {result['files']} files, expected {files}")


def build_trees(workdir: str, sizes: Sequence[int], log: str) -> None:
    maker = os.path.join(BENCH_DIR, "make_tree.py")
    for files in sizes:
        top = os.path.join(workdir, str(files))
        argv = [sys.executable, maker, top, "--files", str(files), "--per-run", str(PER_RUN)]
        print(f"tree of {files} checkpoints in {top} ...", file=sys.stderr)
        run = run_process(argv, os.devnull, log)
        print(f"  ready in {run.wall_s:.1f} s", file=sys.stderr)


def profile(sweeper_argv: list[str], stdout_path: str, log: str, top: int = 25) -> str:
    """One cProfile'd dry run (untimed); the top entries by cumulative and by own time."""
    stats_path = stdout_path + ".prof"
    module_argv = [sys.executable, "-m", "cProfile", "-o", stats_path, "-m", "sweeper"]
    run_process([*module_argv, *sweeper_argv[1:]], stdout_path, log)
    report = []
    for key in ("cumulative", "tottime"):
        buffer = StringIO()
        stats = pstats.Stats(stats_path, stream=buffer)
        stats.sort_stats(key).print_stats(top)
        report.append(f"--- top {top} by {key} ---\n" + buffer.getvalue().split("\n\n", 1)[-1])
    os.unlink(stats_path)
    return "\n".join(report)


def benchmark(
    rounds: int,
    files: int,
    scales: Sequence[int],
    workdir: str,
    keep: bool,
    profiled: bool,
    baseline: str | None = None,
) -> Result:
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "stderr.log")
    ledger = os.path.join(workdir, "ledger.jsonl")
    stdout_path = os.path.join(workdir, "stdout.json")
    sizes = sorted({*scales, files})
    sweeper = sweeper_command()
    naive = [sys.executable, os.path.join(BENCH_DIR, "naive_classify.py")]

    def sweep_argv(size: int) -> list[str]:
        root = glob_root(os.path.join(workdir, str(size)))
        return [*sweeper, "sweep", root, "--dry-run", "--json", "--no-cache", "--ledger", ledger]

    all_series = [Series("sweeper", n, " ".join(sweep_argv(n)), sweep_argv(n)) for n in sizes]
    naive_argv = [*naive, glob_root(os.path.join(workdir, str(files)))]
    all_series.insert(sizes.index(files) + 1,
                      Series("naive", files, " ".join(naive_argv), naive_argv))  # fmt: skip
    floor_argv = [sys.executable, os.path.join(BENCH_DIR, "floor_read.py"),
                  glob_root(os.path.join(workdir, str(files)))]  # fmt: skip
    all_series.insert(sizes.index(files) + 2,
                      Series("floor", files, " ".join(floor_argv), floor_argv))  # fmt: skip
    if baseline is not None:
        command, env = baseline_command(baseline)
        module = [*command, *sweep_argv(files)[len(sweeper) :]]
        all_series.insert(sizes.index(files) + 1,
                          Series("baseline", files, f"PYTHONPATH={baseline} " + " ".join(module),
                                 module, env=env))  # fmt: skip
    succeeded = False
    try:
        build_trees(workdir, sizes, log)
        plan_counts: dict[str, int] = {}
        naive_counts: dict[str, int] = {}

        def run_and_check(series: Series) -> Run:
            nonlocal plan_counts, naive_counts
            run = run_process(series.argv, stdout_path, log, series.env)
            if series.method == "naive":
                naive_counts = check_naive(stdout_path, series.files)
            elif series.method == "floor":
                check_floor(stdout_path, series.files)
            else:
                tree = os.path.join(workdir, str(series.files))
                counts = check_plan(stdout_path, series.files, tree, ledger)
                if series.method == "sweeper" and series.files == files:
                    plan_counts = counts
            os.unlink(stdout_path)
            return run

        print("warming up (untimed) ...", file=sys.stderr)
        for series in all_series:
            run = run_and_check(series)
            print(f"  {series.method}@{series.files}: {run.wall_s:.2f} s", file=sys.stderr)
        if profiled:
            print(profile(sweep_argv(max(sizes)), stdout_path, log), file=sys.stderr)
            os.unlink(stdout_path)

        load_before = os.getloadavg()
        for number in range(1, rounds + 1):
            for series in all_series:
                run = run_and_check(series)
                series.runs.append(run)
                print(f"round {number}/{rounds}  {series.method + '@' + str(series.files):<14}"
                      f" {run.wall_s:7.3f} s wall {run.cpu_s:7.3f} s cpu "
                      f"{run.peak_rss_kib / 1024:7.1f} MiB", file=sys.stderr)  # fmt: skip
        result = Result(
            rounds,
            files,
            tuple(all_series),
            plan_counts,
            naive_counts,
            load_before,
            os.getloadavg(),
        )
        succeeded = True
        return result
    finally:
        for path in (stdout_path, ledger):
            if os.path.lexists(path):
                os.unlink(path)
        if succeeded and os.path.exists(log):
            os.unlink(log)  # kept on failure: it holds the failing command's stderr
        if not keep:
            for size in sizes:
                shutil.rmtree(os.path.join(workdir, str(size)), ignore_errors=True)
            if not os.listdir(workdir):
                os.rmdir(workdir)


def to_json(result: Result, workdir: str) -> dict[str, object]:
    sweeper, naive = result.sweeper, result.naive
    return {
        "benchmark": "sweep",
        "rounds": result.rounds,
        "files": result.files,
        "machine": machine(workdir),
        "load_average_before": result.load_before,
        "load_average_after": result.load_after,
        "peak_rss_from": "GNU time %M" if GNU_TIME else "os.wait4 (includes this process's RSS)",
        "plan_counts": result.plan_counts,
        "naive_counts": result.naive_counts,
        "series": [
            {
                "method": s.method,
                "files": s.files,
                "command": s.command,
                "median_wall_s": round(s.median_wall_s, 4),
                "median_cpu_s": round(s.median_cpu_s, 4),
                "files_per_s": round(s.files_per_s, 1),
                "median_peak_rss_kib": round(s.median_peak_kib),
                "wall_s": [round(r.wall_s, 4) for r in s.runs],
                "cpu_s": [round(r.cpu_s, 4) for r in s.runs],
                "peak_rss_kib": [r.peak_rss_kib for r in s.runs],
            }
            for s in result.series
        ],
        "naive_over_sweeper_wall": round(naive.median_wall_s / sweeper.median_wall_s, 3),
        "naive_over_sweeper_cpu": round(naive.median_cpu_s / sweeper.median_cpu_s, 3),
        "sweeper_over_floor_wall": round(sweeper.median_wall_s / result.floor.median_wall_s, 3),
        "sweeper_us_per_file_wall": round(sweeper.median_wall_s / result.files * 1e6, 1),
        "floor_us_per_file_wall": round(result.floor.median_wall_s / result.files * 1e6, 1),
        "baseline_over_floor_wall": (
            round(result.baseline.median_wall_s / result.floor.median_wall_s, 3)
            if result.baseline is not None
            else None
        ),
        "sweeper_over_baseline_wall": (
            round(sweeper.median_wall_s / result.baseline.median_wall_s, 3)
            if result.baseline is not None
            else None
        ),
        "sweeper_wall_target_s": TARGET_SWEEPER_WALL_S,
        "sweeper_wall_target_met": sweeper.median_wall_s <= TARGET_SWEEPER_WALL_S,
        "sweeper_peak_rss_kib_per_file": round(result.kib_per_file, 4),
    }


def render(result: Result) -> str:
    sweeper, naive, floor = result.sweeper, result.naive, result.floor
    lines = [
        f"{result.files} files ({result.files // PER_RUN} runs x {PER_RUN}); "
        f"{result.rounds} interleaved rounds; medians, with min and max wall",
        f"load average before {result.load_before[0]:.2f}, after {result.load_after[0]:.2f} "
        f"({os.cpu_count()} CPUs)",
        "",
        f"{'method':<10} {'files':>6} {'wall s':>8} {'min':>8} {'max':>8} {'cpu s':>8} "
        f"{'files/s':>9} {'peak RSS MiB':>13}",
    ]
    for s in result.series:
        walls = [r.wall_s for r in s.runs]
        lines.append(
            f"{s.method:<10} {s.files:>6} {s.median_wall_s:8.3f} {min(walls):8.3f} "
            f"{max(walls):8.3f} {s.median_cpu_s:8.3f} {s.files_per_s:9.0f} "
            f"{s.median_peak_kib / 1024:13.1f}"
        )
    met = "met" if sweeper.median_wall_s <= TARGET_SWEEPER_WALL_S else "MISSED"
    lines += [
        "",
        f"plan: {result.plan_counts}; naive: {result.naive_counts}",
        f"naive / sweeper wall                 {naive.median_wall_s / sweeper.median_wall_s:8.2f}",
        f"naive / sweeper cpu                  {naive.median_cpu_s / sweeper.median_cpu_s:8.2f}",
        f"sweeper / floor wall                 {sweeper.median_wall_s / floor.median_wall_s:8.2f}"
        f"  ({_per_file_us(sweeper, result.files):.0f} vs "
        f"{_per_file_us(floor, result.files):.0f} us per file)",
        *(
            [
                f"baseline / floor wall                "
                f"{base.median_wall_s / floor.median_wall_s:8.2f}"
                f"  ({_per_file_us(base, result.files):.0f} us per file)",
            ]
            if (base := result.baseline) is not None
            else []
        ),
        *(
            [
                f"sweeper / baseline wall              "
                f"{sweeper.median_wall_s / base.median_wall_s:8.2f}",
                f"sweeper / baseline cpu               "
                f"{sweeper.median_cpu_s / base.median_cpu_s:8.2f}",
            ]
            if (base := result.baseline) is not None
            else []
        ),
        f"sweeper wall s, {result.files} files        {sweeper.median_wall_s:8.3f}"
        f"  target <= {TARGET_SWEEPER_WALL_S:g}: {met}",
        f"sweeper peak RSS growth KiB/file     {result.kib_per_file:8.3f}"
        f"  ({', '.join(f'{s.median_peak_kib / 1024:.1f}' for s in result.scaling)} MiB "
        f"at {', '.join(str(s.files) for s in result.scaling)} files)",
    ]
    return "\n".join(lines)


def _per_file_us(series: Series, files: int) -> float:
    return series.median_wall_s / files * 1e6


def parse_scales(text: str) -> list[int]:
    try:
        scales = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(n < PER_RUN or n % PER_RUN for n in scales):
        raise argparse.ArgumentTypeError(f"every scale must be a positive multiple of {PER_RUN}")
    return scales


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time sweeper's dry run against torch.load.")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--files", type=int, default=DEFAULT_FILES,
                        help=f"checkpoints in the main tree ({DEFAULT_FILES})")  # fmt: skip
    parser.add_argument("--scales", type=parse_scales, default=list(DEFAULT_SCALES),
                        help="smaller trees for the memory scaling, comma-separated "
                        "(2500,5000; empty for none)")  # fmt: skip
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help=f"for the trees ({DEFAULT_WORKDIR})")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="keep the trees, and reuse them next time")  # fmt: skip
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile one dry run of the largest tree (top 25 to stderr)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--baseline", metavar="SRC",
                        help="also time the sweeper source tree at SRC on the main tree "
                        "(e.g. made by `git worktree add SRC REV`)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.baseline is not None and not os.path.isdir(os.path.join(args.baseline, "sweeper")):
        parser.error(f"--baseline {args.baseline}: no sweeper package there")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.files < PER_RUN or args.files % PER_RUN:
        parser.error(f"--files must be a positive multiple of {PER_RUN}")
    workdir = os.path.abspath(args.workdir)
    if not GNU_TIME:
        print("bench_sweep: no GNU time at /usr/bin/time; peak RSS includes this process's",
              file=sys.stderr)  # fmt: skip
    try:
        result = benchmark(
            args.rounds,
            args.files,
            args.scales,
            workdir,
            args.keep,
            args.profile,
            args.baseline,
        )
    except CommandFailed as error:
        print(f"bench_sweep: {error}", file=sys.stderr)
        return 1
    print(json.dumps(to_json(result, workdir), indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
