"""``qadapt.load`` of a checkpoint folder: verify it, load the base with its backend, put every adapter back."""

from __future__ import annotations

import os
import warnings

from ..errors import CheckpointError, InvalidOptionError, QadaptError
from ..plugins import ready_backend
from ..record import Record, set_record
from .adapter import adapter_index, load_saved_adapters
from .manifest import read_manifest


def load(path: str, *, trainable: bool = False):
    from ..unquantized import UNQUANTIZED

    manifest = read_manifest(path)
    index, active = adapter_index(manifest)
    if trainable and not index:
        merged = " (its adapter was merged into its base)" if manifest.get("merged") else ""
        raise InvalidOptionError(f"load {path!r} with trainable=True", f"the checkpoint holds no adapter{merged}",
                                 "Load it without trainable=, then attach a new adapter with qadapt.attach")
    backend_info = manifest["backend"]
    name = backend_info.get("name")
    backend = UNQUANTIZED if name is None else ready_backend(name, f"load {path!r}")
    options = backend_info.get("options", {})
    if name is not None:
        installed = backend.library_version()
        if backend_info.get("library_version") and installed != backend_info["library_version"]:
            warnings.warn(f"{path!r} was saved with {backend.distribution} {backend_info['library_version']}; "
                          f"{installed} is installed", stacklevel=3)
    base = os.path.join(path, "base")
    try:
        model = backend.load(base, options)
    except QadaptError:
        raise
    except Exception as exc:
        raise CheckpointError(f"load {path!r}", f"backend '{backend.name}' could not read base/ ({type(exc).__name__}: {exc})",
                              "Check that the backend's library version matches the one in qadapt.json") from exc
    record = Record(backend=name, options=options, library_version=backend_info.get("library_version"),
                    merged_when_saved=manifest.get("merged"), source=os.path.abspath(base))
    set_record(model, record)
    if index:
        return load_saved_adapters(model, path, index, active, strict=True, is_trainable=trainable)
    return model
