"""``qadapt.save``: the quantized base, every adapter (unless merged into the base) and ``qadapt.json``, atomically.

Layout: ``base/`` (the backend's format, plus the tokenizer and ``generation_config.json``), ``adapter/`` (the active
adapter, as PEFT's ``save_pretrained`` writes it, with ``qadapt_adapter.json``), ``adapter/<name>/`` (every other
adapter), ``qadapt.json`` (``adapter``: the active one; ``adapters``: all of them, with their folders).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager

from ..errors import CheckpointError, IncompatibleError, InvalidOptionError
from ..hf import conversions
from ..plugins import backend_of
from ..record import base_model, get_record
from .files import SaveTarget, checksums, is_free, sizes, write_json
from .manifest import FORMAT, MANIFEST, PROVENANCE, check_adapter_name, quantized_layer_names
from .shipping import write_generation_config, write_tokenizer


def save(model, path: str, *, overwrite: bool = False, tokenizer=None) -> str:
    from .._version import __version__
    from ..adapters import active_name, attached

    record = get_record(model)
    if record.sharded is not None:
        raise CheckpointError(f"save to {path!r}", f"the model is sharded by {record.sharded}: each rank holds a "
                              "share of it", "Use qadapt.distributed.save (collective: it writes once, on rank 0)")
    backend = backend_of(record)
    merged = record.merge
    on_model = attached(model)  # every adapter, whoever attached it
    if merged is not None:
        from ..unquantized import UNQUANTIZED

        extra = sorted(set(on_model) - {merged.adapter_name})
        if extra:
            raise InvalidOptionError(
                "save a merged model", f"adapters {', '.join(map(repr, extra))} were added after the merge and are "
                "not part of the merged base", "Unmerge first (qadapt.unmerge) to save every adapter",
            )
        if merged.strategy == "dequantize":
            backend, backend_name, options = UNQUANTIZED, None, {}
        else:
            backend_name, options = record.backend, record.options
        to_save = {}
    else:
        backend_name, options = record.backend, record.options
        to_save = on_model
    active = active_name(model) if to_save else None
    if active is not None:
        record.method, record.adapter_name = to_save[active], active
    for name, method in to_save.items():
        support = backend.capabilities(options)[(method, "save")]
        if not support:
            raise IncompatibleError(f"save the {method!r} adapter {name!r} on backend '{record.backend}'", support.reason,
                                    support.hint)
        check_adapter_name(name, f"save to {path!r}")  # a plain name: adapter/<name> never leaves the checkpoint

    # The claim is taken, and what a killed save left is recovered, before the emptiness check (files.py).
    with SaveTarget(path, f"save to {path!r}") as target:
        if not is_free(target.path) and not overwrite:
            raise CheckpointError(
                f"save to {path!r}", "the path exists and is not empty; qadapt does not overwrite files unasked",
                "Choose a new folder, or pass overwrite=True",
            )
        staging = target.staging()
        base_dir = os.path.join(staging, "base")
        os.makedirs(base_dir)
        with _without_tuner_layers(base_model(model)) as inner:
            backend.save(inner, base_dir, options)
            layers = quantized_layer_names(inner, backend)
        write_generation_config(base_model(model), base_dir)
        tokenizer_source = write_tokenizer(base_dir, tokenizer, _sources(model, record))
        if tokenizer_source is None:
            warnings.warn(f"qadapt.save({path!r}): no tokenizer was passed and none was found where the model was "
                          "loaded from; base/ has none (pipelines and gptqmodel need one): pass tokenizer=",
                          stacklevel=3)
        index = _save_adapters(model, staging, to_save, active, record)
        manifest = {
            "format": FORMAT,
            "qadapt_version": __version__,
            "backend": {"name": backend_name, "library_version": record.library_version if backend_name else None,
                        "options": options, "quantized_layers": layers,
                        "allow_unquantized": list(record.allow_unquantized) if backend_name else []},
            # conversions made before quantizing (split MoE experts, Conv1D made nn.Linear), replayed by the loader
            # from base/qadapt_conversions.json; recorded here too for provenance
            "conversions": conversions(base_model(model)),
            "adapter": {"method": to_save[active], "name": active} if active is not None else None,
            "adapters": index,
            "tokenizer": tokenizer_source,
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


def _save_adapters(model, staging: str, to_save: dict, active, record) -> dict:
    """Every adapter with PEFT's own ``save_pretrained``, each into its folder (the active one at ``adapter/``, the
    others at ``adapter/<name>/``) with its provenance; returns ``{name: {"method", "dir"}}``."""
    index = {}
    for name in sorted(to_save, key=lambda n: n != active):  # the active one first: it owns adapter/
        folder = "adapter" if name == active else os.path.join("adapter", name)
        target = os.path.join(staging, folder)
        written = tempfile.mkdtemp(prefix=".adapter-", dir=staging)
        # qadapt targets linear layers; full embedding layers are saved only when asked for (no hub look-up).
        model.save_pretrained(written, safe_serialization=True, save_embedding_layers=False, selected_adapters=[name])
        # PEFT writes "default" at the top of the folder and any other adapter into a sub-folder of its name
        source = written if name == "default" else os.path.join(written, name)
        if not os.path.exists(os.path.join(source, "adapter_model.safetensors")):
            raise CheckpointError(f"save the adapter {name!r}", "PEFT wrote no adapter_model.safetensors for it",
                                  "Report this to qadapt: nothing was saved")
        os.makedirs(target, exist_ok=True)
        for entry in os.listdir(source):
            os.replace(os.path.join(source, entry), os.path.join(target, entry))
        shutil.rmtree(written)
        provenance = {"method": to_save[name], **record.describe()}
        if name in record.adapter_notes:
            provenance["note"] = record.adapter_notes[name]
        write_json(os.path.join(target, PROVENANCE), provenance)
        index[name] = {"method": to_save[name], "dir": folder}
    return index


def _sources(model, record) -> list[str]:
    """Folders the model came from, where its tokenizer may be: the one qadapt loaded it from, and the one
    transformers records (``config._name_or_path``)."""
    inner = base_model(model)
    found = [record.source, getattr(getattr(inner, "config", None), "_name_or_path", None)]
    return [folder for folder in dict.fromkeys(found) if isinstance(folder, str) and folder and os.path.isdir(folder)]


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
