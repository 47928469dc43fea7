"""Loading a model too large for one process straight into FSDP2 shards, quantizing on the fly.

Every rank: builds the model on the meta device from its config, with the backend's empty quantized layers
(:meth:`~qadapt.QuantBackend.empty_layer`); attaches the adapter (still nothing allocated); shards it with FSDP2;
allocates only its own shards (``to_empty``); then streams the checkpoint one tensor at a time (safetensors, memory
mapped: the ranks of a host share the page cache) and, for each linear weight, quantizes the whole tensor itself with
the backend (:meth:`~qadapt.QuantBackend.fill_layer`) and keeps its share. Peak memory per rank: its shards plus one
full-precision tensor and its quantized copy.

Why every rank quantizes whole tensors rather than its rows: bitsandbytes' double quantization subtracts the mean of
a tensor's absmax (``bitsandbytes/functional.py``, ``offset = absmax.mean()``), so row slices quantized apart give
other codes than the whole tensor; quantizing the whole tensor is deterministic and needs no communication (measured:
the gathered payload is bit for bit ``qadapt.load``'s, the losses those of one process).
"""

from __future__ import annotations

import json
import os
import zlib

from ..errors import IncompatibleError, InvalidOptionError, ShardingError


def load_sharded(path, backend: str, *, method: str = "lora", target_modules="all-linear", adapter: dict | None = None,
                 mixed_precision=None, reshard_after_forward: bool = True, seed: int = 0, check_payload: bool = True,
                 **options):
    """Load the full-precision folder ``path`` into this rank's FSDP2 shards, quantized with ``backend``, with a
    LoRA adapter attached; returns the sharded ``PeftModel``, verified like :func:`qadapt.distributed.shard`'s.

    Collective: every rank of the run calls it. Checked before any work: the backend and options, the capability
    table (``train_fsdp2``), that the backend builds empty layers, the launch.

    :param adapter: ``qadapt.attach`` options (``r``, ``lora_alpha``, ...).
    :param seed: LoRA's A matrices start from generators seeded by ``seed`` and each parameter's name
        (:func:`deterministic_lora_init`), B at zero: every rank, any world size and a one-process run start equal.
    """
    import torch

    from .. import api
    from ..backend import QuantBackend
    from ..checkpoint import is_checkpoint
    from ..hf import default_device, model_dtype, quiet_transformers, replace_module
    from ..inputs import check_folder_weights, check_model_folder
    from ..plugins import ready_backend
    from ..record import Record, base_model, set_record
    from .launch import check_launch
    from .sharding import shard, verify

    path = os.fspath(path)
    asked = f"load {path!r} into shards with backend '{backend}'"
    quant = ready_backend(backend, asked)
    resolved = quant.validate_options(options)
    if not os.path.isdir(path) or is_checkpoint(path):
        raise InvalidOptionError(asked, "not a transformers folder (qadapt never downloads models)" if not
                                 os.path.isdir(path) else "this is a qadapt checkpoint",
                                 "Pass the full-precision folder the model was made from")
    check_model_folder(path)  # safetensors weights whose files are whole
    prequantized = quant.folder_options(path) is not None
    if not prequantized:
        check_folder_weights(path)  # every weight of the model there, before any rank streams a tensor
    if prequantized or quant.needs_calibration(resolved):
        raise IncompatibleError(asked, "the folder is quantized already" if prequantized else
                                f"'{backend}' needs calibration data to quantize",
                                "Load it whole in each process with qadapt.load, attach, then qadapt.distributed.shard")
    support = quant.capabilities(resolved)[(method, "train_fsdp2")]
    if not support:
        raise IncompatibleError(f"{asked} with a {method!r} adapter", support.reason, support.hint)
    if method != "lora":
        raise IncompatibleError(f"{asked} with a {method!r} adapter", "loading into shards initialises the adapter "
                                "before any weight is there; only LoRA's initialisation needs none (DoRA's magnitude "
                                "is the weight's norm)", "Load with qadapt.load, attach, then qadapt.distributed.shard")
    if type(quant).empty_layer is QuantBackend.empty_layer:
        raise IncompatibleError(asked, f"backend '{backend}' cannot build empty layers to load into",
                                "Load it whole in each process with qadapt.load, attach, then qadapt.distributed.shard")
    check_launch(asked)

    quiet_transformers()
    dtype = model_dtype(path)
    model = _skeleton(path, quant, resolved, dtype, replace_module)
    set_record(model, Record(backend=backend, options=resolved, library_version=quant.library_version(),
                             source=os.path.abspath(path)))
    peft_model = api.attach(model, method, target_modules=target_modules, **(adapter or {}))
    buffers = {name: tensor.clone() for name, tensor in base_model(peft_model).named_buffers()}
    device = torch.device(default_device())
    # the buffers were made on the host at construction (the parameters are on meta): on this rank's device before
    # sharding, which refuses a model with parts elsewhere (their values are put back after to_empty below)
    for module in base_model(peft_model).modules():
        for key, tensor in module._buffers.items():
            if tensor is not None and tensor.device.type != "meta":
                module._buffers[key] = tensor.to(device)
    shard(peft_model, "fsdp2", mixed_precision=mixed_precision, reshard_after_forward=reshard_after_forward,
          check_payload=False)
    peft_model.to_empty(device=device)
    inner = base_model(peft_model)
    with torch.no_grad():
        for name, tensor in inner.named_buffers():
            if name in buffers:
                set_full(tensor, buffers[name].to(device))
        expected = _stream(path, inner, quant, dtype, device)
        deterministic_lora_init(peft_model, seed)
    verify(peft_model, before=expected, check_payload=check_payload)
    return peft_model


def _skeleton(path, quant, options, dtype, replace_module):
    """The model on the meta device (buffers excepted: non-persistent ones such as rotary ``inv_freq`` are computed
    at construction and not in the checkpoint), every linear layer but the output head an empty quantized layer."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head:
            replace_module(model, name, quant.empty_layer(module, options, dtype))
    return model


def _stream(path, inner, quant, dtype, device) -> dict:
    """Fill this rank's shards from the checkpoint, one tensor at a time; returns what the gathered payload must be."""
    from safetensors import safe_open

    from .layers import LayerFacts, TensorFacts, facts, fingerprint

    modules = dict(inner.named_modules())
    params = dict(inner.named_parameters())
    filled, expected = set(), {}
    tied = bool(getattr(inner.config, "tie_word_embeddings", False))
    for file in _safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                module_name, _, leaf = key.rpartition(".")
                module = modules.get(module_name)
                if module is not None and hasattr(module, "base_layer"):  # PEFT's tuner layer: the tensors are its base's
                    module_name, module = f"{module_name}.base_layer", module.base_layer
                if module is not None and quant.is_quantized_layer(module) and leaf == "weight":
                    full = handle.get_tensor(key).to(device=device, dtype=dtype)
                    payload = quant.fill_layer(module, full)
                    del full
                    record = LayerFacts({}, {})
                    for name, tensor in payload.items():
                        set_full(getattr(module, name), tensor)
                        record.payload[name] = TensorFacts(tuple(tensor.shape), str(tensor.dtype),
                                                           tensor.numel() * tensor.element_size(), fingerprint(tensor))
                        filled.add(f"{module_name}.{name}")
                    record.state = {k: facts(v) for k, v in quant.quant_state_tensors(module).items()}
                    expected[module_name] = record
                    continue
                target = f"{module_name}.{leaf}"
                if target in params:
                    set_full(params[target], handle.get_tensor(key).to(device))
                    filled.add(target)
                elif not (tied and key == "lm_head.weight"):
                    raise ShardingError(f"load {path!r} into shards", f"the checkpoint's tensor {key} has no place in "
                                        "the model its config.json describes", "Check that the folder is one model")
    missing = sorted(name for name in params if name not in filled and "lora_" not in name)
    if missing:
        raise ShardingError(f"load {path!r} into shards", f"the checkpoint lacks {len(missing)} tensor(s) of the "
                            f"model (e.g. {missing[0]})", "Check that the folder is one complete model")
    return expected


def _safetensors_files(path) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            return sorted({os.path.join(path, name) for name in json.load(handle)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise InvalidOptionError(f"load {path!r} into shards", "the folder has no safetensors weights",
                                 "qadapt loads safetensors only: convert the checkpoint")
    return [single]


def set_full(target, full) -> None:
    """Write the whole tensor ``full`` into ``target``: a sharded (DTensor) one keeps this rank's share, sliced here
    (``src_data_rank=None``: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        share = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(share.to_local())
    else:
        target.data.copy_(full)


def deterministic_lora_init(model, seed: int = 0) -> None:
    """LoRA's initialisation made independent of the device, the layout and the world size: each ``lora_A`` from a
    generator seeded by ``seed`` and the parameter's name (uniform in +-1/sqrt(fan_in), the distribution of PEFT's
    default Kaiming init), each ``lora_B`` zero (PEFT's default: the adapter starts as the identity)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:
                generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                bound = param.shape[1] ** -0.5
                set_full(param, (torch.rand(tuple(param.shape), generator=generator) * 2 - 1).mul_(bound).to(param.device))
            elif "lora_B" in name:
                set_full(param, torch.zeros(tuple(param.shape), device=param.device))
