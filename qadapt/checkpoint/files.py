"""Writing a checkpoint folder safely: staging beside the target, checksums, and the final move into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil


def move_into_place(staging: str, path: str) -> None:
    if os.path.exists(path):
        backup = staging + ".old"
        os.replace(path, backup)
        os.replace(staging, path)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, path)


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(root: str) -> dict[str, str]:
    sums = {}
    for folder, _, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            sums[os.path.relpath(full, root)] = sha256(full)
    return dict(sorted(sums.items()))
