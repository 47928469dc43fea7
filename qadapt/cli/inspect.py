"""``qadapt inspect DIR``: what a folder holds: a qadapt checkpoint (backend, options, adapter, merge, provenance) or
a transformers folder (architecture, quantization), and, loaded, its quantized layers and bits per weight."""

from __future__ import annotations

import json
import os

from . import print_json


def add_parser(commands) -> None:
    verb = commands.add_parser("inspect", help="what a folder or checkpoint holds: backend, options, layers, bits "
                               "per weight, adapters, provenance", description=__doc__.split("\n\n")[0])
    verb.add_argument("folder")
    verb.add_argument("--no-load", action="store_true", help="read the files only (no layer count, no bits per weight)")
    verb.add_argument("--json", action="store_true", help="print the findings as JSON")


def describe_folder(folder: str, load: bool = True) -> dict:
    """The findings ``qadapt inspect`` prints, as a dict."""
    from qadapt.checkpoint import is_checkpoint, read_manifest
    from qadapt.errors import CheckpointError, QadaptError

    if not os.path.isdir(folder):
        raise CheckpointError(f"inspect {folder!r}", "no such folder", "Pass a checkpoint or a transformers folder")
    found: dict = {"folder": folder}
    if is_checkpoint(folder):
        manifest = read_manifest(folder)
        found.update(kind="qadapt checkpoint", backend=manifest["backend"], adapter=manifest.get("adapter"),
                     adapters=manifest.get("adapters"), tokenizer=manifest.get("tokenizer"),
                     merged=manifest.get("merged"), qadapt_version=manifest.get("qadapt_version"),
                     files=len(manifest.get("files", {})))
        provenance = os.path.join(folder, "adapter", "qadapt_adapter.json")
        if os.path.exists(provenance):
            with open(provenance, encoding="utf-8") as handle:
                found["provenance"] = json.load(handle)
    else:
        config = _config(folder)
        quantization = config.get("quantization_config")
        found.update(kind="transformers folder", model_type=config.get("model_type"),
                     architectures=config.get("architectures"),
                     quantization=quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else None)
        if os.path.exists(os.path.join(folder, "adapter_config.json")):
            found["kind"] = "PEFT adapter folder"
        else:
            from qadapt.folders import detect

            try:
                claim = detect(folder)  # the backend whose format it is, as qadapt.load sees it
            except QadaptError as refusal:
                found["note"], claim = str(refusal), None
            if claim is not None:
                found["backend"] = {"name": claim.backend.name, "options": claim.options}
    if load and found["kind"] != "PEFT adapter folder":
        found.update(_loaded(folder, found))
    return found


def _config(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _loaded(folder: str, found: dict) -> dict:
    """Load the folder (as qadapt.load does) and count what is quantized."""
    import torch

    import qadapt
    from qadapt.memory import storage_bytes
    from qadapt.plugins import backend_of
    from qadapt.record import base_model, get_record

    if found["kind"] == "qadapt checkpoint" or found.get("backend"):
        model = qadapt.load(folder)
    elif found.get("quantization") or found.get("note"):
        return {"loaded": False}  # quantized in a format no registered backend reads (the note says why)
    else:
        from qadapt.errors import QadaptError
        from qadapt.hf import load_full_precision
        from qadapt.inputs import check_folder_weights, check_model_folder

        try:  # what qadapt.load refuses to read is described, not loaded
            check_model_folder(folder)
            check_folder_weights(folder)
        except QadaptError as refusal:
            return {"loaded": False, "note": str(refusal)}
        model = load_full_precision(folder, gpu=False)
    backend = backend_of(get_record(model))
    inner = base_model(model)
    quantized = [name for name, module in inner.named_modules() if backend.is_quantized_layer(module)]
    linear = [name for name, module in inner.named_modules() if isinstance(module, torch.nn.Linear)
              and not any(name == q or name.startswith(q + ".") for q in quantized) and not _adapter_part(name, inner)]
    loaded = {"loaded": True, "quantized_layers": len(quantized), "unquantized_linear_layers": linear,
              "weight_bytes": storage_bytes(inner)}
    report = qadapt.load_report(model)  # every matmul weight: quantized, or kept in full precision and why
    if report is not None:
        loaded.update(bits_per_weight=round(report.bits_per_weight, 3), quantized_share=round(report.quantized_share, 4),
                      full_precision={weight.name: f"{weight.status}: {weight.reason}" for weight in report.full_precision})
    return loaded


def _adapter_part(name: str, inner) -> bool:
    """Is ``name`` an adapter's own module (PEFT's lora_A/B, ...), not part of the base?"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(inner.get_submodule(".".join(parts[:i])), BaseTunerLayer) and parts[i] != "base_layer":
            return True
    return False


def run(args) -> int:
    found = describe_folder(args.folder, load=not args.no_load)
    if args.json:
        print_json(found)
        return 0
    print(f"{found['folder']}: {found['kind']}")
    for key, value in found.items():
        if key in ("folder", "kind"):
            continue
        print(f"  {key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")
    return 0
