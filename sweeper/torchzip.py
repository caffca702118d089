"""The torch zip checkpoint API the rest of sweeper uses: nothing outside ``sweeper.formats``
parses zip headers or pickles.

A ``torch.save`` file is an uncompressed zip archive.  ``<prefix>/data.pkl`` is a protocol-2
pickle of the saved object in which every tensor storage is a *persistent id*
``("storage", torch.FloatStorage, "7", "cuda:0", numel)`` pointing at the record
``<prefix>/data/7``: raw little-endian element bytes, stored, 64-byte aligned, with a CRC-32.

sweeper never lets torch (or anything else) execute that pickle: ``sweeper.formats.unpickler``
resolves every global through an allowlist to an inert stand-in.  What a checkpoint holds is
decided by its layout family (``sweeper.formats.families``: one module per family); extraction
writes a fresh pickle of the kept subtree and copies the referenced storage records byte for
byte (``sweeper.formats.output``), so no tensor is ever deserialised and ``import torch`` is
never needed.

The code lives in ``sweeper.formats``; this module names what the rest of sweeper may use.
"""

from __future__ import annotations

from sweeper.formats.checkpoint import (
    Checkpoint,
    KeyUsage,
    Kind,
    Mode,
    key_usage,
    open_checkpoint,
)
from sweeper.formats.output import (
    PROVENANCE_RECORD,
    Interrupted,
    OutputEntry,
    OutputPlan,
    Provenance,
    _central_directory,
    _layout,
    archive_matches_plan,
    output_size,
    plan_output,
    provenance_of,
    read_provenance,
    same_content,
    select_output,
    verify_output,
    verify_records,
    without_provenance,
    write_output,
)
from sweeper.formats.records import Archive, Record, read_archive
from sweeper.formats.unpickler import MEMORY_REFUSAL, load_inert, rely_on_address_space_limit

__all__ = [
    "MEMORY_REFUSAL",
    "PROVENANCE_RECORD",
    "Archive",
    "Checkpoint",
    "Interrupted",
    "KeyUsage",
    "Kind",
    "Mode",
    "OutputEntry",
    "OutputPlan",
    "Provenance",
    "Record",
    "_central_directory",
    "_layout",
    "archive_matches_plan",
    "key_usage",
    "load_inert",
    "open_checkpoint",
    "output_size",
    "plan_output",
    "provenance_of",
    "read_archive",
    "read_provenance",
    "rely_on_address_space_limit",
    "same_content",
    "select_output",
    "verify_output",
    "verify_records",
    "without_provenance",
    "write_output",
]
