"""A checkpoint whose base is a reference to the folder it was quantized from (what a sharded run saves: the base is
unchanged by training, and gathering it would put the whole model on one rank)."""

from __future__ import annotations

import os

from ..errors import CheckpointError
from .files import sha256


def load_source(path: str, source: dict, backend, options: dict):
    """The base of checkpoint ``path``: its source folder, checked against the recorded checksums, quantized (or
    loaded, if it is quantized already) with the recorded backend and options."""
    folder = source.get("path", "")
    if not os.path.isdir(folder):
        raise CheckpointError(f"load {path!r}", f"its base is the folder {folder!r}, which is not there",
                              "Put the base model back at that path (the checkpoint records its checksums)")
    from ..inputs import check_model_folder

    check_model_folder(folder)  # safetensors weights only
    for name, expected in source.get("files", {}).items():
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise CheckpointError(f"load {path!r}", f"its base_source names the file {name!r}, outside its folder",
                                  "Save the model again")
        full = os.path.join(folder, name)
        if not os.path.exists(full) or sha256(full) != expected:
            raise CheckpointError(f"load {path!r}", f"its base folder {folder!r} changed since the adapter was saved "
                                  f"({name} is {'missing' if not os.path.exists(full) else 'different'})",
                                  "Restore the base model the adapter was trained on")
    if backend.folder_options(folder) is not None:
        return backend.load(folder, options)
    return backend.quantize(folder, options)
