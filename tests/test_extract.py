"""``sweeper extract`` end to end: real checkpoints from torch.save, the real CLI as a process."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path, PosixPath
from typing import Any

import pytest
import torch
from checkpoints import (
    TEMP_MARK,
    TRAINING_STATE_KEYS,
    assert_same_tensors,
    awkward_tensors,
    central_directory_offset,
    dict_config,
    flip_byte,
    folder_state,
    full_checkpoint,
    load_without_allowlist,
    overwrite,
    plain_config,
    record_span,
    save_as_if_on_gpu,
    save_bare_weights,
    save_full_checkpoint,
    save_inference_checkpoint,
    save_legacy,
    temp_files,
    tiny_model,
)
from conftest import REPO_ROOT, CliRun, run_cli
from omegaconf import DictConfig, OmegaConf

from sweeper import torchzip
from sweeper.extract import Located, extract, is_sweeper_output, output_name
from sweeper.torchzip import Interrupted, Mode

RunSweeper = Callable[..., CliRun]

NESTED_METADATA: dict[str, Any] = {
    "history": {
        "val_acc": [0.5, 0.75, 0.875],
        "splits": ("train", "val"),
        "nested": {"a": [1, {"b": (2, 3.5)}], "empty": {}, "none": None},
    },
    "global_step": 120,
    "note": "fine-tuned on café data",
    "finished": True,
    "parent": None,
    "torch_values": {"shape": torch.Size([2, 3]), "device": torch.device("cuda", 1)},
    "python_values": [{"cat", "dog"}, 2**70, -7, 1.5 + 2j, b"\x00\xff", torch.bfloat16],
}


def expected_metadata(saved: dict[str, Any]) -> dict[str, Any]:
    """What an inference copy keeps besides the weights, configs as plain containers."""
    kept = {k: v for k, v in saved.items() if k not in TRAINING_STATE_KEYS}
    del kept["model_state_dict"]
    if isinstance(kept.get("config"), DictConfig):
        kept["config"] = OmegaConf.to_container(kept["config"], resolve=False)
    return kept


def assert_success(run: CliRun) -> None:
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""


def assert_refused(run: CliRun, path: Path, reason: str) -> None:
    """Non-zero exit and exactly one stderr line naming ``path`` and matching ``reason``."""
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert len(run.stderr_lines) == 1, run.stderr
    line = run.stderr_lines[0]
    assert line.startswith(f"ERROR sweeper: {path}: "), line
    assert re.search(reason, line[len(f"ERROR sweeper: {path}: ") :]), line


@contextlib.contextmanager
def located(path: Path) -> Iterator[Located]:
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield Located(dir_fd, path.name, str(path))
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("config", [dict_config(), plain_config()], ids=["dictconfig", "dict"])
def test_inference_copy_is_exact_and_loads_without_allowlist(
    checkpoint_dir: Path, run_sweeper: RunSweeper, config: object
) -> None:
    model_state = tiny_model().state_dict()
    model_state.update(awkward_tensors())
    source = checkpoint_dir / "best_model.pt"
    saved = save_full_checkpoint(
        source, config=config, model_state=model_state, extra=NESTED_METADATA, epoch=4
    )

    assert_success(run_sweeper("extract", source))

    output = checkpoint_dir / "best_model_inference.pt"
    loaded = load_without_allowlist(output)
    assert list(loaded) == ["model_state_dict", "config", "epoch", "best_val_acc", *NESTED_METADATA]
    assert_same_tensors(saved["model_state_dict"], loaded["model_state_dict"])
    weights = loaded["model_state_dict"]
    assert isinstance(weights, OrderedDict)
    assert weights._metadata == model_state._metadata  # type: ignore[attr-defined]
    tied = weights["embed.weight"].untyped_storage(), weights["head.weight"].untyped_storage()
    assert tied[0].data_ptr() == tied[1].data_ptr()
    views = [weights[name] for name in ("transposed", "row_slice", "column_stride")]
    assert len({view.untyped_storage().data_ptr() for view in views}) == 1
    assert views[0].stride() == (1, 6) and views[1].storage_offset() == 6

    metadata = {k: v for k, v in loaded.items() if k != "model_state_dict"}
    assert metadata == expected_metadata(saved)
    assert type(metadata["config"]) is dict
    assert metadata["history"]["splits"] == ("train", "val")  # a tuple stays a tuple
    assert not set(TRAINING_STATE_KEYS) & set(loaded)


def test_parameters_and_requires_grad_survive(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    weights = tiny_model().state_dict(keep_vars=True)  # nn.Parameter objects, one tied twice
    weights["trainable_buffer"] = torch.randn(3, requires_grad=True)
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source, model_state=weights, config=plain_config())

    assert_success(run_sweeper("extract", source))

    loaded = load_without_allowlist(checkpoint_dir / "best_model_inference.pt")
    assert_same_tensors(weights, loaded["model_state_dict"])
    assert loaded["model_state_dict"]["embed.weight"] is loaded["model_state_dict"]["head.weight"]


@pytest.mark.parametrize("protocol", [4, 5])
def test_newer_pickle_protocols_extract_too(
    checkpoint_dir: Path, run_sweeper: RunSweeper, protocol: int
) -> None:
    """torch.save(pickle_protocol=N) changes data.pkl's opcodes (frames, STACK_GLOBAL, memo)."""
    weights = tiny_model().state_dict()
    weights.update(awkward_tensors())
    saved = full_checkpoint(model_state=weights)
    source = checkpoint_dir / "best_model.pt"
    torch.save(saved, source, pickle_protocol=protocol)

    assert_success(run_sweeper("extract", source))

    loaded = load_without_allowlist(checkpoint_dir / "best_model_inference.pt")
    assert_same_tensors(weights, loaded["model_state_dict"])
    assert loaded["config"] == expected_metadata(saved)["config"]


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (frozenset({1}), "frozenset"),
        (defaultdict(list, {"a": [1]}), "defaultdict"),
        (PosixPath("/data/run1"), "PathValue"),
        (dict, "TypeRef"),
    ],
    ids=["frozenset", "defaultdict", "path", "class"],
)
def test_metadata_torch_cannot_load_safely_is_refused(
    checkpoint_dir: Path, run_sweeper: RunSweeper, value: object, what: str
) -> None:
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source, extra={"meta": [value]})
    before = folder_state(checkpoint_dir)

    run = run_sweeper("extract", source, "--delete-original")

    assert_refused(run, source, f"metadata key 'meta' holds a {what}, not loadable safely")
    assert folder_state(checkpoint_dir) == before


def test_weights_only_writes_the_bare_state_dict(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    model = tiny_model(seed=3)
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source, model=model)

    assert_success(run_sweeper("extract", "--weights-only", source))

    loaded = load_without_allowlist(checkpoint_dir / "best_model_weights.pt")
    assert type(loaded) is OrderedDict
    assert_same_tensors(model.state_dict(), loaded)
    fresh = tiny_model(seed=99)
    fresh.load_state_dict(loaded)
    assert_same_tensors(model.state_dict(), fresh.state_dict())
    assert sorted(os.listdir(checkpoint_dir)) == ["best_model.pt", "best_model_weights.pt"]


def test_output_option_names_a_file_or_a_folder(
    checkpoint_dir: Path, tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    source = checkpoint_dir / "epoch_3.pt"
    saved = save_full_checkpoint(source)
    elsewhere = tmp_path / "exports"
    elsewhere.mkdir()

    assert_success(run_sweeper("extract", source, "-o", elsewhere / "served.pt"))
    assert_success(run_sweeper("extract", "--weights-only", source, "-o", elsewhere))

    assert sorted(os.listdir(elsewhere)) == ["epoch_3_weights.pt", "served.pt"]
    assert sorted(os.listdir(checkpoint_dir)) == ["epoch_3.pt"]
    served = load_without_allowlist(elsewhere / "served.pt")
    assert_same_tensors(saved["model_state_dict"], served["model_state_dict"])
    weights = load_without_allowlist(elsewhere / "epoch_3_weights.pt")
    assert_same_tensors(saved["model_state_dict"], weights)


def test_config_interpolations_are_copied_as_text(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    config = dict_config()
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source, config=config)
    home = "/home/sweeper-must-not-leak-this"

    assert_success(run_sweeper("extract", source, env={"HOME": home}))

    output = checkpoint_dir / "best_model_inference.pt"
    written = load_without_allowlist(output)["config"]
    assert written == OmegaConf.to_container(config, resolve=False)
    assert written["data"] == {"root": "${oc.env:HOME}/datasets", "name": "${model.name}-data"}
    assert home.encode() not in output.read_bytes()


def test_json_reports_one_object_and_delete_original_removes_the_source(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    source = checkpoint_dir / "best_model.pt"
    saved = save_full_checkpoint(source, epoch=7)
    size = source.stat().st_size

    run = run_sweeper("extract", source, "--delete-original", "--json")

    assert_success(run)
    report = run.json()
    output = checkpoint_dir / "best_model_inference.pt"
    assert report["source"] == str(source)
    assert report["output"] == str(output)
    assert report["bytes_in"] == size
    assert report["bytes_out"] == output.stat().st_size
    assert report["bytes_reclaimed"] == size - output.stat().st_size > 0
    assert isinstance(report["seconds"], float) and report["seconds"] >= 0
    assert report["epoch"] == 7
    assert os.listdir(checkpoint_dir) == [output.name]
    assert_same_tensors(
        saved["model_state_dict"], load_without_allowlist(output)["model_state_dict"]
    )


def test_without_delete_the_source_stays_and_nothing_is_reclaimed(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source)
    before = folder_state(checkpoint_dir)

    report = run_sweeper("extract", source, "--json").json()

    output_size = (checkpoint_dir / "best_model_inference.pt").stat().st_size
    assert report["bytes_out"] == output_size
    assert report["bytes_reclaimed"] == -output_size
    after = folder_state(checkpoint_dir)
    assert after.pop("best_model_inference.pt")
    assert after == before


def test_text_report_goes_to_stdout(checkpoint_dir: Path, run_sweeper: RunSweeper) -> None:
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source)

    run = run_sweeper("extract", source)

    assert_success(run)
    assert len(run.stdout.splitlines()) == 1
    assert "best_model_inference.pt" in run.stdout


def test_repeating_an_extraction_is_safe(checkpoint_dir: Path, run_sweeper: RunSweeper) -> None:
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source)
    output = checkpoint_dir / "best_model_inference.pt"

    assert_success(run_sweeper("extract", source))
    first = output.read_bytes()
    assert_success(run_sweeper("extract", source))

    assert output.read_bytes() == first
    assert sorted(os.listdir(checkpoint_dir)) == ["best_model.pt", "best_model_inference.pt"]


@pytest.mark.parametrize("where", ["missing-folder", "the-source", "a-directory"])
def test_unusable_output_path_is_refused(
    checkpoint_dir: Path, run_sweeper: RunSweeper, where: str
) -> None:
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source)
    if where == "a-directory":
        (checkpoint_dir / "best_model_inference.pt").mkdir()
    before = folder_state(checkpoint_dir)
    options, named, reason = {
        "missing-folder": (
            ["-o", checkpoint_dir / "no" / "out.pt"],
            checkpoint_dir / "no" / "out.pt",
            "cannot open the output folder",
        ),
        "the-source": (["-o", source], source, "the output path is the source itself"),
        "a-directory": ([], checkpoint_dir / "best_model_inference.pt", "is a directory"),
    }[where]

    run = run_sweeper("extract", source, "--delete-original", *options)

    assert_refused(run, named, reason)
    assert folder_state(checkpoint_dir) == before


def test_a_source_with_other_hard_links_is_not_deleted(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    source = checkpoint_dir / "best_model.pt"
    saved = save_full_checkpoint(source)
    os.link(source, checkpoint_dir / "also.pt")

    run = run_sweeper("extract", source, "--delete-original")

    assert_refused(run, source, "hard links")
    assert source.exists()
    output = load_without_allowlist(checkpoint_dir / "best_model_inference.pt")
    assert_same_tensors(saved["model_state_dict"], output["model_state_dict"])


def test_output_keeps_the_source_owner_group_and_mode(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source)
    os.chown(source, 12345, 23456)
    source.chmod(0o640)

    assert_success(run_sweeper("extract", source))
    assert_success(run_sweeper("extract", "--weights-only", source))

    for name in ("best_model_inference.pt", "best_model_weights.pt"):
        info = (checkpoint_dir / name).stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (12345, 23456, 0o640)


def test_gpu_saved_tensors_extract_without_importing_torch(checkpoint_dir: Path) -> None:
    source = checkpoint_dir / "best_model.pt"
    saved = full_checkpoint()
    save_as_if_on_gpu(saved, source, "cuda:0")
    with zipfile.ZipFile(source) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    assert b"cuda:0" in pickled  # the fake took: torch recorded GPU locations
    script = textwrap.dedent(
        """
        import sys
        from sweeper.cli import main
        code = main(sys.argv[1:])
        assert "torch" not in sys.modules, "sweeper imported torch"
        sys.exit(code)
        """
    )

    done = subprocess.run(
        [sys.executable, "-c", script, "extract", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    output = checkpoint_dir / "best_model_inference.pt"
    loaded = load_without_allowlist(output)
    assert_same_tensors(saved["model_state_dict"], loaded["model_state_dict"])


# ---------------------------------------------------------------------------------------------
# Atomicity, through the Python API.


def test_interrupted_extraction_leaves_no_output_and_no_temp(checkpoint_dir: Path) -> None:
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source)
    before = folder_state(checkpoint_dir)
    target = checkpoint_dir / "best_model_inference.pt"

    with located(source) as src, located(target) as dst, pytest.raises(Interrupted):
        extract(src, dst, Mode.INFERENCE, should_stop=lambda: True, delete_source=True)

    assert folder_state(checkpoint_dir) == before


def test_output_name_never_exists_while_the_copy_runs(checkpoint_dir: Path) -> None:
    source = checkpoint_dir / "best_model.pt"
    saved = save_full_checkpoint(source)
    target = checkpoint_dir / "best_model_inference.pt"
    seen: list[list[str]] = []

    def look() -> bool:
        seen.append(sorted(os.listdir(checkpoint_dir)))
        return False

    with located(source) as src, located(target) as dst:
        result = extract(src, dst, Mode.INFERENCE, should_stop=look)

    assert seen  # the copy polled at least once
    for names in seen:
        assert target.name not in names
        assert len([n for n in names if TEMP_MARK in n and n.startswith(".")]) == 1, names
    assert sorted(os.listdir(checkpoint_dir)) == ["best_model.pt", target.name]
    assert result.bytes_out == target.stat().st_size
    assert_same_tensors(
        saved["model_state_dict"], load_without_allowlist(target)["model_state_dict"]
    )


# ---------------------------------------------------------------------------------------------
# Bad input: one stderr line naming the file and the reason, exit 1, nothing written or deleted.


def _full(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    save_full_checkpoint(path)
    return path


def _truncated_at(where: Callable[[Path], int]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = _full(folder)
        os.truncate(path, where(path))
        return path

    return build


def _model_record_flipped(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    save_full_checkpoint(path, config=plain_config())  # so that torch.load can show the damage
    offset, size = record_span(path, "/data/0")
    flip_byte(path, offset + size // 2)
    return path


def _pickle_flipped(folder: Path) -> Path:
    path = _full(folder)
    offset, size = record_span(path, "/data.pkl")
    at = path.read_bytes().index(b"model_state_dict", offset)
    assert at < offset + size
    flip_byte(path, at + 2)
    return path


def _central_signature_broken(folder: Path) -> Path:
    path = _full(folder)
    overwrite(path, central_directory_offset(path), b"XXXX")
    return path


def _central_offset_past_end(folder: Path) -> Path:
    path = _full(folder)
    size = path.stat().st_size
    overwrite(path, size - 22 + 16, struct.pack("<I", size + 4096))
    return path


def _local_header_renamed(folder: Path) -> Path:
    path = _full(folder)
    with zipfile.ZipFile(path) as archive:
        (info,) = [i for i in archive.infolist() if i.filename.endswith("/data/0")]
    overwrite(path, info.header_offset + 30, b"Z")
    return path


def _not_zip(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    path.write_text("epoch=3 loss=0.1\n")
    return path


def _empty(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    path.write_bytes(b"")
    return path


def _legacy(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    save_legacy(path, full_checkpoint())
    return path


def _no_model_weights(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    checkpoint = full_checkpoint()
    checkpoint["weights"] = checkpoint.pop("model_state_dict")  # a key no family names
    torch.save(checkpoint, path)
    return path


def _inference(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    save_inference_checkpoint(path)
    return path


def _bare_weights(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    save_bare_weights(path)
    return path


def _directory(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    path.mkdir()
    return path


def _fifo(folder: Path) -> Path:
    path = folder / "ckpt.pt"
    os.mkfifo(path)
    return path


def _symlink(folder: Path) -> Path:
    real = _full(folder).rename(folder / "real.pt")
    path = folder / "ckpt.pt"
    path.symlink_to(real.name)
    return path


# name: (builder, reason pattern, whether inspect refuses it too)
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str, bool]] = {
    "not-zip": (_not_zip, "not a zip archive", True),
    "empty": (_empty, "not a zip archive", True),
    "legacy": (_legacy, "legacy .*format", True),
    "truncated-head": (_truncated_at(lambda p: 64), "truncated", True),
    "truncated-half": (_truncated_at(lambda p: p.stat().st_size // 2), "truncated", True),
    "truncated-directory": (
        _truncated_at(lambda p: central_directory_offset(p) + 10),
        "truncated",
        True,
    ),
    "truncated-before-end-record": (
        _truncated_at(lambda p: p.stat().st_size - 22),
        "truncated",
        True,
    ),
    "truncated-last-byte": (_truncated_at(lambda p: p.stat().st_size - 1), "truncated", True),
    "crc-model-tensor": (_model_record_flipped, "CRC mismatch in record 'data/0'", False),
    "crc-data-pkl": (_pickle_flipped, "CRC mismatch in record 'data.pkl'", True),
    "central-signature": (_central_signature_broken, "malformed archive", True),
    "central-offset": (_central_offset_past_end, "malformed archive", True),
    "local-header": (_local_header_renamed, "malformed archive", False),
    "no-model-weights": (_no_model_weights, "cannot reduce it: holds training state", False),
    "inference": (_inference, "already an inference checkpoint", False),
    "bare-weights": (_bare_weights, "already bare weights", False),
    "directory": (_directory, "a directory", True),
    "fifo": (_fifo, "a FIFO", True),
    "symlink": (_symlink, "symlink", True),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_changes(
    checkpoint_dir: Path, run_sweeper: RunSweeper, case: str
) -> None:
    build, reason, _ = BAD_INPUTS[case]
    path = build(checkpoint_dir)
    before = folder_state(checkpoint_dir)

    # --delete-original: the strongest request; a refusal must still delete nothing.
    run = run_sweeper("extract", path, "--delete-original", "--json", timeout=20)

    assert_refused(run, path, reason)
    assert run.stdout == ""
    assert folder_state(checkpoint_dir) == before


def test_inspect_refuses_each_bad_file_and_reports_the_rest(
    tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    bad: dict[Path, str] = {}
    for case, (build, reason, refused_by_inspect) in BAD_INPUTS.items():
        if refused_by_inspect:
            folder = tmp_path / case
            folder.mkdir()
            bad[build(folder)] = reason
    good = tmp_path / "good.pt"
    save_full_checkpoint(good)
    before = {path.parent: folder_state(path.parent) for path in bad}

    run = run_sweeper("inspect", "--json", *bad, good, timeout=30)

    assert run.returncode == 1
    assert len(run.stderr_lines) == len(bad), run.stderr
    for (path, reason), line in zip(bad.items(), run.stderr_lines, strict=True):
        assert_refused(CliRun(1, "", line), path, reason)
    reports = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["kind"] for r in reports] == ["invalid"] * len(bad) + ["full"]
    assert reports[-1]["path"] == str(good)
    assert {path.parent: folder_state(path.parent) for path in bad} == before


def test_a_flipped_model_byte_is_invisible_to_torch_load(checkpoint_dir: Path) -> None:
    """Why the CRC check matters: the corrupt-tensor case above loads silently in torch."""
    path = _model_record_flipped(checkpoint_dir)
    intact = tiny_model().state_dict()

    corrupt = torch.load(path, weights_only=True)["model_state_dict"]

    assert sorted(corrupt) == sorted(intact)
    assert not all(torch.equal(corrupt[name], intact[name]) for name in intact)


def test_unreadable_source_is_refused(checkpoint_dir: Path) -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the CLI as another user")
    as_nobody = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    probe = subprocess.run(
        [*as_nobody, sys.executable, "-c", "import sweeper.cli"],
        cwd=checkpoint_dir,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"python cannot run as nobody here: {probe.stderr.decode()[-200:]}")
    source = _full(checkpoint_dir)
    source.chmod(0)
    checkpoint_dir.chmod(0o777)  # only the file itself is out of reach
    before = folder_state(checkpoint_dir)

    # Relative names, run from inside the folder: tmp_path's parents are closed to nobody.
    runs = [
        run_cli("extract", source.name, cwd=checkpoint_dir, prefix=as_nobody),
        run_cli("extract", source.name, "--delete-original", cwd=checkpoint_dir, prefix=as_nobody),
        run_cli("inspect", source.name, cwd=checkpoint_dir, prefix=as_nobody),
    ]

    for run in runs:
        assert_refused(run, Path(source.name), "cannot open: Permission denied")
    assert folder_state(checkpoint_dir) == before


def test_disk_full_during_the_write_leaves_no_temp(
    mount_tmpfs: Callable[[int], Path], tmp_path: Path, run_sweeper: RunSweeper
) -> None:
    model = torch.nn.Linear(400, 400)  # 642 KB of weights; with AdamW state ~1.9 MB
    model_bytes = sum(t.untyped_storage().nbytes() for t in model.state_dict().values())
    staged = tmp_path / "staged.pt"
    save_full_checkpoint(staged, model=model)
    disk = mount_tmpfs(staged.stat().st_size + model_bytes // 2)
    source = disk / "best_model.pt"
    shutil.copyfile(staged, source)
    assert shutil.disk_usage(disk).free < model_bytes  # the source fits; its copy cannot
    before = folder_state(disk)

    for options in ([], ["--delete-original", "--json"]):
        run = run_sweeper("extract", source, *options)

        assert_refused(run, disk / "best_model_inference.pt", "disk full")
        assert run.stdout == ""
        assert temp_files(disk) == []
        assert folder_state(disk) == before


# ---------------------------------------------------------------------------------------------
# Archives past 4 GiB need zip64 fields; too big to write in a test, so the layout is checked.


@pytest.mark.parametrize(
    "sizes",
    [[10, 2**32 - 200, 1000], [10, 2**32 + 5, 7], [2**31, 2**31, 2**31, 16]],
    ids=["straddles-4-gib", "larger-than-4-gib", "starts-past-4-gib"],
)
def test_planned_size_matches_the_archive_written_past_4_gib(sizes: list[int]) -> None:
    """The size promised before writing (the reservation, inspect's ``bytes_written``) is
    exactly what the headers, records, descriptors and central directory add up to."""
    entries = [torchzip.OutputEntry("data.pkl", 64, 0, b"x" * 64, None)]
    entries += [torchzip.OutputEntry(f"data/{i}", n, 0, None, None) for i, n in enumerate(sizes)]

    placed, planned = torchzip._layout(entries)

    body = sum(
        len(header) + entry.size + len(descriptor)
        for entry, (_, header, descriptor) in zip(entries, placed, strict=True)
    )
    directory = torchzip._central_directory(tuple(entries), placed, body)
    assert planned == body + len(directory)


def test_an_existing_output_that_sweeper_did_not_write_is_never_replaced(
    checkpoint_dir: Path, run_sweeper: RunSweeper
) -> None:
    """``-o`` naming someone's file refuses, naming it, and changes nothing; ``--force``
    replaces it; sweeper's own copy of the same checkpoint is rewritten without being told."""
    source = checkpoint_dir / "best_model.pt"
    save_full_checkpoint(source)
    theirs = checkpoint_dir / "submission.pt"
    theirs.write_bytes(b"a colleague's file")
    before = folder_state(checkpoint_dir)

    refused = run_sweeper("extract", source, "-o", theirs)

    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1 and str(theirs) in refused.stderr
    assert "exists; not replaced (--force replaces it)" in refused.stderr
    assert folder_state(checkpoint_dir) == before

    assert_success(run_sweeper("extract", source, "-o", theirs, "--force"))
    assert theirs.read_bytes() != b"a colleague's file"
    assert run_sweeper("extract", source, "-o", theirs).returncode == 1  # not its own name
    assert_success(run_sweeper("extract", source))  # the copy beside it, twice: rewritten
    assert_success(run_sweeper("extract", source))


def test_a_long_multibyte_name_extracts(checkpoint_dir: Path, run_sweeper: RunSweeper) -> None:
    """80 CJK characters are 240 bytes: the temporary name is cut by bytes, not characters."""
    source = checkpoint_dir / ("\u4e2d" * 80 + ".pt")
    save_full_checkpoint(source)

    assert_success(run_sweeper("extract", source))

    assert (checkpoint_dir / ("\u4e2d" * 80 + "_inference.pt")).exists()
    assert temp_files(checkpoint_dir) == []


@pytest.mark.parametrize(
    ("source", "copy"),
    [
        ("epoch_3.pt", "epoch_3_inference.pt"),
        ("checkpoint-3.pth.tar", "checkpoint-3_inference.pth.tar"),
        ("model.tar", "model_inference.tar"),
        ("noext", "noext_inference.pt"),
    ],
)
def test_output_name_keeps_the_whole_extension(source: str, copy: str) -> None:
    """``.pth.tar`` is one extension: the copy of timm's checkpoint-3.pth.tar is
    checkpoint-3_inference.pth.tar, which sweeper then knows as its own output."""
    assert output_name(source, Mode.INFERENCE) == copy
    assert is_sweeper_output(copy) and not is_sweeper_output(source)
