"""``qadapt.load`` of a checkpoint folder: verify it, load the base with its backend, put the adapter back."""

from __future__ import annotations

import os
import warnings

from ..errors import CheckpointError, QadaptError
from ..plugins import ready_backend
from ..record import Record, set_record
from .adapter import load_adapter
from .manifest import read_manifest
from .source import load_source


def load(path: str):
    from ..unquantized import UNQUANTIZED

    manifest = read_manifest(path)
    backend_info = manifest["backend"]
    name = backend_info.get("name")
    backend = UNQUANTIZED if name is None else ready_backend(name, f"load {path!r}")
    options = backend_info.get("options", {})
    if name is not None:
        installed = backend.library_version()
        if backend_info.get("library_version") and installed != backend_info["library_version"]:
            warnings.warn(f"{path!r} was saved with {backend.distribution} {backend_info['library_version']}; "
                          f"{installed} is installed", stacklevel=3)
    try:
        if manifest.get("base_source"):  # saved by a sharded run: the base is the folder it was quantized from
            model = load_source(path, manifest["base_source"], backend, options)
        else:
            model = backend.load(os.path.join(path, "base"), options)
    except QadaptError:
        raise
    except Exception as exc:
        raise CheckpointError(f"load {path!r}", f"backend '{backend.name}' could not read base/ ({type(exc).__name__}: {exc})",
                              "Check that the backend's library version matches the one in qadapt.json") from exc
    record = Record(backend=name, options=options, library_version=backend_info.get("library_version"),
                    merged_when_saved=manifest.get("merged"),
                    source=(manifest.get("base_source") or {}).get("path"))
    set_record(model, record)
    if manifest.get("adapter"):
        return load_adapter(model, os.path.join(path, "adapter"), strict=True)
    return model
