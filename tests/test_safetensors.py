"""The safetensors check: real files written by the ``safetensors`` package pass; every way a
file can be cut short, padded or lie about its layout is refused, naming the rule."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sweeper.errors import FileRefused
from sweeper.formats.safetensors import MAX_HEADER_BYTES, read_safetensors


def _check(path: Path) -> frozenset[str]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_safetensors(fd, str(path)).tensors
    finally:
        os.close(fd)


def _refused(path: Path) -> str:
    with pytest.raises(FileRefused) as refused:
        _check(path)
    return refused.value.reason


def _raw(path: Path, header: object, data: bytes, pad: bytes = b"") -> Path:
    body = json.dumps(header).encode() + pad
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.fixture
def written(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.zeros(7, dtype=torch.bfloat16),
        "c": torch.ones(2, 2, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
    }
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_a_file_the_library_wrote_passes(written: Path) -> None:
    assert _check(written) == {"a", "b", "c", "empty", "flag"}


def test_cut_short_anywhere_is_refused(written: Path) -> None:
    data = written.read_bytes()
    for keep in (0, 7, 8, 30, len(data) // 2, len(data) - 1):
        written.write_bytes(data[:keep])
        assert _refused(written), keep


def test_trailing_bytes_are_refused(written: Path) -> None:
    with written.open("ab") as grown:
        grown.write(b"\0" * 8)
    assert "trailing bytes" in _refused(written)


@pytest.mark.parametrize(
    ("header", "data", "words"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "larger than"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "spans 8"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
            },
            b"\0" * 12,
            "starts at 8, not 4",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "starts at",
        ),
        ({"a": {"dtype": "PY_OBJECT", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "dtype"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "spans"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "not described"),
        ({"__metadata__": {"n": 1}}, b"", "__metadata__"),
        ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0", "spans"),
    ],
)
def test_a_header_that_lies_about_its_layout_is_refused(
    tmp_path: Path, header: object, data: bytes, words: str
) -> None:
    assert words in _refused(_raw(tmp_path / "x.safetensors", header, data))


def test_header_padding_with_spaces_is_allowed(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}
    assert _check(_raw(tmp_path / "x.safetensors", header, b"\0" * 4, pad=b"   ")) == {"a"}


def test_a_duplicate_name_is_refused(tmp_path: Path) -> None:
    body = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'  # noqa: E501
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0\0")
    assert "appears twice" in _refused(path)


def test_a_huge_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{")
    os.truncate(path, MAX_HEADER_BYTES + 100)  # sparse: nothing is read
    assert f"more than {MAX_HEADER_BYTES}" in _refused(path)


def test_a_shape_bomb_is_refused(tmp_path: Path) -> None:
    """A header of huge dimensions is refused as soon as the running product outgrows the file
    (never computed in full: a product with millions of digits took minutes), and one of more
    dimensions than any tensor has is refused outright."""
    header = {"a": {"dtype": "F32", "shape": [2**62] * 60, "data_offsets": [0, 4]}}
    assert "larger than the file" in _refused(_raw(tmp_path / "x.safetensors", header, b"\0" * 4))
    header = {"a": {"dtype": "F32", "shape": [1] * 100_000, "data_offsets": [0, 4]}}
    assert "bad shape" in _refused(_raw(tmp_path / "y.safetensors", header, b"\0" * 4))


def test_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 3) + b"{x}")
    assert "bad safetensors header" in _refused(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    assert "not a JSON object" in _refused(path)
