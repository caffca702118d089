"""The safetensors format, checked by its own rules without loading a tensor.

A ``.safetensors`` file is an 8-byte little-endian header length ``N``, ``N`` bytes of a UTF-8
JSON object (``{"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, ...}``,
and an optional ``__metadata__`` map of strings; spaces may pad it), then the data buffer.
The format has no checksum, so "verified" here means what the ``safetensors`` library itself
checks before it maps a file: the header parses, every tensor's byte length is exactly its
shape times its dtype's width, the tensors' byte ranges tile the buffer from 0 with no gap or
overlap, and the buffer ends exactly at the end of the file.  A file cut short by a killed
writer, or padded, fails that.

The header is read in full, so its size is bounded: :data:`MAX_HEADER_BYTES` (the library
allows 100 MB; a header holds a few dozen bytes per tensor, so 8 MiB is room for some hundred
thousand tensors in one file).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from sweeper.errors import FileRefused

MAX_HEADER_BYTES = 8 << 20
_MAX_DIMENSIONS = 64
MAGIC_LENGTH = 8

# Bits per element, from safetensors' Dtype (sub-byte types pack; a tensor must end on a byte).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


@dataclass(frozen=True, slots=True)
class SafetensorsFile:
    """What a valid file holds: its tensors' names and the sizes of its two parts."""

    tensors: frozenset[str]
    header_bytes: int
    data_bytes: int


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the name {key!r} appears twice")
        result[key] = value
    return result


def read_safetensors(fd: int, display: str) -> SafetensorsFile:
    """Check the open file ``fd`` against the format's rules (see the module docstring).
    Raises FileRefused naming the first rule it breaks."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, MAGIC_LENGTH, 0)
    if len(head) < MAGIC_LENGTH:
        raise FileRefused(display, "not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES:
        raise FileRefused(
            display, f"safetensors header of {length} bytes: more than {MAX_HEADER_BYTES} allowed"
        )
    if MAGIC_LENGTH + length > size:
        raise FileRefused(display, "truncated safetensors file: its header runs past the end")
    raw = os.pread(fd, length, MAGIC_LENGTH)
    if len(raw) != length:
        raise FileRefused(display, "truncated safetensors file: its header runs past the end")
    if not raw.startswith(b"{"):
        raise FileRefused(display, "not a safetensors file: its header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FileRefused(display, f"bad safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise FileRefused(display, "bad safetensors header: not a JSON object")
    data_bytes = size - MAGIC_LENGTH - length
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise FileRefused(display, "bad safetensors header: __metadata__ is not strings")
            continue
        spans.append((*_span(name, info, display, data_bytes), name))
    spans.sort()
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise FileRefused(
                display, f"bad safetensors layout: tensor {name!r} starts at {start}, not {end}"
            )
        end = stop
    if end != data_bytes:
        what = "truncated" if end > data_bytes else "trailing bytes in"
        raise FileRefused(
            display,
            f"{what} safetensors file: its tensors need {end} data bytes, it holds {data_bytes}",
        )
    return SafetensorsFile(frozenset(name for _, _, name in spans), length, data_bytes)


def _span(name: str, info: object, display: str, data_bytes: int) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise FileRefused(display, f"bad safetensors header: tensor {name!r} is not described")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        raise FileRefused(display, f"bad safetensors header: tensor {name!r} has dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMENSIONS
        or not all(_count(d) for d in shape)
    ):
        raise FileRefused(display, f"bad safetensors header: tensor {name!r} has a bad shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise FileRefused(display, f"bad safetensors header: tensor {name!r} has bad offsets")
    start, stop = offsets
    if 0 in shape:
        elements = 0
    else:
        elements = 1
        for dimension in shape:  # stopped as soon as it outgrows the file: no huge products
            elements *= dimension
            if elements * bits > 8 * data_bytes:
                raise FileRefused(
                    display, f"bad safetensors header: tensor {name!r} is larger than the file"
                )
    total_bits = elements * bits
    if total_bits % 8 or stop - start != total_bits // 8:
        raise FileRefused(
            display,
            f"bad safetensors header: tensor {name!r} spans {stop - start} bytes, "
            f"its shape and dtype need {total_bits // 8}{'' if total_bits % 8 == 0 else '+'}",
        )
    return start, stop


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
