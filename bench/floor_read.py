"""The floor under a cold dry run: find every checkpoint and read what classifying it must read.

    python bench/floor_read.py ROOT [ROOT ...] [--processes N]

Expands each ROOT with ``glob``, walks it with ``os.scandir`` in this process, and hands the
folders that hold ``*.pt`` / ``*.pth`` / ``*.ckpt`` files to N forked processes (default: the
CPUs this process may run on, as ``sweeper sweep`` does).  Each lists its folder and, for every
file, opens it and reads the zip's end records, its central directory and the ``data.pkl``
record's local header and bytes: four reads, no parsing beyond the offsets they need, nothing
unpickled.  Prints one JSON object: files read and data.pkl bytes.

What sweeper does on top of this (parse the directory, unpickle, classify, plan, print) is what
``bench_sweep.py`` reports as its ratio to this floor.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import multiprocessing
import os
import struct
import sys

PATTERNS = ("*.pt", "*.pth", "*.ckpt")
TAIL = 22 + 20 + 56  # end of central directory, zip64 locator, zip64 end record (torch writes all)
LOCAL_HEADER = 30
CENTRAL_HEADER = 46


def read_folder(folder: str) -> tuple[int, int]:
    """(files read, data.pkl bytes) for one folder's checkpoints."""
    files = pickled = 0
    with os.scandir(folder) as entries:
        names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
    for name in names:
        if not any(fnmatch.fnmatch(name, pattern) for pattern in PATTERNS):
            continue
        fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, min(TAIL, size), max(0, size - TAIL))
            directory_size, directory_offset = struct.unpack_from("<II", tail, len(tail) - 22 + 12)
            directory = os.pread(fd, directory_size, directory_offset)
            at = directory.find(b"/data.pkl") - CENTRAL_HEADER
            while directory[at : at + 4] != b"PK\x01\x02":  # the name has a prefix folder
                at -= 1
            (length,) = struct.unpack_from("<I", directory, at + 20)
            (header,) = struct.unpack_from("<I", directory, at + 42)
            local = os.pread(fd, LOCAL_HEADER, header)
            name_length, extra_length = struct.unpack_from("<HH", local, 26)
            data = os.pread(fd, length, header + LOCAL_HEADER + name_length + extra_length)
        finally:
            os.close(fd)
        files += 1
        pickled += len(data)
    return files, pickled


def folders(roots: list[str]) -> list[str]:
    """Every folder under the roots that holds a file, walked with scandir (no symlinks)."""
    found = []
    stack = [path for root in roots for path in sorted(glob.glob(root))]
    while stack:
        folder = stack.pop()
        holds_files = False
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    holds_files = True
        if holds_files:
            found.append(folder)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+")
    parser.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    found = folders(args.roots)
    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        results = pool.map(read_folder, found, chunksize=16)
    files = sum(f for f, _ in results)
    print(json.dumps({"files": files, "data_pkl_bytes": sum(b for _, b in results)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
