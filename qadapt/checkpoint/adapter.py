"""Loading adapters onto a base: qadapt's own (checking that the base is quantized like the one the adapter was
trained on), every adapter of a qadapt checkpoint, and adapters PEFT, Trainer or TRL wrote (no provenance to check:
qadapt says so, and keeps that note with the adapter).

Adapter weights are read from ``adapter_model.safetensors`` only: a Trainer ``checkpoint-N`` folder's pickles
(``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``training_args.bin``) are Trainer's to read, with
``resume_from_checkpoint``.
"""

from __future__ import annotations

import json
import os
import stat
import warnings

from ..errors import CheckpointError, IncompatibleError, InvalidOptionError, QadaptError
from ..hf import read_json
from ..plugins import backend_of, get_backend
from ..record import get_record
from .manifest import MANIFEST, PROVENANCE, check_adapter_name, read_manifest

WEIGHTS = "adapter_model.safetensors"
#: what a Trainer checkpoint holds besides the adapter (torch pickles that qadapt never reads)
TRAINER_STATE = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "scaler.pt")


def load_adapter(model, path: str, *, strict: bool = True, is_trainable: bool = False, adapter_name: str | None = None):
    """``qadapt.load_adapter``: ``path`` is a qadapt checkpoint (every adapter it holds), a qadapt adapter, a PEFT
    adapter folder or a Trainer checkpoint."""
    if os.path.exists(os.path.join(path, MANIFEST)):
        manifest = read_manifest(path)
        index, active = adapter_index(manifest)
        if not index:
            merged = " (its adapter was merged into its base)" if manifest.get("merged") else ""
            raise CheckpointError(f"load adapter {path!r}", f"this qadapt checkpoint holds no adapter{merged}",
                                  "Load it with qadapt.load(path)")
        if adapter_name is not None:
            if len(index) > 1:
                raise InvalidOptionError(
                    f"load adapter {path!r} as {adapter_name!r}", f"the checkpoint holds {len(index)} adapters "
                    f"({', '.join(map(repr, index))}), each under its own name",
                    "Leave adapter_name out, or point at one adapter's folder (out/adapter/<name>)")
            index = {adapter_name: index[active]}
            active = adapter_name
        return load_saved_adapters(model, path, index, active, strict=strict, is_trainable=is_trainable)
    return load_one(model, path, adapter_name=adapter_name, strict=strict, is_trainable=is_trainable)


def adapter_index(manifest: dict) -> tuple[dict, str | None]:
    """``({name: {"method", "dir"}}, active name)`` of a checkpoint's manifest (checkpoints written before qadapt
    saved several adapters name one adapter, in ``adapter/``)."""
    active = (manifest.get("adapter") or {}).get("name")
    index = manifest.get("adapters")
    if index is None and manifest.get("adapter"):
        index = {active: {"method": manifest["adapter"]["method"], "dir": "adapter"}}
    return dict(index or {}), active


def load_saved_adapters(model, checkpoint: str, index: dict, active: str, *, strict: bool, is_trainable: bool):
    """Every adapter of a checkpoint onto ``model``, under its own name, ``active`` active (and trainable with
    ``is_trainable``, the others frozen)."""
    from ..adapters import parameters_of
    from ..rollback import restored_on_failure

    with restored_on_failure(model):  # all of them or none: a failing second adapter takes the first one off again
        peft_model = load_one(model, os.path.join(checkpoint, index[active]["dir"]), adapter_name=active,
                              strict=strict, is_trainable=is_trainable)
        for name, entry in index.items():
            if name != active:
                load_one(peft_model, os.path.join(checkpoint, entry["dir"]), adapter_name=name, strict=strict,
                         is_trainable=False)
    peft_model.set_adapter(active)
    for name in index:  # set_adapter makes the active adapter trainable (peft 0.21): only where asked
        for parameter in parameters_of(peft_model, name):
            parameter.requires_grad_(is_trainable and name == active)
    from ..adapters import freeze_constants

    freeze_constants(peft_model)
    record = get_record(peft_model)
    record.method, record.adapter_name = index[active]["method"], active
    return peft_model


def load_one(model, folder: str, *, adapter_name: str | None, strict: bool, is_trainable: bool):
    """One adapter folder onto ``model`` (a base: a new PeftModel; a PeftModel: one adapter more)."""
    import peft

    from .. import adapters

    record = get_record(model)
    provenance, note = _provenance(folder, record, strict)
    weights = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(weights) or not stat.S_ISREG(os.stat(weights).st_mode):
        raise CheckpointError(f"load adapter {folder!r}", f"it has no {WEIGHTS} (a pickled adapter_model.bin, or none); "
                              "qadapt reads adapter weights from safetensors only",
                              "Save it again with PEFT's save_pretrained (safetensors is its default)")
    try:
        config = peft.PeftConfig.from_pretrained(folder)
    except Exception as exc:
        raise CheckpointError(f"load adapter {folder!r}", f"its adapter_config.json is unreadable "
                              f"({type(exc).__name__}: {exc})", "Save the adapter again") from exc
    method = adapters.method_of(config)
    if provenance is not None and provenance.get("method") not in (None, method):
        raise CheckpointError(f"load adapter {folder!r}", f"{PROVENANCE} says {provenance['method']!r}, "
                              f"adapter_config.json holds a {method!r} adapter", "Save the adapter again")
    backend = backend_of(record)
    if is_trainable:
        support = backend.peft_compatible(method, record.options)
        if not support:
            raise IncompatibleError(f"load the {method!r} adapter {folder!r} to train on backend '{record.backend}'",
                                    support.reason, support.hint)
    growing = isinstance(model, peft.PeftModel)
    name = check_adapter_name(adapter_name or "default", f"load adapter {folder!r}")
    if growing and name in model.peft_config:
        raise InvalidOptionError(f"load adapter {folder!r} as {name!r}", f"the model has an adapter {name!r} already",
                                 "Pass another adapter_name=, or model.delete_adapter(name) first")
    if note is not None:
        warnings.warn(note, stacklevel=4)
    adapters.register_custom_layers(config, backend)
    from ..quiet import known_warnings
    from ..rollback import restored_on_failure

    try:
        with restored_on_failure(model):  # PEFT injects layer by layer: a shape mismatch must not leave half of them
            if method in backend.proxy_methods:
                from ..proxy import wrap

                inner = model.get_base_model() if growing else model
                wrap(inner, adapters.proxy_targets(inner, config.target_modules), backend)
            with adapters.fast_dispatch(backend), adapters.explicit_targets(), known_warnings():
                if growing:
                    config.inference_mode = not is_trainable
                    model.add_adapter(name, config)
                    model.load_adapter(folder, adapter_name=name, is_trainable=is_trainable)
                    peft_model = model
                else:
                    peft_model = peft.PeftModel.from_pretrained(model, folder, adapter_name=name, config=config,
                                                                is_trainable=is_trainable)
    except QadaptError:
        raise
    except Exception as exc:
        raise CheckpointError(f"load adapter {folder!r}", f"PEFT could not load it ({type(exc).__name__}: {exc})",
                              "Check that it was trained on this architecture, or save the adapter again") from exc
    adapters.repair_parameter_wrappers(peft_model)
    for parameter in adapters.parameters_of(peft_model, name):
        parameter.requires_grad_(is_trainable)
    adapters.freeze_constants(peft_model)
    if not growing:
        record.method, record.adapter_name = method, name
    if note is not None:
        record.adapter_notes[name] = note
    else:
        record.adapter_notes.pop(name, None)
    return peft_model


def _provenance(folder: str, record, strict: bool):
    """``(provenance or None, note or None)``: qadapt's record of the base the adapter was trained on, checked
    against ``record``; for an adapter without one, the note saying it could not be checked."""
    provenance_path = os.path.join(folder, PROVENANCE)
    if not os.path.exists(provenance_path):
        if not os.path.exists(os.path.join(folder, "adapter_config.json")):
            raise CheckpointError(f"load adapter {folder!r}", f"it has no {MANIFEST}, {PROVENANCE} or adapter_config.json",
                                  "Point at a folder written by qadapt.save, PEFT's save_pretrained or a Trainer checkpoint")
        return None, _unchecked_note(folder, record)
    provenance = read_provenance(folder)
    differences = _differences(provenance, record)
    if differences:
        message = "the adapter was trained on a base quantized differently: " + "; ".join(differences)
        if strict:
            raise IncompatibleError(f"load adapter {folder!r}", message,
                                    "Load it onto a base quantized like its own, or pass strict=False to load it anyway")
        warnings.warn(message, stacklevel=4)
    elif provenance.get("library_version") != record.library_version and record.backend is not None:
        warnings.warn(f"adapter trained with {record.backend} {provenance.get('library_version')}, base has "
                      f"{record.library_version}", stacklevel=4)
    return provenance, provenance.get("note")


def read_provenance(adapter_dir: str) -> dict:
    """The adapter folder's provenance (``qadapt_adapter.json``), checked: a JSON object naming a known method."""
    from ..capabilities import METHODS

    asked = f"load adapter {adapter_dir!r}"
    try:
        with open(os.path.join(adapter_dir, PROVENANCE), encoding="utf-8") as handle:
            provenance = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(asked, f"{PROVENANCE} is unreadable ({exc})", "Save the adapter again") from exc
    if not isinstance(provenance, dict) or provenance.get("method") not in METHODS \
            or not isinstance(provenance.get("options") or {}, dict) \
            or not isinstance(provenance.get("note") or "", str):
        raise CheckpointError(asked, f"{PROVENANCE} is not qadapt's (no known adapter method)", "Save the adapter again")
    return provenance


def _unchecked_note(folder: str, record) -> str:
    config = read_json(os.path.join(folder, "adapter_config.json")) or {}
    trainer = os.path.exists(os.path.join(folder, "trainer_state.json"))
    kind = "a Trainer checkpoint" if trainer else "a PEFT adapter folder"
    base = f"backend '{record.backend}' with {record.options}" if record.backend else "a full-precision base"
    note = (f"adapter from {kind} ({folder!r}, trained on {config.get('base_model_name_or_path')!r}) without qadapt's "
            f"{PROVENANCE}: qadapt cannot check that it was trained on a base like this one ({base})")
    pickles = [name for name in TRAINER_STATE if os.path.exists(os.path.join(folder, name))]
    if pickles:
        note += (f"; {', '.join(pickles)} (optimizer and scheduler state) are not read: to continue that run, pass "
                 f"resume_from_checkpoint={folder!r} to Trainer.train")
    return note


def _differences(provenance: dict, record) -> list[str]:
    found = []
    if provenance.get("backend") != record.backend:
        found.append(f"backend {provenance.get('backend')!r} (adapter) vs {record.backend!r} (base)")
    # as JSON holds them (a tuple option comes back from qadapt.json as a list)
    saved, current = provenance.get("options") or {}, json.loads(json.dumps(record.options or {}, default=str))
    runtime = _runtime_options(record.backend) if provenance.get("backend") == record.backend else set()
    for key in sorted((set(saved) | set(current)) - runtime):
        if saved.get(key) != current.get(key):
            found.append(f"{key}={saved.get(key)!r} (adapter) vs {current.get(key)!r} (base)")
    return found


def _runtime_options(backend_name) -> set[str]:
    """Names of the options that choose how weights run (kernel, compute dtype), which an adapter does not depend on."""
    try:
        return {option.name for option in get_backend(backend_name).options if option.runtime}
    except QadaptError:  # the backend is not installed here: compare every option
        return set()
