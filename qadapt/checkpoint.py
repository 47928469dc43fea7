"""Saving and restoring ``base/`` + ``adapter/`` + ``qadapt.json``, atomically, with checksums and provenance."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager

from .errors import CheckpointError, IncompatibleError, QadaptError

MANIFEST = "qadapt.json"
PROVENANCE = "qadapt_adapter.json"
FORMAT = 1


def is_checkpoint(path: str) -> bool:
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, MANIFEST)) or os.path.isdir(os.path.join(path, "base")))


# ---------------------------------------------------------------------------------------------------------- save
def save(model, path: str, *, overwrite: bool = False) -> str:
    from . import __version__
    from .api import backend_of
    from .record import base_model, get_record

    record = get_record(model)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise CheckpointError(
            f"save to {path!r}", "the path exists and is not empty; qadapt does not overwrite files unasked",
            "Choose a new folder, or pass overwrite=True",
        )
    backend = backend_of(record)
    merged = record.merge
    if merged is not None and merged.strategy == "dequantize":
        from .unquantized import UNQUANTIZED

        backend, backend_name, options = UNQUANTIZED, None, {}
    else:
        backend_name, options = record.backend, record.options
    support = backend.capabilities(options)[(record.method, "save")] if record.method and merged is None else None
    if support is not None and not support:
        raise IncompatibleError(f"save a {record.method!r} adapter on backend '{record.backend}'", support.reason, support.hint)

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    try:
        os.makedirs(os.path.join(staging, "base"))
        with _without_tuner_layers(base_model(model)) as inner:
            backend.save(inner, os.path.join(staging, "base"), options)
        adapter = None
        if record.method and merged is None:
            # qadapt targets linear layers; full embedding layers are saved only when asked for (no hub look-up).
            model.save_pretrained(os.path.join(staging, "adapter"), safe_serialization=True, save_embedding_layers=False)
            adapter_dir = os.path.join(staging, "adapter")
            _flatten_adapter_dir(adapter_dir, record.adapter_name)
            _write_json(os.path.join(adapter_dir, PROVENANCE), {"method": record.method, **record.describe()})
            adapter = {"method": record.method, "name": record.adapter_name}
        manifest = {
            "format": FORMAT,
            "qadapt_version": __version__,
            "backend": {"name": backend_name, "library_version": record.library_version if backend_name else None, "options": options},
            "adapter": adapter,
            "merged": None
            if merged is None
            else {"method": record.method, "strategy": merged.strategy, "from_backend": record.backend,
                  "report": merged.report.to_dict() if merged.report else None},
            "files": _checksums(staging),
        }
        _write_json(os.path.join(staging, MANIFEST), manifest)
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _flatten_adapter_dir(adapter_dir: str, adapter_name: str) -> None:
    # PEFT writes a non-default adapter into a sub-folder named after it.
    nested = os.path.join(adapter_dir, adapter_name)
    if adapter_name != "default" and os.path.isdir(nested):
        for name in os.listdir(nested):
            os.replace(os.path.join(nested, name), os.path.join(adapter_dir, name))
        os.rmdir(nested)


def _move_into_place(staging: str, path: str) -> None:
    if os.path.exists(path):
        backup = staging + ".old"
        os.replace(path, backup)
        os.replace(staging, path)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, path)


@contextmanager
def _without_tuner_layers(inner):
    """Temporarily put each tuner layer's base layer in its place, so the base saves as a plain quantized model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .proxy import unwrap

    swapped = []
    for name, module in list(inner.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            holder = inner.get_submodule(parent) if parent else inner
            setattr(holder, child, unwrap(module.get_base_layer()))
            swapped.append((holder, child, module))
    try:
        yield inner
    finally:
        for holder, child, module in reversed(swapped):
            setattr(holder, child, module)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(root: str) -> dict[str, str]:
    sums = {}
    for folder, _, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            sums[os.path.relpath(full, root)] = _sha256(full)
    return dict(sorted(sums.items()))


# ---------------------------------------------------------------------------------------------------------- load
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
        if _sha256(full) != expected:
            raise CheckpointError(f"load {path!r}", f"{name} is corrupt (its checksum differs from {MANIFEST})",
                                  "Copy the file again, or save the model again")
    return manifest


def load(path: str):
    from .api import _ready_backend
    from .record import Record, set_record
    from .unquantized import UNQUANTIZED

    manifest = read_manifest(path)
    backend_info = manifest["backend"]
    name = backend_info.get("name")
    backend = UNQUANTIZED if name is None else _ready_backend(name, f"load {path!r}")
    options = backend_info.get("options", {})
    if name is not None:
        installed = backend.library_version()
        if backend_info.get("library_version") and installed != backend_info["library_version"]:
            warnings.warn(f"{path!r} was saved with {backend.distribution} {backend_info['library_version']}; "
                          f"{installed} is installed", stacklevel=3)
    try:
        model = backend.load(os.path.join(path, "base"), options)
    except QadaptError:
        raise
    except Exception as exc:
        raise CheckpointError(f"load {path!r}", f"backend '{backend.name}' could not read base/ ({type(exc).__name__}: {exc})",
                              "Check that the backend's library version matches the one in qadapt.json") from exc
    record = Record(backend=name, options=options, library_version=backend_info.get("library_version"))
    set_record(model, record)
    if manifest.get("adapter"):
        return load_adapter(model, os.path.join(path, "adapter"), strict=True)
    return model


def load_adapter(model, adapter_dir: str, *, strict: bool = True, is_trainable: bool = False):
    import peft

    from . import adapters
    from .api import backend_of
    from .record import get_record

    record = get_record(model)
    provenance_path = os.path.join(adapter_dir, PROVENANCE)
    if not os.path.exists(provenance_path):
        raise CheckpointError(f"load adapter {adapter_dir!r}", f"{PROVENANCE} is missing", "Point at an adapter saved by qadapt.save")
    with open(provenance_path) as handle:
        provenance = json.load(handle)
    differences = _differences(provenance, record)
    if differences:
        message = "the adapter was trained on a base quantized differently: " + "; ".join(differences)
        if strict:
            raise IncompatibleError(f"load adapter {adapter_dir!r}", message,
                                    "Load it onto a base quantized like its own, or pass strict=False to load it anyway")
        warnings.warn(message, stacklevel=3)
    elif provenance.get("library_version") != record.library_version and record.backend is not None:
        warnings.warn(f"adapter trained with {record.backend} {provenance.get('library_version')}, base has "
                      f"{record.library_version}", stacklevel=3)
    backend = backend_of(record)
    config = peft.PeftConfig.from_pretrained(adapter_dir)
    adapters.register_custom_layers(config, backend)
    if provenance["method"] in backend.proxy_methods:
        from .api import proxy_targets
        from .proxy import wrap

        wrap(model, proxy_targets(model, config.target_modules), backend)
    try:
        with adapters.fast_dispatch(backend.name):
            peft_model = peft.PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=is_trainable)
    except Exception as exc:
        raise CheckpointError(f"load adapter {adapter_dir!r}", f"PEFT could not load it ({type(exc).__name__}: {exc})",
                              "Save the adapter again") from exc
    adapters.freeze_constants(peft_model)
    record.method = provenance["method"]
    return peft_model


def _differences(provenance: dict, record) -> list[str]:
    found = []
    if provenance.get("backend") != record.backend:
        found.append(f"backend {provenance.get('backend')!r} (adapter) vs {record.backend!r} (base)")
    saved, current = provenance.get("options") or {}, record.options or {}
    runtime = _runtime_options(record.backend) if provenance.get("backend") == record.backend else set()
    for key in sorted((set(saved) | set(current)) - runtime):
        if saved.get(key) != current.get(key):
            found.append(f"{key}={saved.get(key)!r} (adapter) vs {current.get(key)!r} (base)")
    return found


def _runtime_options(backend_name) -> set[str]:
    """Names of the options that choose how weights run (kernel, compute dtype), which an adapter does not depend on."""
    from .plugins import get_backend

    try:
        return {option.name for option in get_backend(backend_name).options if option.runtime}
    except QadaptError:  # the backend is not installed here: compare every option
        return set()
