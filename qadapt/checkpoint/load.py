"""``qadapt.load`` of a checkpoint folder: verify it, load the base with its backend, put every adapter back."""

from __future__ import annotations

import os
import warnings

from .. import scope
from ..errors import CheckpointError, InvalidOptionError, QadaptError
from ..folders import Claim, listing, resolve
from ..hf import qadapt_only_backend
from ..plugins import ready_backend
from ..record import Record, set_record
from .adapter import adapter_index, load_saved_adapters
from .files import recover_for_load
from .manifest import MANIFEST, check_loaded_layers, read_manifest
from .source import load_source


def load(path: str, *, trainable: bool = False, backend: str | None = None, options: dict | None = None):
    """The checkpoint's model. ``backend`` (if given) must be the recorded one; ``options`` may hold only the
    backend's runtime options (a kernel, a compute dtype), which replace the recorded ones for this load."""
    from ..unquantized import UNQUANTIZED

    recover_for_load(path)  # a killed overwrite may have left the old folder only as its backup
    manifest = read_manifest(path)
    index, active = adapter_index(manifest)
    if trainable and not index:
        merged = " (its adapter was merged into its base)" if manifest.get("merged") else ""
        raise InvalidOptionError(f"load {path!r} with trainable=True", f"the checkpoint holds no adapter{merged}",
                                 "Load it without trainable=, then attach a new adapter with qadapt.attach")
    backend_info = manifest["backend"]
    name = backend_info.get("name")
    asked, runtime = backend, dict(options or {})
    if name is None and (asked is not None or runtime):
        asked_for = {**({"backend": asked} if asked is not None else {}), **runtime}
        raise InvalidOptionError(f"load {path!r} with {listing(asked_for)}",
                                 "the checkpoint's base is in full precision: there is nothing to run differently",
                                 "Call qadapt.load(path) alone; to quantize its base, load its base/ folder with "
                                 "backend=... and then qadapt.load_adapter(model, path)")
    backend = UNQUANTIZED if name is None else ready_backend(name, f"load {path!r}")
    options = _validated_options(backend, backend_info.get("options", {}), path)
    if asked is not None or runtime:
        options = _with_runtime_options(backend, options, asked, runtime, path)
    if name is not None:
        installed = backend.library_version()
        if backend_info.get("library_version") and installed != backend_info["library_version"]:
            warnings.warn(f"{path!r} was saved with {backend.distribution} {backend_info['library_version']}; "
                          f"{installed} is installed", stacklevel=3)
    base = os.path.join(path, "base")
    marked = qadapt_only_backend(base)  # hqq/inc bases say whose layout they hold
    if marked is not None and marked != name:
        raise CheckpointError(f"load {path!r}", f"base/ holds '{marked}' layers where {MANIFEST} names backend "
                              f"{name!r}: {MANIFEST} names the wrong backend, or base/ is not qadapt's",
                              "Save the model again with qadapt.save")
    try:
        if manifest.get("base_source"):  # saved by a sharded run: the base is the folder it was quantized from
            model = load_source(path, manifest["base_source"], backend, options)
        else:
            model = backend.load(base, options)
    except QadaptError:
        raise
    except Exception as exc:
        raise CheckpointError(f"load {path!r}", f"backend '{backend.name}' could not read base/ ({type(exc).__name__}: {exc})",
                              "Check that the backend's library version matches the one in qadapt.json") from exc
    check_loaded_layers(manifest, model, backend, path)
    allow = tuple(backend_info.get("allow_unquantized") or ())
    record = Record(backend=name, options=options, library_version=backend_info.get("library_version"),
                    merged_when_saved=manifest.get("merged"), allow_unquantized=allow,
                    source=(manifest.get("base_source") or {}).get("path") or os.path.abspath(base))
    set_record(model, record)
    scope.record_report(model, scope.report(model, backend, options, allow=allow, from_checkpoint=True,
                                            asked=f"load {path!r}"))
    if index:
        return load_saved_adapters(model, path, index, active, strict=True, is_trainable=trainable)
    return model


def _validated_options(backend, options: dict, path: str) -> dict:
    """The recorded options, checked like a user's first: an edited qadapt.json does not reach the backend's code.
    Returned as recorded (JSON), as the adapter's provenance records them."""
    try:
        backend.validate_options(options)
        return options
    except QadaptError as exc:
        raise CheckpointError(f"load {path!r}", f"qadapt.json records options backend '{backend.name}' refuses: {exc}",
                              "Save the model again") from exc


def _with_runtime_options(backend, recorded: dict, asked: str | None, runtime: dict, path: str) -> dict:
    """The recorded options with the caller's runtime options in their place (refused like a pre-quantized
    folder's: another backend, or an option that says what the weights are)."""
    wanted = resolve(path, Claim(backend, recorded), asked, runtime)
    return {**recorded, **{key: wanted[key] for key in runtime}}
