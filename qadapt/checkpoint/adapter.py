"""Loading a saved adapter onto a base, checking that the base is quantized like the one it was trained on."""

from __future__ import annotations

import json
import os
import warnings

from ..errors import CheckpointError, IncompatibleError, QadaptError
from ..plugins import backend_of, get_backend
from ..record import get_record
from .manifest import PROVENANCE


def load_adapter(model, adapter_dir: str, *, strict: bool = True, is_trainable: bool = False):
    import peft

    from .. import adapters

    from ..rollback import restored_on_failure

    record = get_record(model)
    provenance = read_provenance(adapter_dir)
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
    try:
        config = peft.PeftConfig.from_pretrained(adapter_dir)
    except Exception as exc:
        raise CheckpointError(f"load adapter {adapter_dir!r}", f"its adapter_config.json is unreadable "
                              f"({type(exc).__name__}: {exc})", "Save the adapter again") from exc
    adapters.register_custom_layers(config, backend)
    from ..quiet import known_warnings

    try:
        with restored_on_failure(model):  # PEFT injects layer by layer: a shape mismatch must not leave half of them
            if provenance["method"] in backend.proxy_methods:
                from ..proxy import wrap

                wrap(model, adapters.proxy_targets(model, config.target_modules), backend)
            with adapters.fast_dispatch(backend), adapters.explicit_targets(), known_warnings():
                peft_model = peft.PeftModel.from_pretrained(model, adapter_dir, config=config, is_trainable=is_trainable)
    except QadaptError:
        raise
    except Exception as exc:
        raise CheckpointError(f"load adapter {adapter_dir!r}", f"PEFT could not load it ({type(exc).__name__}: {exc})",
                              "Save the adapter again") from exc
    adapters.repair_parameter_wrappers(peft_model)
    adapters.freeze_constants(peft_model)
    record.method = provenance["method"]
    return peft_model


def read_provenance(adapter_dir: str) -> dict:
    """The adapter folder's provenance, checked: a JSON object naming a known method, beside safetensors weights (PEFT
    would fall back to unpickling ``adapter_model.bin``, or to the hub, without them)."""
    import stat

    from ..capabilities import METHODS

    asked = f"load adapter {adapter_dir!r}"
    provenance_path = os.path.join(adapter_dir, PROVENANCE)
    if not os.path.exists(provenance_path):
        raise CheckpointError(asked, f"{PROVENANCE} is missing", "Point at an adapter saved by qadapt.save")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights) or not stat.S_ISREG(os.stat(weights).st_mode):
        raise CheckpointError(asked, "adapter_model.safetensors is missing (qadapt loads adapter weights with "
                              "safetensors only)", "Save the adapter again with qadapt.save")
    try:
        with open(provenance_path, encoding="utf-8") as handle:
            provenance = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(asked, f"{PROVENANCE} is unreadable ({exc})", "Save the adapter again") from exc
    if not isinstance(provenance, dict) or provenance.get("method") not in METHODS \
            or not isinstance(provenance.get("options") or {}, dict):
        raise CheckpointError(asked, f"{PROVENANCE} is not qadapt's (no known adapter method)", "Save the adapter again")
    return provenance


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
    try:
        return {option.name for option in get_backend(backend_name).options if option.runtime}
    except QadaptError:  # the backend is not installed here: compare every option
        return set()
