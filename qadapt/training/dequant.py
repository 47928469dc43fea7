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
    """A zero-argument function giving ``base``'s weight ``(out, in)`` freshly de-quantized, or None."""
    base = unwrap(base)
    if plain_weight(backend, base):
        return lambda: base.weight
    return backend.training_dequantizer(base)


def why_not(backend, base) -> str:
    base = unwrap(base)
    return (f"backend '{backend.name}' has no training de-quantization route for {type(base).__name__} "
            "(QuantBackend.training_dequantizer returned None)")


def compute_dtype(base, x):
    """The dtype the layer computes in: autocast's where it is on, else the layer's own ``compute_dtype``
    (bitsandbytes 4-bit, HQQ), else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    dtype = getattr(unwrap(base), "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else x.dtype


def run_function(function, x, dtype, *args):
    """``function.apply(x.to(dtype), *args)`` with autocast off inside (the Functions cast explicitly; autocast would
    change the dtype of some of their products and not of the in-place ones), the result back in ``x``'s dtype unless
    autocast is on (then it stays in autocast's dtype, as an autocast matmul's would)."""
    autocast = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False):
        out = function.apply(x.to(dtype), *args)
    return out if autocast else out.to(x.dtype)


class FrozenLinearFn(torch.autograd.Function):
    """``x W^T + b`` for a frozen (quantized) weight, de-quantized in the forward and again in the backward (or kept,
    ``keep_weight``): what bitsandbytes' MatMul4Bit does, for every backend with a route. torchao's int8 linear and
    HQQ's PYTORCH_FORWARD backend keep each de-quantized weight for the backward instead (12 GiB at Llama-3-8B)."""

    @staticmethod
    def forward(ctx, x, deq, bias, keep_weight):
        weight = deq().to(x.dtype)
        ctx.deq, ctx.keep = deq, weight if keep_weight else None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        weight = ctx.keep if ctx.keep is not None else ctx.deq().to(dy.dtype)
        ctx.keep = None
        return (dy @ weight.to(dy.dtype)) if ctx.needs_input_grad[0] else None, None, None, None


def _routed_forward(self, x, *args, **kwargs):
    deq = None if args or kwargs else dequantizer(self._qadapt_backend, self)
    if deq is None or not (torch.is_grad_enabled() and x.requires_grad):
        return type(self).forward(self, x, *args, **kwargs)
    dtype = compute_dtype(self, x)
    bias = getattr(self, "bias", None)
    return run_function(FrozenLinearFn, x, dtype, deq, None if bias is None else bias.to(dtype), self._qadapt_keep_weight)


def route(patches, layer, backend, keep_weight: bool) -> None:
    """Run quantized ``layer`` through :class:`FrozenLinearFn` while training (its own forward otherwise)."""
    patches.set(layer, "_qadapt_backend", backend)
    patches.set(layer, "_qadapt_keep_weight", keep_weight)
    patches.set(layer, "forward", types.MethodType(_routed_forward, layer))
