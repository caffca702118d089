"""Where a cold read of one small checkpoint goes, stage by stage, in one process (issue 11).

    python bench/cold_breakdown.py TREE [--files N] [--rounds R]

Takes the first N (2,000) checkpoints under TREE (e.g. a tree of ``bench/make_tree.py``) and
times, per file, each stage of what a classifier worker does with a full checkpoint: read the
zip directory, read ``data.pkl``, unpickle it inertly, classify it (the rest of
``open_checkpoint``: storage records checked, the family's description, metrics), and size its
inference copy (``output_size`` where the sweeper imported has it; ``plan_output``, the whole
plan with its pickle written, beside it).  As in a worker under its address-space limit, the
opcode walk is skipped for small pickles.  Each stage is timed over all files, R rounds; the
best round counts (the machine is shared).  Prints microseconds per file.

Runs against whichever ``sweeper`` is imported, so an older source tree can be measured the
same way: ``PYTHONPATH=SRC:SITE python -P -S bench/cold_breakdown.py TREE``.
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import sys
import time
from collections.abc import Callable


def best_us(files: int, rounds: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best / files * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import sweeper
    from sweeper import torchzip
    from sweeper.formats import output, records, unpickler
    from sweeper.formats.checkpoint import open_checkpoint

    torchzip.rely_on_address_space_limit()
    paths = sorted(glob.glob(os.path.join(args.tree, "**", "*.pt"), recursive=True))[: args.files]
    fds = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in paths]
    pairs = list(zip(fds, paths, strict=True))
    archives = [records.read_archive(fd, path) for fd, path in pairs]
    pickles = [
        records.read_record(fd, archive, "data.pkl", path, records._MAX_PICKLE_BYTES)
        for (fd, path), archive in zip(pairs, archives, strict=True)
    ]
    checkpoints = [open_checkpoint(fd, path) for fd, path in pairs]
    mode = torchzip.Mode.INFERENCE
    n, rounds = len(pairs), args.rounds
    # What the set-up keeps (every file's checkpoint) is not rescanned by each collection: a
    # worker holds one file's values at a time.
    gc.collect()
    gc.freeze()

    def each(step: Callable[[int], object]) -> Callable[[], None]:
        def run() -> None:
            for index in range(n):
                step(index)  # the result dropped at once, as a worker drops a file's values

        return run

    stages = {
        "zip directory (read_archive)": each(lambda i: records.read_archive(*pairs[i])),
        "data.pkl read": each(
            lambda i: records.read_record(
                fds[i], archives[i], "data.pkl", paths[i], records._MAX_PICKLE_BYTES
            )
        ),
        "inert unpickle": each(lambda i: unpickler._load_inert(pickles[i], paths[i])),
        "open_checkpoint (all of the above + classify)": each(lambda i: open_checkpoint(*pairs[i])),
        "plan_output (copy planned in full)": each(
            lambda i: output.plan_output(checkpoints[i], mode)
        ),
    }
    if hasattr(output, "output_size"):
        stages["output_size (copy sized only)"] = each(
            lambda i: output.output_size(checkpoints[i], mode)
        )
    print(f"sweeper from {os.path.dirname(sweeper.__file__)}; {n} files, best of {rounds}")
    for name, run in stages.items():
        print(f"{name:48} {best_us(n, rounds, run):8.1f} us/file")
    for fd in fds:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
