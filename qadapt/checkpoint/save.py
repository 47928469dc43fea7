"""``qadapt.save``: the quantized base, the adapter (unless merged into the base) and ``qadapt.json``, atomically."""

from __future__ import annotations

import os
from contextlib import contextmanager

from ..errors import CheckpointError, IncompatibleError
from ..hf import conversions
from ..plugins import backend_of
from ..record import base_model, get_record
from .files import SaveTarget, checksums, is_free, sizes, write_json
from .manifest import FORMAT, MANIFEST, PROVENANCE, check_adapter_name, quantized_layer_names


def save(model, path: str, *, overwrite: bool = False) -> str:
    from .._version import __version__

    record = get_record(model)
    if record.method:
        check_adapter_name(record.adapter_name, f"save to {path!r}")
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

    # The claim is taken, and what a killed save left is recovered, before the emptiness check (files.py).
    with SaveTarget(path, f"save to {path!r}") as target:
        if not is_free(target.path) and not overwrite:
            raise CheckpointError(
                f"save to {path!r}", "the path exists and is not empty; qadapt does not overwrite files unasked",
                "Choose a new folder, or pass overwrite=True",
            )
        staging = target.staging()
        os.makedirs(os.path.join(staging, "base"))
        with _without_tuner_layers(base_model(model)) as inner:
            backend.save(inner, os.path.join(staging, "base"), options)
            layers = quantized_layer_names(inner, backend)
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
            "backend": {"name": backend_name, "library_version": record.library_version if backend_name else None,
                        "options": options, "quantized_layers": layers,
                        "allow_unquantized": list(record.allow_unquantized) if backend_name else []},
            # conversions made before quantizing (split MoE experts, Conv1D made nn.Linear), replayed by the loader
            # from base/qadapt_conversions.json; recorded here too for provenance
            "conversions": conversions(base_model(model)),
            "adapter": adapter,
            "merged": None
            if merged is None
            else {"method": record.method, "strategy": merged.strategy, "from_backend": record.backend,
                  "report": merged.report.to_dict() if merged.report else None},
            "files": checksums(staging),
            "sizes": sizes(staging),
        }
        write_json(os.path.join(staging, MANIFEST), manifest)
        target.commit(staging, overwrite)
    return path


def _flatten_adapter_dir(adapter_dir: str, adapter_name: str) -> None:
    # PEFT writes a non-default adapter into a sub-folder named after it.
    nested = os.path.join(adapter_dir, adapter_name)  # a plain name (check_adapter_name): never outside adapter_dir
    if adapter_name != "default" and os.path.isdir(nested) and not os.path.islink(nested):
        for name in os.listdir(nested):
            os.replace(os.path.join(nested, name), os.path.join(adapter_dir, name))
        os.rmdir(nested)


@contextmanager
def _without_tuner_layers(inner):
    """Temporarily put each tuner layer's base layer in its place, so the base saves as a plain quantized model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..proxy import unwrap

    swapped = []
    outer = None  # a tuner layer can wrap another (PEFT nests its ParamWrapper layers on MoE experts): the outer goes
    for name, module in list(inner.named_modules()):
        if outer is not None and name.startswith(outer):
            continue
        if isinstance(module, BaseTunerLayer):
            outer = name + "."
            parent, _, child = name.rpartition(".")
            holder = inner.get_submodule(parent) if parent else inner
            setattr(holder, child, unwrap(module.get_base_layer()))
            swapped.append((holder, child, module))
    try:
        yield inner
    finally:
        for holder, child, module in reversed(swapped):
            setattr(holder, child, module)
