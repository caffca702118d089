"""Hostile checkpoints: real pickles whose loading would run code. sweeper must never run it.

Each payload creates a marker file when unpickled.  One test proves every payload is real
(``torch.load(weights_only=False)`` in a subprocess creates its marker); the others run
``sweeper extract`` and ``sweeper inspect`` on the same files and check the marker never
appears, the global is named, and the folder is exactly as it was.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.storage
from checkpoints import (
    assert_same_tensors,
    batched_list,
    folder_state,
    full_checkpoint,
    full_looking_pickle,
    load_without_allowlist,
    save_full_checkpoint,
    save_pickle_as_checkpoint,
    tiny_model,
)
from conftest import CliRun, peak_rss_kib
from trees import save_full, snapshot

from sweeper.torchzip import MEMORY_REFUSAL

RunSweeper = Callable[..., CliRun]


class Call:
    """Pickles as the call ``func(*args)``: what the author of a hostile checkpoint writes."""

    def __init__(self, func: Callable[..., Any], *args: object) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[object, ...]]:
        return self.func, self.args


def _touch(marker: Path) -> Call:
    return Call(os.system, f"touch '{marker}'")


def _top_level_os_system(path: Path, marker: Path) -> None:
    torch.save(_touch(marker), path)


def _builtins_exec_as_config(path: Path, marker: Path) -> None:
    code = f"open({str(marker)!r}, 'w').close()"
    torch.save(full_checkpoint(config=Call(exec, code)), path)


def _inside_model_state_dict(path: Path, marker: Path) -> None:
    weights = tiny_model().state_dict()
    weights["hidden.extra"] = _touch(marker)
    torch.save(full_checkpoint(model_state=weights), path)


def _nested_load_from_bytes(path: Path, marker: Path) -> None:
    inner = io.BytesIO()
    torch.save(_touch(marker), inner)
    payload = Call(torch.storage._load_from_bytes, inner.getvalue())
    torch.save(full_checkpoint(extra={"ema": payload}), path)


def _protocol_4_stack_global(path: Path, marker: Path) -> None:
    """A hand-made archive in torch's layout whose pickle names its global with STACK_GLOBAL."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_touch(marker), protocol=4))
        archive.writestr("archive/version", "3\n")


# name: (builder, a pattern for the global sweeper must name, how the sanity check loads it)
PAYLOADS: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    "os-system": (_top_level_os_system, r"(posix|os)\.system", "torch"),
    "builtins-exec": (_builtins_exec_as_config, r"builtins\.exec", "torch"),
    "in-model-state-dict": (_inside_model_state_dict, r"(posix|os)\.system", "torch"),
    "load-from-bytes": (_nested_load_from_bytes, r"torch\.storage\._load_from_bytes", "torch"),
    "stack-global": (_protocol_4_stack_global, r"(posix|os)\.system", "pickle"),
}


def test_every_payload_really_runs_when_loaded_unsafely(tmp_path: Path) -> None:
    """Without this, the tests below could pass on payloads that do nothing."""
    loads = []
    for name, (build, _, loader) in PAYLOADS.items():
        path, marker = tmp_path / f"{name}.pt", tmp_path / f"{name}.marker"
        build(path, marker)
        loads.append((str(path), str(marker), loader))
    script = textwrap.dedent(
        """
        import json, os, pickle, sys, zipfile
        import torch
        for path, marker, loader in json.loads(sys.argv[1]):
            try:
                if loader == "torch":
                    torch.load(path, weights_only=False)
                else:
                    pickle.loads(zipfile.ZipFile(path).read("archive/data.pkl"))
            except Exception as error:  # the payload has run (or not) by the time this raises
                print(path, repr(error), file=sys.stderr)
            print(path, os.path.exists(marker))
        """
    )

    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(loads)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [word for path, _, _ in loads for word in (path, "True")]


@pytest.fixture(params=list(PAYLOADS))
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path, str]:
    """(hostile checkpoint alone in its folder, the marker its payload would create, global)."""
    build, global_name, _ = PAYLOADS[request.param]
    folder = tmp_path / "run"
    folder.mkdir()
    path, marker = folder / "best_model.pt", tmp_path / "MARKER"
    build(path, marker)
    return path, marker, global_name


@pytest.mark.parametrize(
    "command",
    [
        ["extract", "--delete-original", "--json"],
        ["extract", "--weights-only", "--delete-original"],
        ["inspect"],
    ],
    ids=["extract-delete-json", "weights-delete", "inspect"],
)
def test_hostile_pickle_is_refused_naming_its_global(
    hostile: tuple[Path, Path, str], run_sweeper: RunSweeper, command: list[str]
) -> None:
    path, marker, global_name = hostile
    before = folder_state(path.parent)

    run = run_sweeper(*command, path)

    assert not marker.exists()
    assert run.returncode == 1
    assert len(run.stderr_lines) == 1, run.stderr
    assert re.fullmatch(
        rf"ERROR sweeper: {re.escape(str(path))}: .*disallowed global '{global_name}'",
        run.stderr_lines[0],
    ), run.stderr_lines[0]
    assert folder_state(path.parent) == before
    if command == ["extract", "--delete-original", "--json"]:
        assert run.stdout == ""


def test_allowlisted_class_cannot_be_called(tmp_path: Path, run_sweeper: RunSweeper) -> None:
    """An allowed name is data, not a function: a pickle that calls OmegaConf's DictConfig with
    arguments (as a payload would to reach its constructor's code) is refused."""
    from omegaconf import DictConfig

    path = tmp_path / "best_model.pt"
    torch.save(full_checkpoint(config=Call(DictConfig, {"a": 1})), path)
    assert isinstance(torch.load(path, weights_only=False)["config"], DictConfig)  # it is real
    before = folder_state(tmp_path)

    run = run_sweeper("extract", path)

    assert run.returncode == 1
    assert len(run.stderr_lines) == 1
    assert run.stderr_lines[0].startswith(f"ERROR sweeper: {path}: malformed pickle")
    assert "DictConfig() takes no arguments" in run.stderr_lines[0]
    assert folder_state(tmp_path) == before


POISONS = {
    # BUILD on the storage type every file shares: would rename FloatStorage process-wide.
    "storage type": b"ctorch\nFloatStorage\n}(X\x04\x00\x00\x00nameX\x0b\x00\x00\x00HalfStorageub0",
    # BUILD with slot state on an allowlisted class: would replace how every config is read.
    "config class": b"comegaconf.dictconfig\nDictConfig\nN}(X\x05\x00\x00\x00stateK\x01u\x86b0",
}


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
def test_one_file_cannot_change_how_the_next_is_read(tmp_path: Path, poison: bytes) -> None:
    """A pickle that BUILDs onto an allowlisted global it names must not alter that global for
    the other files of the same sweep (the victim's copy must still load and match)."""
    mallory, victim = tmp_path / "a_mallory", tmp_path / "b_victim"
    mallory.mkdir()
    victim.mkdir()
    clean = tmp_path / "clean.pt"
    save_full_checkpoint(clean)
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(mallory / "m.pt", "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                data = data[:2] + poison + data[2:]
            target.writestr(info.filename, data)
    clean.unlink()
    save_full_checkpoint(victim / "v.pt")
    ledger = tmp_path / "ledger.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "sweeper", "sweep", str(tmp_path), f"--ledger={ledger}"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert not (mallory / "m_inference.pt").exists()
    copy = victim / "v_inference.pt"
    assert copy.exists(), run.stderr
    assert_same_tensors(
        torch.load(victim / "v.pt", weights_only=False)["model_state_dict"],
        load_without_allowlist(copy)["model_state_dict"],
    )


def test_a_huge_memo_index_is_refused_before_unpickling(tmp_path: Path) -> None:
    """``LONG_BINPUT 0x1fffffff`` would make the C unpickler allocate gigabytes for its memo."""
    import resource
    import struct

    path = tmp_path / "memo.pt"
    pickled = (
        b"\x80\x02}q\x00(X\x05\x00\x00\x00epochK\x01X\x10\x00\x00\x00model_state_dict}r"
        + struct.pack("<I", 0x1FFFFFFF)
        + b"u."
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", b"3\n")
    run = subprocess.run(
        [sys.executable, "-m", "sweeper", "inspect", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 1
    assert "memo index out of sequence" in run.stderr
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 1024 * 1024  # KiB: < 1 GiB


def test_a_huge_memo_index_is_refused_in_a_parallel_sweep(tmp_path: Path) -> None:
    """Sweeps of many folders classify in forked workers that skip the opcode walk and rely on
    an address-space ceiling instead: the file is still refused, and memory stays small."""
    import resource
    import struct

    for index in range(70):  # enough folders for the worker pool
        (tmp_path / f"run{index}").mkdir()
    pickled = (
        b"\x80\x02}q\x00(X\x05\x00\x00\x00epochK\x01X\x10\x00\x00\x00model_state_dict}r"
        + struct.pack("<I", 0x1FFFFFFF)
        + b"u."
    )
    with zipfile.ZipFile(tmp_path / "run0" / "memo.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", b"3\n")
    save_full_checkpoint(tmp_path / "run1" / "good.pt")
    for index in range(2, 70):
        (tmp_path / f"run{index}" / "good.pt").write_bytes(
            (tmp_path / "run1" / "good.pt").read_bytes()
        )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sweeper",
            "sweep",
            str(tmp_path),
            "--dry-run",
            "--json",
            f"--ledger={tmp_path / 'ledger.jsonl'}",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr  # a refused file: the rest is planned, then exit 1
    entries = {e["path"]: e for e in json.loads(run.stdout)["entries"]}
    memo = entries[str(tmp_path / "run0" / "memo.pt")]
    assert memo["action"] == "skip"
    assert memo["reason"] == f"skipped: {MEMORY_REFUSAL}"
    assert entries[str(tmp_path / "run1" / "good.pt")]["action"] == "extract"
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 1024 * 1024  # KiB


def test_a_sparse_checkpoint_cannot_make_root_fill_the_disk(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """A 64 MB checkpoint whose tensor is zeros, copied with its zeros turned into holes: valid
    CRCs, a few KB allocated.  Extracting it would write 32 MB of zeros as root: the sweep plans
    it as skipped, naming why, ``extract`` refuses it in one line, and nothing is written."""
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    dense = tmp_path / "dense.pt"
    checkpoint = {
        "model_state_dict": {"w": torch.zeros(8 * 1024 * 1024)},
        "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(8 * 1024 * 1024)}}},
        "epoch": 1,
    }
    torch.save(checkpoint, dense)
    sparse = run / "e1.pt"
    subprocess.run(["cp", "--sparse=always", dense, sparse], check=True)
    info = sparse.stat()
    if info.st_blocks * 512 * 4 >= info.st_size:
        pytest.skip("this filesystem does not keep holes")
    os.utime(sparse, ns=(info.st_atime_ns, info.st_mtime_ns - 10**12))
    before = snapshot(tmp_path / "root")

    plan = run_sweeper(
        "sweep", tmp_path / "root", "--dry-run", "--json", "--ledger", tmp_path / "l"
    )
    done = run_sweeper("sweep", tmp_path / "root", "--ledger", tmp_path / "l", "min_age_seconds=0")
    extracted = run_sweeper("extract", sparse)

    (entry,) = plan.json()["entries"]
    assert entry["action"] == "skip" and "a sparse file" in entry["reason"]
    assert done.returncode == 1, done.stderr  # refused: nothing else to do, then exit 1
    assert extracted.returncode == 1 and len(extracted.stderr_lines) == 1
    assert "a sparse file" in extracted.stderr and str(sparse) in extracted.stderr
    assert snapshot(tmp_path / "root") == before


def test_a_partly_sparse_checkpoint_never_makes_root_write_more_than_it_occupies(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """Weights of zeros turned into holes, beside dense optimizer state: a quarter of the file
    allocated, so it passes the scan's sparse check, yet its copy (the zeros, written out)
    would take ~3x what the user's file occupies.  Refused, named, nothing written."""
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    dense = tmp_path / "dense.pt"
    torch.manual_seed(0)
    checkpoint = {
        "model_state_dict": {"w": torch.zeros(8 * 1024 * 1024)},
        "optimizer_state_dict": {"state": {0: {"exp_avg": torch.randn(3 * 1024 * 1024)}}},
        "epoch": 1,
    }
    torch.save(checkpoint, dense)
    partly = run / "e1.pt"
    subprocess.run(["cp", "--sparse=always", dense, partly], check=True)
    info = partly.stat()
    if info.st_blocks * 512 * 2 >= info.st_size:
        pytest.skip("this filesystem does not keep holes")
    assert info.st_blocks * 512 * 4 >= info.st_size  # not sparse enough for the scan's check
    os.utime(partly, ns=(info.st_atime_ns, info.st_mtime_ns - 10**12))
    before = snapshot(tmp_path / "root")

    plan = run_sweeper(
        "sweep", tmp_path / "root", "--dry-run", "--json", "--ledger", tmp_path / "l"
    )
    extracted = run_sweeper("extract", partly)

    (entry,) = plan.json()["entries"]
    assert (
        entry["action"] == "skip" and "more space than the file itself occupies" in entry["reason"]
    )
    assert extracted.returncode == 1 and len(extracted.stderr_lines) == 1
    assert "a sparse file" in extracted.stderr and str(partly) in extracted.stderr
    assert snapshot(tmp_path / "root") == before


@pytest.fixture
def ext4_with_reserve(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 filesystem with half its blocks reserved for root, loop-mounted."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    image = tmp_path / "ext4.img"
    mount_point = tmp_path / "ext4"
    mount_point.mkdir()
    with open(image, "wb") as file:
        file.truncate(64 * 2**20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "50", image], capture_output=True)
    mounted = made.returncode == 0 and (
        subprocess.run(["mount", "-o", "loop", image, mount_point], capture_output=True).returncode
        == 0
    )
    if not mounted:
        pytest.skip("cannot make and loop-mount an ext4 image here")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", mount_point], check=True)


def test_root_never_fills_the_reserve_kept_for_the_system(
    ext4_with_reserve: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """Half the filesystem is root's reserve.  A copy that fits only by eating into it (root
    could write it; the user could not) is refused as disk full, and nothing is written."""
    run = ext4_with_reserve / "run"
    run.mkdir()
    torch.manual_seed(0)
    checkpoint = {
        "model_state_dict": {"w": torch.randn(4 * 1024 * 1024)},  # 16 MiB of weights
        "optimizer_state_dict": {"state": {0: {"exp_avg": torch.randn(1024 * 1024)}}},
        "epoch": 1,
    }
    torch.save(checkpoint, run / "e1.pt")
    vfs = os.statvfs(run)
    users, everyone = vfs.f_bavail * vfs.f_frsize, vfs.f_bfree * vfs.f_frsize
    assert users < 16 * 2**20 < everyone - 2**20  # fits only in root's reserve
    before = snapshot(run)

    extracted = run_sweeper("extract", run / "e1.pt")

    assert extracted.returncode == 1 and len(extracted.stderr_lines) == 1, extracted.stderr
    assert "disk full" in extracted.stderr and "root's reserve is not used" in extracted.stderr
    assert snapshot(run) == before


def test_a_bind_mount_inside_a_root_is_never_crossed(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """A folder outside the roots, bind-mounted inside one (same filesystem, same ``st_dev``):
    its checkpoints are neither planned nor touched, while the root's own run is swept."""
    if os.geteuid() != 0:
        pytest.skip("needs root to bind-mount")
    outside = tmp_path / "outside" / "run"
    inside = tmp_path / "root" / "mounted"
    own = tmp_path / "root" / "own"
    for folder in (outside, inside, own):
        folder.mkdir(parents=True)
    for epoch in (1, 2, 3):
        save_full_checkpoint(outside / f"e{epoch}.pt", epoch=epoch)
        save_full_checkpoint(own / f"e{epoch}.pt", epoch=epoch)
        for folder in (outside, own):
            os.utime(folder / f"e{epoch}.pt", ns=(10**18 + epoch, 10**18 + epoch))
    mounted = subprocess.run(["mount", "--bind", outside.parent, inside], check=False)
    if mounted.returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        before = snapshot(outside.parent)
        done = run_sweeper(
            "sweep",
            tmp_path / "root",
            "--json",
            "--ledger",
            tmp_path / "l",
            "keep_full=1",
            "min_age_seconds=0",
        )
        after = snapshot(outside.parent)
    finally:
        subprocess.run(["umount", inside], check=True)

    assert done.returncode == 0, done.stderr
    paths = [outcome["path"] for outcome in done.json()["outcomes"]]
    assert paths and all("/own/" in path for path in paths)
    assert after == before


def test_a_pickle_of_millions_of_objects_is_refused_before_it_is_read(
    tmp_path: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """A checkpoint whose data.pkl is a list of 17M small ints (34 MB, a few GB once unpickled,
    fingerprinted and compared): refused by counting its opcodes, named in one line, while a
    normal checkpoint beside it is swept."""
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    bomb = run / "bomb.pt"
    torch.save(
        {"model_state_dict": {}, "optimizer_state_dict": {}, "history": [0] * 17_000_000}, bomb
    )
    save_full_checkpoint(run / "fine.pt", epoch=1)

    inspected = run_sweeper("inspect", bomb)
    plan = run_sweeper(
        "sweep", tmp_path / "root", "--dry-run", "--json", "--ledger", tmp_path / "l"
    )

    assert inspected.returncode == 1 and len(inspected.stderr_lines) == 1
    assert "data.pkl has more than 8,000,000 objects" in inspected.stderr
    entries = {os.path.basename(e["path"]): e for e in plan.json()["entries"]}
    assert entries["bomb.pt"]["action"] == "skip"
    assert "data.pkl has more than 8,000,000 objects" in entries["bomb.pt"]["reason"]
    assert entries["fine.pt"]["action"] == "extract"


# Pickles each just past one bound of the opcode walk and under the others (and under the 16M
# opcodes refused before): what unpickling would allocate (a list of 8M ints; 8M references
# to one list; a memo of 4M entries; a million lists, one inside the next), had it been let run.
BOUND_BOMBS = {
    "objects": (batched_list(b"K\x00", 8_001_000), "more than 8,000,000 objects"),
    "container items": (
        b"]q\x04" + batched_list(b"h\x04", 8_001_000)[1:],
        "more than 8,000,000 container items",
    ),
    "memo entries": (batched_list(b"N\x94", 4_001_000), "more than 4,000,000 memo entries"),
    "nesting": (
        b"]" * 1_100_000 + b"a" * 1_099_999,
        "more than 1,000,000 values on the stack at once (nesting)",
    ),
}


@pytest.mark.parametrize("bomb", BOUND_BOMBS.values(), ids=BOUND_BOMBS.keys())
def test_a_pickle_past_a_bound_is_refused_naming_it(
    tmp_path: Path, run_sweeper: RunSweeper, bomb: tuple[bytes, str]
) -> None:
    """``inspect`` refuses it in one line naming the file and the bound; the sweep plans it as
    skipped with the same reason and extracts the ordinary checkpoint beside it."""
    history, bound = bomb
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    save_pickle_as_checkpoint(run / "bomb.pt", full_looking_pickle(history))
    save_full_checkpoint(run / "fine.pt", epoch=1)

    inspected = run_sweeper("inspect", run / "bomb.pt")
    plan = run_sweeper(
        "sweep", tmp_path / "root", "--dry-run", "--json", "--ledger", tmp_path / "l"
    )

    assert inspected.returncode == 1
    assert inspected.stderr_lines == [
        f"ERROR sweeper: {run / 'bomb.pt'}: refused: data.pkl has {bound}, more than any real "
        "checkpoint"
    ]
    entries = {os.path.basename(e["path"]): e for e in plan.json()["entries"]}
    assert entries["bomb.pt"]["action"] == "skip"
    assert f"refused: data.pkl has {bound}" in entries["bomb.pt"]["reason"]
    assert entries["fine.pt"]["action"] == "extract"


def test_a_big_real_checkpoint_passes_every_bound(tmp_path: Path, run_sweeper: RunSweeper) -> None:
    """No bound refuses what torch.save writes: a Llama-2-7B-shaped state dict (291 tensors,
    real names and shapes' ranks) with a real AdamW state after one step, inspected whole."""
    layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{part}"
        for i in range(32)
        for part in [*(f"{p}.weight" for p in layer), "input_layernorm.weight",
                     "post_attention_layernorm.weight"]
    ]  # fmt: skip
    weights = {name: torch.zeros(2, 2, requires_grad=True) for name in names}
    optimizer = torch.optim.AdamW(weights.values(), lr=1e-4)
    torch.autograd.backward(sum(w.sum() for w in weights.values()))
    optimizer.step()
    path = tmp_path / "llama.pt"
    torch.save(
        {"model_state_dict": weights, "optimizer_state_dict": optimizer.state_dict(), "epoch": 3},
        path,
    )

    inspected = run_sweeper("inspect", "--json", path)

    assert inspected.returncode == 0, inspected.stderr
    assert len(names) == 291
    assert inspected.json()["kind"] == "full"


def test_verifying_a_copy_of_millions_of_values_takes_flat_memory(tmp_path: Path) -> None:
    """An 8 MB full-looking checkpoint whose kept ``history`` is a list of 4M small ints, inside
    every bound: its copy is written, read back and compared with the source one value at a
    time, in well under 512 MiB (two lists of fingerprints took ~1.2 GB)."""
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    save_pickle_as_checkpoint(run / "e1.pt", full_looking_pickle(batched_list(b"K\x07", 4_000_000)))
    ledger = tmp_path / "ledger.jsonl"

    status, peak_kib, stderr = peak_rss_kib(
        "sweep", tmp_path / "root", "--ledger", ledger, "min_age_seconds=0"
    )

    assert status == 0, stderr
    assert (run / "e1_inference.pt").exists()
    assert peak_kib < 512 * 1024, f"peak RSS {peak_kib // 1024} MiB"


def test_a_file_past_the_memory_limit_is_refused_and_the_tree_beside_it_swept(
    tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    """What the pickle bounds cannot see, the readers' address-space limit catches: a real
    checkpoint whose notes are one 48 MB string (a handful of objects) needs more than
    ``classify_memory_limit=32 MiB`` to read.  Run folders are read in worker processes even
    for a tree this small: it is refused there and named, and the folder beside it is swept.
    Under the default limit the same file is copied: the limit, not the file, refused it."""
    root = tmp_path / "root"
    (root / "big").mkdir(parents=True)
    (root / "ordinary").mkdir()
    save_full_checkpoint(root / "big" / "e1.pt", extra={"notes": "x" * 48_000_000})
    for epoch in (1, 2):
        save_full_checkpoint(root / "ordinary" / f"e{epoch}.pt", epoch=epoch)
    ledger = tmp_path / "ledger.jsonl"
    limited = f"classify_memory_limit={32 * 1024 * 1024}"

    options = ["--ledger", ledger, "min_age_seconds=0"]

    plan = run_sweeper("sweep", root, "--dry-run", "--json", *options, limited)
    swept = run_sweeper("sweep", root, "--json", *options, limited)

    entries = {e["path"]: e for e in plan.json()["entries"]}
    big = entries[str(root / "big" / "e1.pt")]
    assert (big["action"], big["reason"]) == ("skip", f"skipped: {MEMORY_REFUSAL}")
    assert plan.returncode == 1 and swept.returncode == 1, swept.stderr  # a refused file
    assert f"{root / 'big' / 'e1.pt'}: {MEMORY_REFUSAL}" in swept.stderr
    assert sorted(os.listdir(root / "big")) == ["e1.pt"]
    assert sorted(os.listdir(root / "ordinary")) == [
        "e1.pt", "e1_inference.pt", "e2.pt", "e2_inference.pt"
    ]  # fmt: skip

    unlimited = run_sweeper("sweep", root, "--json", *options)

    assert unlimited.returncode == 0, unlimited.stderr
    assert (root / "big" / "e1_inference.pt").exists()


def test_a_file_inside_every_bound_that_needs_too_much_memory_is_refused_by_default(
    tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    """A 3 MB data.pkl of 3M empty dicts passes every pickle bound but takes more than the
    default 512 MiB to read (and would take more again to copy and compare): ``inspect`` and
    the sweep read it in a worker under that limit, refuse it in one line and one plan entry,
    and plan the ordinary checkpoint beside it as usual."""
    run = tmp_path / "root" / "run"
    run.mkdir(parents=True)
    bomb = run / "dicts.pt"
    save_pickle_as_checkpoint(bomb, full_looking_pickle(batched_list(b"}", 3_000_000)))
    save_full_checkpoint(run / "fine.pt", epoch=1)

    inspected = run_sweeper("inspect", bomb)
    plan = run_sweeper(
        "sweep", tmp_path / "root", "--dry-run", "--json", "--ledger", tmp_path / "l"
    )

    assert inspected.returncode == 1
    assert inspected.stderr_lines == [f"ERROR sweeper: {bomb}: {MEMORY_REFUSAL}"]
    entries = {os.path.basename(e["path"]): e for e in plan.json()["entries"]}
    assert (entries["dicts.pt"]["action"], entries["dicts.pt"]["reason"]) == (
        "skip", f"skipped: {MEMORY_REFUSAL}"
    )  # fmt: skip
    assert entries["fine.pt"]["action"] == "extract"
    assert f"{bomb}: {MEMORY_REFUSAL}" in plan.stderr  # the log names it too


def test_a_copys_source_record_nested_past_the_recursion_limit_is_not_a_crash() -> None:
    """A user's file at a copy's name whose ``.data/sweeper_source.json`` nests 5,000 lists: read
    as no source record (start-up reconciliation reads it in the main process)."""
    from sweeper.torchzip import Provenance

    assert Provenance.decode(b"[" * 5000 + b"]" * 5000) is None


def test_a_disk_users_filled_still_gets_space_back(
    ext4_with_reserve: Path, run_sweeper: Callable[..., CliRun]
) -> None:
    """A user filled the filesystem to the last block users may take: the copies that let old
    checkpoints go are written from root's reserve (each deletion frees more than its copy
    took), and the sweep reclaims space, where refusing every copy would reclaim none; the
    newest checkpoint's copy, which frees nothing, is still refused."""
    run = ext4_with_reserve / "alice" / "run"
    run.mkdir(parents=True)
    for epoch in (1, 2, 3):
        save_full(run / f"epoch{epoch}.pt", epoch=epoch, mtime_ns=(1_700_000_000 + epoch) * 10**9)
    subprocess.run(["chown", "-R", "65534:65534", ext4_with_reserve / "alice"], check=True)
    # The user writes (so the kernel keeps them out of root's reserve) through a descriptor
    # opened here: the test's folders above the mount are closed to them.
    with open(ext4_with_reserve / "alice" / "fill", "wb") as filler:
        fill = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "dd", "if=/dev/zero",
             "bs=64k"],
            stdout=filler, stderr=subprocess.PIPE, check=False,
        )  # fmt: skip
    assert b"No space left" in fill.stderr
    vfs = os.statvfs(run)
    assert vfs.f_bavail * vfs.f_frsize < 2**20 < vfs.f_bfree * vfs.f_frsize
    ledger = ext4_with_reserve.parent / "state" / "ledger.jsonl"

    done = run_sweeper(
        "sweep", ext4_with_reserve, "--ledger", ledger, "--json", "min_age_seconds=0", "keep_full=1"
    )

    report = done.json()
    deleted = [o for o in report["outcomes"] if o["ok"] and o["detail"] == "deleted"]
    assert len(deleted) == 2 and report["reclaimed_bytes"] > 0, done.stderr
    # The newest stays full; its copy frees nothing, so it may not touch the reserve: refused.
    assert done.returncode == 1
    assert "epoch3.pt: disk full" in done.stderr and "root's reserve is not used" in done.stderr
    assert sorted(os.listdir(run)) == ["epoch1_inference.pt", "epoch2_inference.pt", "epoch3.pt"]
