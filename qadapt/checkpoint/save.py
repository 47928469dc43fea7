"""``qadapt.save``: the quantized base, the adapter (unless merged into the base) and ``qadapt.json``, atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

from ..errors import CheckpointError, IncompatibleError
from ..plugins import backend_of
from ..record import base_model, get_record
from .files import checksums, move_into_place, write_json
from .manifest import FORMAT, MANIFEST, PROVENANCE


def save(model, path: str, *, overwrite: bool = False) -> str:
    from .._version import __version__

    record = get_record(model)
    if record.sharded is not None:
        raise CheckpointError(f"save to {path!r}", f"the model is sharded by {record.sharded}: each rank holds a "
                              "share of it", "Use qadapt.distributed.save (collective: it writes once, on rank 0)")
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise CheckpointError(
            f"save to {path!r}", "the path exists and is not empty; qadapt does not overwrite files unasked",
            "Choose a new folder, or pass overwrite=True",
        )
    backend = backend_of(record)
    merged = record.merge
    if merged is not None and merged.strategy == "dequantize":
        from ..unquantized import UNQUANTIZED

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
            write_json(os.path.join(adapter_dir, PROVENANCE), {"method": record.method, **record.describe()})
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
            "files": checksums(staging),
        }
        write_json(os.path.join(staging, MANIFEST), manifest)
        move_into_place(staging, path)
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


@contextmanager
def _without_tuner_layers(inner):
    """Temporarily put each tuner layer's base layer in its place, so the base saves as a plain quantized model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..proxy import unwrap

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
