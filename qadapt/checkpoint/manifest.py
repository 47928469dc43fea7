"""``qadapt.json``: what a checkpoint folder holds, read back and verified before anything is loaded from it.

A folder is a checkpoint only if it holds ``qadapt.json``. Before any loader sees the folder, :func:`read_manifest`
checks, and refuses with a :class:`CheckpointError` otherwise:

* the manifest is a regular file of sane size holding a JSON object of the expected schema (every key's type;
  ``files`` present and not empty; ``adapter`` and ``merged`` consistent with the folder);
* every path in ``files`` is a plain relative path inside the folder (no ``..``, no absolute path, no empty or ``.``
  part), and every part of it is a real folder or, last, a regular file: no symlink (a symlinked ``base/`` included),
  no FIFO or device, so nothing outside the folder is opened and nothing can block a read;
* every listed file has the size recorded at save, checked with ``lstat`` before it is read, and its checksum; a hash
  reads at most that many bytes;
* weights are safetensors only: no pickle-format file anywhere in the folder (by name: ``.bin``, ``.pt``, ``.pth``,
  ``.ckpt``, ``.pkl``...; by content: a pickle or ``torch.save`` zip header), no file in a sub-folder that the
  manifest does not list (loaders pick files up by name), no symlink or special file anywhere in it.

After the base is loaded, :func:`check_loaded_layers` compares its quantized layers with the ones recorded at save:
a ``qadapt.json`` naming the wrong backend is refused instead of loading random weights.
"""

from __future__ import annotations

import json
import os
import re
import stat

from ..errors import CheckpointError, InvalidOptionError
from .files import sha256

MANIFEST = "qadapt.json"
PROVENANCE = "qadapt_adapter.json"
FORMAT = 1
#: a manifest larger than this is not one qadapt wrote (a 70B model's lists its few hundred files in ~100 KB)
MAX_MANIFEST_BYTES = 16 << 20
#: extensions of weight formats that unpickle (or are not safetensors): never loaded from a checkpoint
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib", ".npy", ".npz", ".msgpack", ".h5")
#: an adapter name is a plain identifier: PEFT joins it into file paths and module names
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_checkpoint(path: str) -> bool:
    """Is ``path`` a folder written by :func:`qadapt.save`? Only a folder holding ``qadapt.json`` is."""
    return os.path.isdir(path) and os.path.lexists(os.path.join(path, MANIFEST))


def looks_like_checkpoint(path: str) -> bool:
    """A folder laid out as a checkpoint (``base/``) but without ``qadapt.json``: a checkpoint missing its manifest."""
    return os.path.isdir(path) and os.path.isdir(os.path.join(path, "base")) and not is_checkpoint(path)


def check_adapter_name(name, asked: str) -> str:
    """``name`` if it is a safe adapter name (letters, digits, ``_``, ``-``; not a path), else InvalidOptionError."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise InvalidOptionError(
            f"{asked} with adapter_name={name!r}",
            "an adapter name is a plain name of letters, digits, '_' and '-' (1-100 characters, not a path): PEFT "
            "joins it into file paths and module names",
            "Pass adapter_name='default' or another plain name",
        )
    return name


def quantized_layer_names(model, backend) -> list[str]:
    """The full names of ``model``'s layers that are ``backend``'s quantized layers."""
    return [name for name, module in model.named_modules() if name and backend.is_quantized_layer(module)]


def check_loaded_layers(manifest: dict, model, backend, path: str) -> None:
    """Refuse a loaded base whose quantized layers are not the ones recorded at save (a wrong backend named in
    ``qadapt.json``, or a folder from elsewhere)."""
    expected = manifest["backend"].get("quantized_layers")
    found = quantized_layer_names(model, backend)
    if expected is None:  # written before qadapt recorded the layers: at least the backend's layers must be there
        if manifest["backend"].get("name") is None or found:
            return
        reason = f"no layer of the loaded base is a '{backend.name}' layer"
    elif sorted(found) == sorted(expected):
        return
    else:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        reason = (f"the base loaded with backend '{backend.name}' has {len(found)} of its quantized layers where "
                  f"{MANIFEST} records {len(expected)}" + (f" (not quantized: {', '.join(missing[:3])})" if missing else "")
                  + (f" (unexpected: {', '.join(extra[:3])})" if extra else ""))
    raise CheckpointError(f"load {path!r}", reason + f": {MANIFEST} names the wrong backend, or base/ is not qadapt's",
                          "Save the model again with qadapt.save")


# ---------------------------------------------------------------------------------------------------- reading
def read_manifest(path: str) -> dict:
    """The verified manifest of the checkpoint ``path`` (see the module docstring), or CheckpointError."""
    asked = f"load {path!r}"
    manifest_path = os.path.join(path, MANIFEST)
    info = _lstat(manifest_path)
    if info is None:
        raise CheckpointError(asked, f"{MANIFEST} is missing", "Point at a folder written by qadapt.save")
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_MANIFEST_BYTES:
        raise CheckpointError(asked, f"{MANIFEST} is not a regular file of at most {MAX_MANIFEST_BYTES >> 20} MiB",
                              "Save the model again")
    try:
        with open(manifest_path, "rb") as handle:
            manifest = json.loads(handle.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(asked, f"{MANIFEST} is unreadable ({exc})", "Save the model again") from exc
    problems = schema_problems(manifest)
    if problems:
        raise CheckpointError(asked, f"{MANIFEST} is not a qadapt manifest: " + "; ".join(problems[:3]),
                              "Save the model again with qadapt.save")
    _check_folder(path, manifest, asked)
    return manifest


def _lstat(path: str):
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_folder(root: str, manifest: dict, asked: str) -> None:
    files, recorded_sizes = manifest["files"], manifest.get("sizes") or {}
    for name in sorted(files):
        info = _contained(root, name, asked)
        if info is None:
            raise CheckpointError(asked, f"{name} is missing", "Copy the whole folder, or save the model again")
        if name in recorded_sizes and info.st_size != recorded_sizes[name]:
            raise CheckpointError(asked, f"{name} has {info.st_size} bytes where {MANIFEST} records "
                                  f"{recorded_sizes[name]} (it was changed or cut short)",
                                  "Copy the file again, or save the model again")
        full = os.path.join(root, name)
        _refuse_pickle(full, name, asked)
        if sha256(full, size=info.st_size) != files[name]:
            raise CheckpointError(asked, f"{name} is corrupt (its checksum differs from {MANIFEST})",
                                  "Copy the file again, or save the model again")
    _check_unlisted(root, set(files), asked)
    has_adapter_dir = os.path.lexists(os.path.join(root, "adapter"))
    if manifest["adapter"] is None and has_adapter_dir:
        raise CheckpointError(asked, f"{MANIFEST} records no adapter but the folder holds adapter/",
                              "Save the model again (qadapt.json and adapter/ disagree)")
    if manifest["adapter"] is not None and not any(name.startswith("adapter/") for name in files):
        raise CheckpointError(asked, f"{MANIFEST} records an adapter but lists no file of adapter/",
                              "Save the model again")
    if manifest.get("base_source") is not None:  # a sharded run's save: the base is its source folder (source.py)
        if os.path.lexists(os.path.join(root, "base")):
            raise CheckpointError(asked, f"{MANIFEST} names a base_source folder but the checkpoint holds base/ too",
                                  "Save the model again")
    elif not any(name.startswith("base/") for name in files):
        raise CheckpointError(asked, f"{MANIFEST} lists no file of base/", "Save the model again")


def _contained(root: str, name: str, asked: str):
    """``lstat`` of the listed file ``name`` under ``root`` after checking that it is a plain relative path whose
    every part is a real folder and whose last part is a regular file; None where it does not exist."""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or "\x00" in name or any(part in ("", ".", "..") for part in parts):
        raise CheckpointError(asked, f"{MANIFEST} lists {name!r}, which is not a plain path inside the folder",
                              "Save the model again; never load a checkpoint whose qadapt.json was edited")
    current = root
    for index, part in enumerate(parts):
        current = os.path.join(current, part)
        info = _lstat(current)
        if info is None:
            return None
        last = index == len(parts) - 1
        if stat.S_ISLNK(info.st_mode):
            raise CheckpointError(asked, f"{'/'.join(parts[:index + 1])} is a symbolic link; a checkpoint holds only "
                                  "its own files", "Copy the folder with its files (cp -rL), or save the model again")
        if not last and not stat.S_ISDIR(info.st_mode):
            return None
        if last and not stat.S_ISREG(info.st_mode):
            raise CheckpointError(asked, f"{name} is not a regular file (a folder, FIFO, socket or device)",
                                  "Save the model again")
    return info


def _refuse_pickle(full: str, name: str, asked: str) -> None:
    with open(full, "rb") as handle:
        head = handle.read(4)
    pickled = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
    if name.lower().endswith(UNSAFE_SUFFIXES) or pickled or head == b"PK\x03\x04":
        raise CheckpointError(asked, f"{name} is not a safetensors file (a pickle or torch.save archive can run code "
                              "when loaded); qadapt loads weights with safetensors only",
                              "Convert the weights to safetensors, or save the model again with qadapt.save")


def _check_unlisted(root: str, listed: set, asked: str) -> None:
    """No symlink or special file anywhere in the folder, no pickle-format file, and no file in a sub-folder that
    the manifest does not list (transformers and PEFT pick weight files up by name)."""
    for folder, folders, names in os.walk(root):
        for entry in folders + names:
            full = os.path.join(folder, entry)
            relative = os.path.relpath(full, root).replace(os.sep, "/")
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                raise CheckpointError(asked, f"{relative} is a symbolic link; a checkpoint holds only its own files",
                                      "Copy the folder with its files (cp -rL), or save the model again")
            if stat.S_ISDIR(info.st_mode):
                continue
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(asked, f"{relative} is not a regular file (a FIFO, socket or device)",
                                      "Remove it, or save the model again")
            if relative.lower().endswith(UNSAFE_SUFFIXES):
                _refuse_pickle(full, relative, asked)
            if "/" in relative and relative not in listed:
                raise CheckpointError(asked, f"{relative} is not listed in {MANIFEST} (qadapt.save did not write it)",
                                      "Remove it, or save the model again")


# ---------------------------------------------------------------------------------------------------- the schema
def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_optional_str(value) -> bool:
    return value is None or isinstance(value, str)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def schema_problems(manifest) -> list[str]:
    """What ``manifest`` (parsed JSON) breaks of the checkpoint schema, in words (empty: nothing)."""
    from ..capabilities import MERGE_STRATEGIES, METHODS

    if not isinstance(manifest, dict):
        return [f"it holds a JSON {type(manifest).__name__}, not an object"]
    problems = []
    fmt = manifest.get("format")
    if isinstance(fmt, bool) or fmt != FORMAT:
        return [f"unknown checkpoint format {fmt!r} (this qadapt reads format {FORMAT}; upgrade qadapt for newer ones)"]
    if "qadapt_version" in manifest and not _is_str(manifest["qadapt_version"]):
        problems.append("'qadapt_version' is not a string")
    backend = manifest.get("backend")
    if not isinstance(backend, dict):
        problems.append("'backend' is missing or not an object")
    else:
        if "name" not in backend or not _is_optional_str(backend["name"]) or backend["name"] == "":
            problems.append("'backend.name' is neither a name nor null")
        if not _is_optional_str(backend.get("library_version")):
            problems.append("'backend.library_version' is neither a string nor null")
        options = backend.get("options", {})
        if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
            problems.append("'backend.options' is not an object")
        layers = backend.get("quantized_layers")
        if layers is not None and not (isinstance(layers, list) and all(_is_str(layer) for layer in layers)):
            problems.append("'backend.quantized_layers' is not a list of names")
        allow = backend.get("allow_unquantized", [])
        if not (isinstance(allow, list) and all(_is_str(item) for item in allow)):
            problems.append("'backend.allow_unquantized' is not a list of names or patterns")
    adapter = manifest.get("adapter", "missing")
    if adapter == "missing":
        problems.append("'adapter' is missing (null where there is none)")
    elif adapter is not None:
        if not isinstance(adapter, dict) or adapter.get("method") not in METHODS:
            problems.append(f"'adapter' is neither null nor an object with a 'method' of {', '.join(METHODS)}")
        elif not (isinstance(adapter.get("name"), str) and ADAPTER_NAME.fullmatch(adapter["name"])):
            problems.append("'adapter.name' is not a plain adapter name")
    index = manifest.get("adapters")
    if index is not None:
        if not isinstance(index, dict):
            problems.append("'adapters' is neither null nor an object")
        else:
            for name, entry in index.items():
                if not ADAPTER_NAME.fullmatch(name) or not isinstance(entry, dict) \
                        or entry.get("method") not in METHODS or entry.get("dir") not in ("adapter", f"adapter/{name}"):
                    problems.append(f"'adapters' entry {name!r} is not a plain name with a known 'method' and the "
                                    f"'dir' adapter or adapter/{name}")
                    break
            active = adapter.get("name") if isinstance(adapter, dict) else None
            if index and active is None:
                problems.append(f"'adapter' is null but 'adapters' lists {len(index)} adapter(s): the manifest records "
                                "no adapter but the folder holds adapter/")
            elif index and active not in index:
                problems.append("'adapter' (the active one) is not among 'adapters'")
    source = manifest.get("base_source")
    if source is not None and not (isinstance(source, dict) and _is_str(source.get("path"))
                                   and isinstance(source.get("files", {}), dict)
                                   and all(_is_str(k) and _is_str(v) for k, v in source.get("files", {}).items())):
        problems.append("'base_source' is neither null nor an object with a 'path' and 'files' checksums")
    if not _is_optional_str(manifest.get("tokenizer")):
        problems.append("'tokenizer' is neither a string nor null")
    merged = manifest.get("merged")
    if merged is not None:
        if not isinstance(merged, dict) or merged.get("strategy") not in MERGE_STRATEGIES \
                or merged.get("method") not in METHODS:
            problems.append("'merged' is neither null nor an object with a 'method' and a 'strategy'")
        elif adapter not in (None, "missing"):
            problems.append("'merged' and 'adapter' are both set (a merged model saves no adapter)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        problems.append("'files' is missing or empty (every checkpoint lists its files with their checksums)")
    elif not all(isinstance(name, str) and isinstance(digest, str) and _SHA256.fullmatch(digest)
                 for name, digest in files.items()):
        problems.append("'files' does not map each path to a SHA-256 hex digest")
    recorded = manifest.get("sizes")
    if recorded is not None:
        if not isinstance(recorded, dict) or not all(_is_count(size) for size in recorded.values()):
            problems.append("'sizes' does not map each path to a size in bytes")
        elif isinstance(files, dict) and set(recorded) != set(files):
            problems.append("'sizes' and 'files' list different paths")
    return problems
