"""``qadapt.json``: what a checkpoint folder holds, read back and verified before anything is loaded from it."""

from __future__ import annotations

import json
import os

from ..errors import CheckpointError
from .files import sha256

MANIFEST = "qadapt.json"
PROVENANCE = "qadapt_adapter.json"
FORMAT = 1


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, MANIFEST)) or os.path.isdir(os.path.join(path, "base")))


def read_manifest(path: str) -> dict:
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"load {path!r}", f"{MANIFEST} is missing", "Point at a folder written by qadapt.save")
    try:
        with open(manifest_path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"load {path!r}", f"{MANIFEST} is unreadable ({exc})", "Save the model again") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"load {path!r}", f"unknown checkpoint format {manifest.get('format')!r}", "Upgrade qadapt")
    for name, expected in manifest.get("files", {}).items():
        full = os.path.join(path, name)
        if not os.path.exists(full):
            raise CheckpointError(f"load {path!r}", f"{name} is missing", "Copy the whole folder, or save the model again")
        if sha256(full) != expected:
            raise CheckpointError(f"load {path!r}", f"{name} is corrupt (its checksum differs from {MANIFEST})",
                                  "Copy the file again, or save the model again")
    return manifest
