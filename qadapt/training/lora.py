"""Fused LoRA: a PEFT LoRA linear layer (base + adapter) as one autograd Function, unsloth's design on PEFT's layers.

PEFT (0.21) keeps adapter weights in float32 and casts each LoRA layer's input to it before ``lora_A``, which saves
that fp32 copy for the backward: q, k and v each save their own (3 x hidden x 4 bytes per token where 1 x hidden x 2
would do), and that is 51 % of everything a Llama-3-8B LoRA step keeps for its backward (9.5 of 18.6 GiB at 4 x 512
tokens, counted on CPU with saved-tensor hooks; qadapt.memory_model). :class:`LoRALinearFn` computes ``x W^T + b + s (x A^T) B^T`` in the layer's
compute dtype, saves only ``x`` (the very tensor its siblings save) and the r-wide ``x A^T``, and de-quantizes ``W``
through the backend's training route in the forward and again in the backward, so no weight-sized tensor lives
across the step. Gradients of A and B come back in the adapter's dtype. The adapter branch runs in the compute dtype
(bfloat16 where the model is), as unsloth's does: about 2e-2 relative from PEFT's fp32 branch in bf16, no further from
an fp32 reference than PEFT's own bf16 path (tests/test_training.py).
"""

from __future__ import annotations

import types

import torch

from .dequant import dequantizer, run_function, why_not
from .norm import stash, unstash


class LoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, scaling, deq, bias, keep_weight):
        in_dtype = x.dtype
        weight = deq(in_dtype)  # in the dtype the layer computes this input in (bitsandbytes' compute_dtype, ...)
        dtype = weight.dtype
        x = x.to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        xa = x2 @ A.to(dtype).t()
        y = torch.addmm(bias.to(dtype), x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(xa, B.to(dtype).t(), alpha=scaling)
        ctx.save_for_backward(xa, A, B, *stash(x))
        ctx.scaling, ctx.deq, ctx.in_dtype = scaling, deq, in_dtype
        ctx.weight = weight if keep_weight else None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xa, A, B, *kept = ctx.saved_tensors
        x = unstash(kept)
        dtype, s = x.dtype, ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        x2 = x.reshape(-1, x.shape[-1])
        dxa = (dy2 @ B.to(dtype)).mul_(s)
        dA = (dxa.t() @ x2).to(A.dtype) if ctx.needs_input_grad[1] else None
        dB = (dy2.t() @ xa).mul_(s).to(B.dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            weight = ctx.weight if ctx.weight is not None else ctx.deq(ctx.in_dtype)
            dx = (dy2 @ weight).addmm_(dxa, A.to(dtype)).view(x.shape)
        ctx.weight = None
        return dx, dA, dB, None, None, None, None


def lora_layers(model):
    """(name, layer) of every PEFT LoRA layer in ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def eligible(layer, backend) -> str:
    """"" if ``layer`` can run on :class:`LoRALinearFn` as it is now, else why not."""
    if not isinstance(getattr(layer, "lora_A", None), torch.nn.ModuleDict) or not hasattr(layer, "in_features"):
        return f"{type(layer).__name__} is not a LoRA linear layer"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters (the fused layer runs one)"
    name = active[0]
    if name not in layer.lora_A:
        return f"adapter {name!r} is not on this layer"
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        variant = getattr(layer, "lora_variant", {}).get(name)
        return f"adapter variant {type(variant).__name__ if variant is not None else 'DoRA'} (PEFT's path runs it)"
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return "lora_dropout > 0 (the fused layer saves the input without dropout)"
    if getattr(layer, "lora_bias", {}).get(name, False):
        return "lora_bias=True"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D-style weight)"
    if not isinstance(layer.lora_A[name], torch.nn.Linear) or not isinstance(layer.lora_B[name], torch.nn.Linear):
        return f"LoRA factors of type {type(layer.lora_A[name]).__name__}"
    base = layer.get_base_layer()
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return "the base layer's bias is trained (PEFT's bias='all' or 'lora_only')"
    if dequantizer(backend, base) is None:
        return why_not(backend, base)
    return ""


def parts(layer):
    """(de-quantizer, A, B, scaling) of a fused layer's active adapter, or None where PEFT's path must run now."""
    if layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in getattr(layer, "lora_variant", {}):
        return None
    deq = dequantizer(layer._qadapt_backend, layer.get_base_layer())
    name = active[0]
    return None if deq is None else (deq, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name])


def _fused_forward(self, x, *args, **kwargs):
    found = None if args or kwargs else parts(self)
    if found is None:  # adapters disabled or merged, another adapter, adapter_names=...: PEFT's own forward
        return type(self).forward(self, x, *args, **kwargs)
    deq, A, B, scaling = found
    bias = getattr(self.get_base_layer(), "bias", None)
    return run_function(LoRALinearFn, x, A, B, scaling, deq, bias, self._qadapt_keep_weight)


def fuse(patches, layer, backend, keep_weight: bool) -> None:
    patches.set(layer, "_qadapt_backend", backend)
    patches.set(layer, "_qadapt_keep_weight", keep_weight)
    patches.set(layer, "forward", types.MethodType(_fused_forward, layer))
