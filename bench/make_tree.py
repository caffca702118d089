"""Build a tree of run folders full of small training checkpoints, for the sweep benchmark.

    python bench/make_tree.py TOP --files N [--per-run 10]

Writes ``TOP/data/user{u}/proj{p}/results/checkpoints/run{r}/checkpoint_epoch_{e}.pt``: N / 10
run folders (ten runs to a project, ten projects to a user) of ``--per-run`` full checkpoints
each.  Every checkpoint is a real ``torch.save`` of what a training loop writes: ``epoch``, the
``model_state_dict`` of a ``Linear(16, 16)``, the ``optimizer_state_dict`` of AdamW after one
step, a scheduler's state, ``best_val_acc`` and an OmegaConf ``DictConfig`` as ``config``.

Only the epoch differs between the checkpoints of one run, so one file per epoch is serialised
in memory and its bytes are written to every run folder: generation costs file writes, not
10,000 ``torch.save`` calls.  Each copy is a separate file (one link), which is what sweeper
sees on a real server.  Modification times are backdated (epoch e of every run is e hours past
a point ten days ago), so ``min_age_seconds`` never protects a file and the epochs' mtimes agree
with their order.

A finished tree is marked by ``TOP/.complete`` (holding N and --per-run); a tree with a matching
marker is reused, and anything else under TOP/data is removed and rebuilt.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import struct
import sys
import time
import zlib

CHECKPOINT_NAME = "checkpoint_epoch_{}.pt"
RUNS_PER_PROJECT = 10
PROJECTS_PER_USER = 10
BACKDATE_S = 10 * 24 * 3600
MARKER = ".complete"
# With --distinct, each file's pickle carries its own run and epoch in the config's experiment
# name: this placeholder (fixed width) is overwritten in the serialised bytes, and the record's
# CRC in the local header and the central directory patched to match.
RUN_STAMP = "r000000000e0000"


def serialise_epochs(epochs: int) -> list[bytes]:
    """``torch.save`` bytes of one small full checkpoint per epoch 1..epochs."""
    import torch
    from omegaconf import OmegaConf
    from torch import nn

    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    model(torch.randn(4, 16)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    config = OmegaConf.create(
        {
            "experiment": "bench-sweep-" + RUN_STAMP,
            "model": {"name": "linear", "width": 16},
            "data": {"root": "${oc.env:HOME}/data", "batch_size": 4},
            "optim": {"name": "adamw", "lr": 3e-4, "weight_decay": 0.05},
            "trainer": {"epochs": epochs, "out": "results/checkpoints"},
        }
    )
    blobs = []
    for epoch in range(1, epochs + 1):
        buffer = io.BytesIO()
        torch.save(
            {
                "epoch": epoch,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": optimizer.state_dict(),
                "scheduler_state_dict": scheduler.state_dict(),
                "best_val_acc": 0.5 + epoch / 100,
                "config": config,
            },
            buffer,
        )
        blobs.append(buffer.getvalue())
    return blobs


def run_folder(top: str, index: int) -> str:
    user, rest = divmod(index, RUNS_PER_PROJECT * PROJECTS_PER_USER)
    project, run = divmod(rest, RUNS_PER_PROJECT)
    return os.path.join(
        top, "data", f"user{user}", f"proj{project}", "results", "checkpoints", f"run{run}"
    )


def glob_root(top: str) -> str:
    """The root that covers every run folder of the tree, as an admin would configure it."""
    return os.path.join(top, "data", "*", "*", "results", "checkpoints")


def _marker(files: int, per_run: int, distinct: bool) -> list[str]:
    return [str(files), str(per_run)] + (["distinct"] if distinct else [])


def is_built(top: str, files: int, per_run: int, distinct: bool = False) -> bool:
    try:
        with open(os.path.join(top, MARKER)) as marker:
            return marker.read().split() == _marker(files, per_run, distinct)
    except OSError:
        return False


def distinguish(blob: bytes, index: int, epoch: int) -> bytes:
    """``blob`` with its config naming run ``index``, epoch ``epoch``: a distinct pickle.  The
    data.pkl record is stored, so the bytes are overwritten in place and its CRC patched in the
    central directory and in the local header or the data descriptor after the data."""
    new = f"r{index:09d}e{epoch:04d}".encode()
    at = blob.index(RUN_STAMP.encode())
    data = bytearray(blob)
    data[at : at + len(new)] = new
    central = blob.index(b"PK\x01\x02")
    while True:
        (name_len,) = struct.unpack_from("<H", blob, central + 28)
        if blob[central + 46 : central + 46 + name_len].endswith(b"/data.pkl"):
            break
        central = blob.index(b"PK\x01\x02", central + 46)
    size, _ = struct.unpack_from("<II", blob, central + 20)
    (local,) = struct.unpack_from("<I", blob, central + 42)
    flags = struct.unpack_from("<H", blob, local + 6)[0]
    name_len, extra_len = struct.unpack_from("<HH", blob, local + 26)
    start = local + 30 + name_len + extra_len
    assert start <= at < start + size, "the stamp is not in data.pkl"
    crc = zlib.crc32(data[start : start + size])
    struct.pack_into("<I", data, central + 16, crc)
    if flags & 0x08:  # sizes and CRC in a descriptor after the data (torch's writer)
        assert blob[start + size : start + size + 4] == b"PK\x07\x08"
        struct.pack_into("<I", data, start + size + 4, crc)
    else:
        struct.pack_into("<I", data, local + 14, crc)
    return bytes(data)


def build_tree(top: str, files: int, per_run: int = 10, *, distinct: bool = False) -> bool:
    """Build the tree unless a finished one is there; True when it was built now.  With
    ``distinct``, no two files' pickles are the same (the run and epoch are in the config)."""
    if files % per_run:
        raise ValueError(f"--files {files} is not a multiple of --per-run {per_run}")
    if is_built(top, files, per_run, distinct):
        return False
    marker = os.path.join(top, MARKER)
    if os.path.lexists(marker):
        os.unlink(marker)
    shutil.rmtree(os.path.join(top, "data"), ignore_errors=True)
    blobs = serialise_epochs(per_run)
    base_s = time.time() - BACKDATE_S
    for index in range(files // per_run):
        folder = run_folder(top, index)
        os.makedirs(folder)
        for epoch, blob in enumerate(blobs, start=1):
            path = os.path.join(folder, CHECKPOINT_NAME.format(epoch))
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, distinguish(blob, index, epoch) if distinct else blob)
            finally:
                os.close(fd)
            stamp = base_s + epoch * 3600
            os.utime(path, (stamp, stamp))
    os.sync()  # the timed runs should not pay for this tree's writeback
    with open(marker, "w") as out:
        out.write(" ".join(_marker(files, per_run, distinct)) + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("top", help="folder to build the tree in")
    parser.add_argument("--files", type=int, default=10_000, help="checkpoints in all (10000)")
    parser.add_argument("--per-run", type=int, default=10, help="checkpoints per run (10)")
    parser.add_argument("--distinct", action="store_true", help="no two pickles the same")
    args = parser.parse_args(argv)
    if args.files < 1 or args.per_run < 1 or args.files % args.per_run:
        parser.error("--files must be a positive multiple of --per-run")
    started = time.perf_counter()
    built = build_tree(args.top, args.files, args.per_run, distinct=args.distinct)
    verb = "built" if built else "reused"
    print(f"{verb} {args.files} checkpoints under {glob_root(args.top)} "
          f"in {time.perf_counter() - started:.1f} s", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
