"""PEFT's kbit-training dtypes and freezing, for every backend.

``peft.prepare_model_for_kbit_training`` (0.21) freezes every parameter and, for bitsandbytes models only, casts
every float16/bfloat16 parameter that is not a packed 4-bit weight to float32 (norms, embeddings, the output head),
for fp16 training without fp32 master weights. qadapt does the same for every backend, on every parameter that is not
inside one of the backend's quantized layers: "auto" only where the model is float16 (bfloat16 has float32's range,
and a float32 head would make the logits matmul float32: 2 GiB more weights and a slower head at Llama-3-8B),
"all" for every half-precision model (PEFT's behaviour), "none" never.
"""

from __future__ import annotations

import torch

from ..proxy import unwrap


def _inside_quantized(model, backend):
    names = set()
    for name, module in model.named_modules():
        if backend.is_quantized_layer(unwrap(module)):
            names.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters())
    return names


def to_upcast(model, backend, setting: str, adapter: bool) -> list:
    """(name, parameter) to cast to float32 for ``setting`` (with an ``adapter``, its trainable parameters excepted)."""
    if setting == "none":
        return []
    halves = (torch.float16,) if setting == "auto" else (torch.float16, torch.bfloat16)
    skip = _inside_quantized(model, backend)
    found, seen = [], set()
    for name, param in model.named_parameters():
        if param.dtype in halves and type(param).__name__ != "Params4bit" and name not in skip \
                and not (adapter and param.requires_grad) and id(param) not in seen:
            seen.add(id(param))
            found.append((name, param))
    return found


def upcast(patches, params) -> None:
    for _, param in params:
        old = param.data.dtype
        param.data = param.data.to(torch.float32)
        patches.on_undo(lambda param=param, old=old: setattr(param, "data", param.data.to(old)))


def freeze(patches, model) -> int:
    """Freeze every parameter (a model without an adapter: PEFT's kbit preparation does this); how many were trainable."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
        patches.on_undo(lambda param=param: param.requires_grad_(True))
    return len(trainable)
