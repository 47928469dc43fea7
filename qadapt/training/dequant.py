"""Where a layer's weight comes from during training: the backend's training route (``QuantBackend.
training_dequantizer``), or the weight itself for a full-precision ``nn.Linear``; and the frozen-layer Function that
uses it for quantized layers without a fused adapter."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from ..proxy import unwrap


def plain_weight(backend, base) -> bool:
    """A full-precision ``nn.Linear`` (not one of the backend's layers, its weight a Parameter holding a plain floating
    tensor): nothing to de-quantize."""
    weight = base.__dict__.get("_parameters", {}).get("weight")
    return (isinstance(base, torch.nn.Linear) and isinstance(weight, torch.nn.Parameter)
            and type(weight.data) is torch.Tensor and weight.dtype.is_floating_point
            and not backend.is_quantized_layer(base))


def dequantizer(backend, base):
    """``weight(dtype)``: ``base``'s weight ``(out, in)`` freshly de-quantized, in the dtype the layer computes an
    input of ``dtype`` in (``QuantBackend.training_dequantizer``); or None."""
    base = unwrap(base)
    if plain_weight(backend, base):
        return lambda dtype: base.weight.to(dtype)
    return backend.training_dequantizer(base)


def why_not(backend, base) -> str:
    base = unwrap(base)
    return (f"backend '{backend.name}' has no training de-quantization route for {type(base).__name__} "
            "(QuantBackend.training_dequantizer returned None)")


def run_function(function, x, *args):
    """``function.apply(x, *args)`` with autocast off inside: the Functions compute in the dtype of the weight the
    backend's route gives for the input's dtype (autocast's dtype where autocast is on: the input is cast to it first),
    and cast explicitly; autocast would change the dtype of some of their products and not of the in-place ones. The
    result comes back in ``x``'s dtype, or in autocast's where it is on (as an autocast matmul's would)."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False):
        out = function.apply(x.to(torch.get_autocast_dtype(device)) if autocast else x, *args)
    return out if autocast else out.to(x.dtype)


class FrozenLinearFn(torch.autograd.Function):
    """``x W^T + b`` for a frozen (quantized) weight, de-quantized in the forward and again in the backward (or kept,
    ``keep_weight``): what bitsandbytes' MatMul4Bit does, for every backend with a route. torchao's int8 linear and
    HQQ's PYTORCH_FORWARD backend keep each de-quantized weight for the backward instead (12 GiB at Llama-3-8B)."""

    @staticmethod
    def forward(ctx, x, deq, bias, keep_weight):
        weight = deq(x.dtype)
        ctx.deq, ctx.in_dtype, ctx.keep = deq, x.dtype, weight if keep_weight else None
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))

    @staticmethod
    def backward(ctx, dy):
        weight = ctx.keep if ctx.keep is not None else ctx.deq(ctx.in_dtype)
        ctx.keep = None  # (autograd casts the gradient back to the input's dtype)
        return (dy.to(weight.dtype) @ weight) if ctx.needs_input_grad[0] else None, None, None, None


def _routed_forward(self, x, *args, **kwargs):
    deq = None if args or kwargs else dequantizer(self._qadapt_backend, self)
    if deq is None or not (torch.is_grad_enabled() and x.requires_grad):
        return type(self).forward(self, x, *args, **kwargs)
    return run_function(FrozenLinearFn, x, deq, getattr(self, "bias", None), self._qadapt_keep_weight)


def route(patches, layer, backend, keep_weight: bool) -> None:
    """Run quantized ``layer`` through :class:`FrozenLinearFn` while training (its own forward otherwise)."""
    patches.set(layer, "_qadapt_backend", backend)
    patches.set(layer, "_qadapt_keep_weight", keep_weight)
    patches.set(layer, "forward", types.MethodType(_routed_forward, layer))
