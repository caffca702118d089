"""Extraction benchmark (issues 2 and 11): sweeper against the seed guide's method and `cp`.

    python bench/bench_extract.py [--rounds R] [--workdir DIR] [--keep] [--json]
                                  [--baseline TREE]

Builds (with bench/make_checkpoint.py) a full training checkpoint the size of the seed guide's
(84M fp32 parameters + AdamW state after one step + scheduler + OmegaConf config: ~1.0 GB) and
one a quarter of its size, then times, as whole processes, interleaved for R rounds:

  seed             python bench/seed_method.py SRC OUT  (torch.load + torch.save, no fsync)
  sweeper          sweeper extract SRC -o OUT   (copy, fsync, verify, rename, fsync dir)
  floor            cp F OUT && sync OUT         (F: a file exactly the size of sweeper's output)
  sweeper-quarter  sweeper extract on the quarter-size checkpoint (is peak RSS flat in size?)
  sweeper-many     sweeper extract of a checkpoint of 2,000 tensors of 1-100 KB (~136 MB file,
                   made by make_checkpoint.py --many 2000: a copy of 2,000 small records)
  floor-many       cp F OUT && sync OUT, F the size of sweeper-many's output
  baseline[-many]  with --baseline TREE: the sweeper source tree TREE (e.g. an export of an
                   older commit) on the same two checkpoints, side by side

sweeper is the source tree beside this bench (``python -P -S -m sweeper``, as the baseline),
run with ``--json``: its own ``seconds`` (open to the folder's fsync, without the interpreter's
start) are reported beside the wall time.

Wall time is measured around each process, spawn to reap.  Peak RSS is the command's own
ru_maxrss, taken through GNU time (``run_process`` says why not this process's wait4).
Sources are warm in the page cache for every method: one untimed read of each file and one
untimed run of seed and sweeper come first.  Before every timed run the previous output is
removed and the system synced, so no run pays for another's writeback.

A benchmark, not a test (STYLE.md rule 15): it prints ratios against the issue's targets and
never fails on them; it exits non-zero only if a command fails.  Progress goes to stderr; the
table (or, with --json, one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from harness import (
    CHILD_ENV,
    GNU_TIME,
    CommandFailed,
    baseline_command,
    describe_digests,
    machine,
    timed_process,
)

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WORKDIR = os.path.join(BENCH_DIR, "out", "extract")

# The seed guide's checkpoint: a ~332 MB model in a ~997 MB file.  5 x Linear(4096, 4096) is
# 83,906,560 parameters; the quarter-size one (2048 wide) shows whether memory stays flat.
FULL_SHAPE = (4096, 5)
QUARTER_SHAPE = (2048, 5)

TARGET_SWEEPER_OVER_SEED = 0.25
TARGET_SWEEPER_PEAK_MIB = 64.0

MANY_TENSORS = 2000
METHODS = ("seed", "sweeper", "floor", "sweeper-quarter", "sweeper-many", "floor-many")
BASELINE_METHODS = ("baseline", "baseline-many")
TARGET_MANY_OVER_FLOOR = 2.0
TARGET_LARGE_OVER_FLOOR = 1.3
MIB = 1024 * 1024

# Children may cache bytecode, as a normal install does.  A sandbox that sets
# PYTHONDONTWRITEBYTECODE leaves an editable sweeper recompiling its modules on every start
# (torch's and omegaconf's caches were written at install time), which would tilt the race.


@dataclass(frozen=True)
class Run:
    wall_s: float
    peak_rss_kib: int
    own_s: float | None = None  # sweeper's own "seconds" (--json)


@dataclass
class Series:
    """Every timed run of one method, filled in round by round."""

    method: str
    command: str
    output_bytes: int
    runs: list[Run] = field(default_factory=list)

    @property
    def median_wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def median_peak_mib(self) -> float:
        return statistics.median(r.peak_rss_kib for r in self.runs) / 1024

    @property
    def median_own_s(self) -> float | None:
        own = [r.own_s for r in self.runs if r.own_s is not None]
        return statistics.median(own) if own else None


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float
    target_max: float | None  # None: reported, no target

    @property
    def met(self) -> bool | None:
        return None if self.target_max is None else self.value <= self.target_max


@dataclass(frozen=True)
class Result:
    rounds: int
    source_bytes: int
    quarter_source_bytes: int
    many_source_bytes: int
    series: tuple[Series, ...]
    bench_self_peak_rss_kib: int
    sources_digest: str  # before the first run and after the last; both if they differ

    def method(self, name: str) -> Series:
        return next(s for s in self.series if s.method == name)

    def has(self, name: str) -> bool:
        return any(s.method == name for s in self.series)

    @property
    def ratios(self) -> tuple[Ratio, ...]:
        seed, sweeper = self.method("seed"), self.method("sweeper")
        floor, quarter = self.method("floor"), self.method("sweeper-quarter")
        many, floor_many = self.method("sweeper-many"), self.method("floor-many")
        ratios = [
            Ratio(
                "sweeper / seed wall",
                sweeper.median_wall_s / seed.median_wall_s,
                TARGET_SWEEPER_OVER_SEED,
            ),
            Ratio(
                "sweeper / floor wall",
                sweeper.median_wall_s / floor.median_wall_s,
                TARGET_LARGE_OVER_FLOOR,
            ),
            Ratio(
                "sweeper own time / floor wall",
                (sweeper.median_own_s or 0) / floor.median_wall_s,
                None,
            ),
            Ratio(
                "sweeper-many / floor-many wall",
                many.median_wall_s / floor_many.median_wall_s,
                TARGET_MANY_OVER_FLOOR,
            ),
            Ratio(
                "sweeper-many own time / floor-many wall",
                (many.median_own_s or 0) / floor_many.median_wall_s,
                None,
            ),
            Ratio("sweeper peak RSS MiB", sweeper.median_peak_mib, TARGET_SWEEPER_PEAK_MIB),
            Ratio("sweeper-many peak RSS MiB", many.median_peak_mib, TARGET_SWEEPER_PEAK_MIB),
            Ratio("sweeper peak RSS MiB, quarter size", quarter.median_peak_mib, None),
            Ratio("seed peak RSS MiB", seed.median_peak_mib, None),
        ]
        for name, base in (("", floor), ("-many", floor_many)):
            if self.has(f"baseline{name}"):
                old = self.method(f"baseline{name}")
                ratios += [
                    Ratio(
                        f"baseline{name} / floor{name} wall",
                        old.median_wall_s / base.median_wall_s,
                        None,
                    ),
                    Ratio(
                        f"baseline{name} own time / floor{name} wall",
                        (old.median_own_s or 0) / base.median_wall_s,
                        None,
                    ),
                ]
        return tuple(ratios)  # fmt: skip


def run_process(argv: Sequence[str], log_path: str, env: Mapping[str, str] = CHILD_ENV) -> Run:
    """One process; where it is a sweeper run with ``--json``, its own ``seconds`` too."""
    if "--json" not in argv:
        timed = timed_process(argv, log_path, env=env)
        return Run(timed.wall_s, timed.peak_rss_kib)
    with tempfile.TemporaryFile() as out:
        timed = timed_process(argv, log_path, stdout=out, env=env)
        out.seek(0)
        seconds = float(json.loads(out.read().splitlines()[0])["seconds"])
    return Run(timed.wall_s, timed.peak_rss_kib, seconds)


def run_sequence(
    commands: Sequence[Sequence[str]], log_path: str, env: Mapping[str, str] = CHILD_ENV
) -> Run:
    """Processes one after another, timed as one: wall times add up, peak RSS is the max."""
    runs = [run_process(argv, log_path, env) for argv in commands]
    own = [r.own_s for r in runs if r.own_s is not None]
    return Run(sum(r.wall_s for r in runs), max(r.peak_rss_kib for r in runs),
               sum(own) if own else None)  # fmt: skip


def read_through(path: str) -> None:
    """Pull a file into the page cache without holding it in this process."""
    buffer = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def remove(path: str) -> None:
    if os.path.lexists(path):
        os.unlink(path)


def build_checkpoint(path: str, shape: tuple[int, int], log_path: str, many: int = 0) -> None:
    if os.path.exists(path):  # make_checkpoint.py writes atomically: a file here is whole
        print(f"reusing {path}", file=sys.stderr)
        return
    width, layers = shape
    what = f"{many} tensors of 1-100 KB" if many else f"{layers} x Linear({width}, {width})"
    print(f"building {path} ({what} + AdamW) ...", file=sys.stderr)
    maker = os.path.join(BENCH_DIR, "make_checkpoint.py")
    argv = [sys.executable, maker, path, "--width", str(width), "--layers", str(layers)]
    argv += ["--many", str(many)] if many else []
    run = run_process(argv, log_path)
    print(f"  built in {run.wall_s:.1f} s, peak RSS {run.peak_rss_kib / 1024:.0f} MiB",
          file=sys.stderr)  # fmt: skip


def benchmark(rounds: int, workdir: str, keep: bool, baseline: str | None = None) -> Result:
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, "stderr.log")
    full = os.path.join(workdir, "full-{}x{}.pt".format(*FULL_SHAPE))
    quarter = os.path.join(workdir, "quarter-{}x{}.pt".format(*QUARTER_SHAPE))
    many = os.path.join(workdir, f"many-{MANY_TENSORS}.pt")
    floor_source = os.path.join(workdir, "floor-source.bin")
    floor_many_source = os.path.join(workdir, "floor-many-source.bin")
    methods = METHODS + (BASELINE_METHODS if baseline else ())
    outputs = {m: os.path.join(workdir, f"out-{m}.pt") for m in methods}
    # The tree beside this bench (the one its digest names), whatever is installed.
    sweeper, env = baseline_command(os.path.dirname(BENCH_DIR))
    envs = {m: env for m in methods}
    seed = [sys.executable, os.path.join(BENCH_DIR, "seed_method.py")]
    commands: dict[str, list[list[str]]] = {
        "seed": [[*seed, full, outputs["seed"]]],
        "sweeper": [[*sweeper, "extract", full, "-o", outputs["sweeper"], "--json"]],
        "floor": [["cp", floor_source, outputs["floor"]], ["sync", outputs["floor"]]],
        "sweeper-quarter": [[*sweeper, "extract", quarter, "-o", outputs["sweeper-quarter"]]],
        "sweeper-many": [[*sweeper, "extract", many, "-o", outputs["sweeper-many"], "--json"]],
        "floor-many": [
            ["cp", floor_many_source, outputs["floor-many"]],
            ["sync", outputs["floor-many"]],
        ],
    }
    if baseline:
        old, envs["baseline"] = baseline_command(baseline)
        envs["baseline-many"] = envs["baseline"]
        commands["baseline"] = [[*old, "extract", full, "-o", outputs["baseline"], "--json"]]
        commands["baseline-many"] = [
            [*old, "extract", many, "-o", outputs["baseline-many"], "--json"]
        ]
    digest_before = sweeper_sources_digest()
    created = [floor_source, floor_many_source, *outputs.values()]
    if not keep:
        created += [full, quarter, many]
    succeeded = False
    try:
        build_checkpoint(full, FULL_SHAPE, log)
        build_checkpoint(quarter, QUARTER_SHAPE, log)
        build_checkpoint(many, FULL_SHAPE, log, MANY_TENSORS)

        print("warming up (untimed) ...", file=sys.stderr)
        for path in (full, quarter, many):
            read_through(path)
        for method in methods:
            if not method.startswith("floor"):
                run_sequence(commands[method], log, envs[method])
        # The floors copy a file of exactly the size sweeper writes: sweeper's own output.
        os.replace(outputs["sweeper"], floor_source)
        os.replace(outputs["sweeper-many"], floor_many_source)
        for path in (floor_source, floor_many_source):
            read_through(path)
        sizes = {m: os.path.getsize(outputs[m]) for m in methods if os.path.exists(outputs[m])}
        sizes["sweeper"] = sizes["floor"] = os.path.getsize(floor_source)
        sizes["sweeper-many"] = sizes["floor-many"] = os.path.getsize(floor_many_source)
        for path in outputs.values():
            remove(path)
        os.sync()

        series = {
            m: Series(m, " && ".join(" ".join(argv) for argv in commands[m]), sizes[m])
            for m in methods
        }
        for number in range(1, rounds + 1):
            for method in methods:
                run = run_sequence(commands[method], log, envs[method])
                written = os.path.getsize(outputs[method])
                if written != sizes[method]:
                    raise CommandFailed(f"{method} wrote {written} bytes, not {sizes[method]}")
                series[method].runs.append(run)
                print(f"round {number}/{rounds}  {method:<16} {run.wall_s:7.3f} s  "
                      f"{run.peak_rss_kib / 1024:7.1f} MiB", file=sys.stderr)  # fmt: skip
                remove(outputs[method])
                os.sync()  # untimed: the next run starts with nothing dirty
        result = Result(
            rounds,
            os.path.getsize(full),
            os.path.getsize(quarter),
            os.path.getsize(many),
            tuple(series.values()),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            describe_digests(digest_before, sweeper_sources_digest()),
        )
        succeeded = True
        return result
    finally:
        if succeeded:
            created.append(log)  # kept on failure: it holds the failing command's stderr
        for path in created:
            remove(path)
        if not keep and not os.listdir(workdir):
            os.rmdir(workdir)


def describe_machine(workdir: str) -> dict[str, object]:
    cp = subprocess.run(["cp", "--version"], capture_output=True, text=True, check=False)
    return {**machine(workdir), "cp": cp.stdout.partition("\n")[0]}


def sweeper_sources_digest() -> str:
    """SHA-256 over the package's .py files beside this bench: which code was timed."""
    package = os.path.join(os.path.dirname(BENCH_DIR), "sweeper")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            digest.update(name.encode() + b"\0")
            with open(os.path.join(package, name), "rb") as source:
                digest.update(source.read())
    return digest.hexdigest()


def to_json(result: Result, workdir: str) -> dict[str, object]:
    return {
        "benchmark": "extract",
        "rounds": result.rounds,
        "sweeper_sources_sha256": result.sources_digest,
        "machine": describe_machine(workdir),
        "source_bytes": result.source_bytes,
        "quarter_source_bytes": result.quarter_source_bytes,
        "many_source_bytes": result.many_source_bytes,
        "peak_rss_from": "GNU time %M" if GNU_TIME else "os.wait4 (includes this process's RSS)",
        "bench_self_peak_rss_kib": result.bench_self_peak_rss_kib,
        "methods": {
            s.method: {
                "command": s.command,
                "output_bytes": s.output_bytes,
                "median_wall_s": round(s.median_wall_s, 4),
                "median_peak_rss_kib": round(s.median_peak_mib * 1024),
                "median_own_s": s.median_own_s,
                "wall_s": [round(r.wall_s, 4) for r in s.runs],
                "peak_rss_kib": [r.peak_rss_kib for r in s.runs],
            }
            for s in result.series
        },
        "ratios": [
            {"name": r.name, "value": round(r.value, 4), "target_max": r.target_max, "met": r.met}
            for r in result.ratios
        ],
    }


def render(result: Result) -> str:
    lines = [
        f"source {result.source_bytes / MIB:.1f} MiB "
        f"(quarter {result.quarter_source_bytes / MIB:.1f} MiB, "
        f"{MANY_TENSORS} tensors {result.many_source_bytes / MIB:.1f} MiB); "
        f"{result.rounds} interleaved rounds; medians, with min and max wall",
        f"sweeper sources sha256: {result.sources_digest}",
        "",
        f"{'method':<16} {'wall s':>8} {'min':>8} {'max':>8} {'own s':>8} {'peak RSS MiB':>13} "
        f"{'output MiB':>11}",
    ]
    for s in result.series:
        walls = [r.wall_s for r in s.runs]
        own = "" if s.median_own_s is None else f"{s.median_own_s:8.3f}"
        lines.append(
            f"{s.method:<16} {s.median_wall_s:8.3f} {min(walls):8.3f} {max(walls):8.3f} "
            f"{own:>8} {s.median_peak_mib:13.1f} {s.output_bytes / MIB:11.1f}"
        )
    lines.append("")
    for ratio in result.ratios:
        verdict = ""
        if ratio.target_max is not None:
            verdict = f"  target <= {ratio.target_max:g}: {'met' if ratio.met else 'MISSED'}"
        lines.append(f"{ratio.name:<36} {ratio.value:8.3f}{verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time sweeper extract against the seed method.")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR,
                        help="for checkpoints and outputs (bench/out/extract)")  # fmt: skip
    parser.add_argument("--keep", action="store_true",
                        help="keep the built checkpoints, and reuse them next time")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--baseline", metavar="TREE",
                        help="also time the sweeper source tree TREE, side by side")  # fmt: skip
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    workdir = os.path.abspath(args.workdir)
    try:
        result = benchmark(args.rounds, workdir, args.keep, args.baseline)
    except CommandFailed as error:
        print(f"bench_extract: {error}", file=sys.stderr)
        return 1
    print(json.dumps(to_json(result, workdir), indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
