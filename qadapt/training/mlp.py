"""Fused SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` with LoRA on all three projections as one autograd Function
(unsloth's ``LoRA_MLP``).

transformers' Llama MLP under PEFT saves four intermediate-wide tensors per layer for the backward (gate's output for
SiLU, SiLU's output and up's output for the product, and down_proj's LoRA copy of the product): 5.25 GiB at
Llama-3-8B, 4 x 512 tokens. :class:`LoRASwiGLUFn` keeps ``x``, ``e = gate(x)`` and ``g = up(x)`` and recomputes
``h = silu(e) * g`` in the backward (3.5 GiB less at 8B). With ``recompute`` (``prepare(mlp="recompute")``) it
keeps only ``x`` and recomputes ``e`` and ``g`` too, from the weights the backward de-quantizes anyway (two more
matmuls a layer; 3.2 GiB less again at 8B, H200). On CUDA with liger-kernel installed, the backward's elementwise
part is Liger's SwiGLU kernels (in place over ``e`` and ``g``); elsewhere, and inside a compiled layer, plain torch
in float32.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from .dequant import run_function
from .lora import parts
from .norm import stash, unstash
from .patching import same_code
from .settings import unusable

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _matmul_lora(x2, weight, A, B, s):
    dtype = x2.dtype
    return (x2 @ weight.to(dtype).t()).addmm_(x2 @ A.to(dtype).t(), B.to(dtype).t(), alpha=s)


@functools.lru_cache(maxsize=None)
def liger_swiglu():
    """((Liger's SwiGLU forward, backward), "") once they ran on a small CUDA tensor here, else (None, why): the
    torch path."""
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward

        e, g = (torch.randn(2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        swiglu_backward(e, g, swiglu_forward(e.clone(), g.clone())[2])
    except Exception as exc:  # noqa: BLE001 - not installed, no CUDA, or Triton cannot compile it here
        return None, unusable("liger-kernel's SwiGLU", exc)
    return (swiglu_forward, swiglu_backward), ""


class LoRASwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gA, gB, uA, uB, dA, dB, routes, recompute=False):
        (gdeq, gs), (udeq, us), (ddeq, ds) = routes
        in_dtype = x.dtype
        weight = gdeq(in_dtype)  # the gate's compute dtype is the Function's
        x = x.to(weight.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        e = _matmul_lora(x2, weight, gA, gB, gs)
        g = _matmul_lora(x2, udeq(in_dtype), uA, uB, us)
        y = _matmul_lora(F.silu(e) * g, ddeq(in_dtype), dA, dB, ds)
        ctx.save_for_backward(*(() if recompute else (e, g)), gA, gB, uA, uB, dA, dB, *stash(x))
        ctx.routes, ctx.in_dtype, ctx.recompute = routes, in_dtype, recompute
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        if not ctx.recompute:
            e, g, saved = saved[0], saved[1], saved[2:]
        gA, gB, uA, uB, dA, dB, *kept = saved
        x = unstash(kept)
        (gdeq, gs), (udeq, us), (ddeq, ds) = ctx.routes
        dtype = x.dtype
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]).to(dtype)
        weights = {}  # recomputing: the gate's and up's weights, de-quantized once for e, g and dx
        if ctx.recompute:
            weights = {"g": gdeq(ctx.in_dtype), "u": udeq(ctx.in_dtype)}
            e = _matmul_lora(x2, weights["g"], gA, gB, gs)
            g = _matmul_lora(x2, weights["u"], uA, uB, us)
        # Liger's kernels in eager mode; compiled, the torch arithmetic below (inductor fuses it; dynamo does not
        # trace Liger's launcher)
        liger = liger_swiglu()[0] if e.is_cuda and not torch.compiler.is_compiling() else None
        acc = torch.promote_types(dtype, torch.float32)  # half precision in float32, float64 as it is
        if liger is not None:
            h = liger[0](e, g)[2]
        else:
            ef = e.to(acc)
            sig = torch.sigmoid(ef)
            silu = ef * sig
            h = (silu * g.to(acc)).to(dtype)
        grads = {}
        dhA = (dy2 @ dB.to(dtype)).mul_(ds)
        grads["dA"] = (dhA.t() @ h).to(dA.dtype)
        grads["dB"] = (dy2.t() @ (h @ dA.to(dtype).t())).mul_(ds).to(dB.dtype)
        del h
        dh = (dy2 @ ddeq(ctx.in_dtype).to(dtype)).addmm_(dhA, dA.to(dtype))
        if liger is not None:
            de, dg = liger[1](e, g, dh)  # in place over e and g: they are needed no more
        else:
            dhf = dh.to(acc)
            dg = (dhf * silu).to(dtype)
            de = (dhf * g.to(acc) * sig * (1 + ef * (1 - sig))).to(dtype)
            del sig, silu, dhf, ef
        dx = None
        for dz, A, B, s, deq, key in ((dg, uA, uB, us, udeq, "u"), (de, gA, gB, gs, gdeq, "g")):
            dzA = (dz @ B.to(dtype)).mul_(s)
            grads[key + "A"] = (dzA.t() @ x2).to(A.dtype)
            grads[key + "B"] = (dz.t() @ (x2 @ A.to(dtype).t())).mul_(s).to(B.dtype)
            weight = weights.pop(key) if key in weights else deq(ctx.in_dtype)
            part = (dz @ weight.to(dtype)).addmm_(dzA, A.to(dtype))
            del weight
            dx = part if dx is None else dx.add_(part)
        return (dx.view(x.shape), grads["gA"], grads["gB"], grads["uA"], grads["uB"], grads["dA"], grads["dB"], None,
                None)


def _reference():
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP


def is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def candidates(model):
    """(name, module) of every module with gate/up/down projections and an activation (SwiGLU-shaped)."""
    return [(n, m) for n, m in model.named_modules() if all(hasattr(m, p) for p in PROJECTIONS) and hasattr(m, "act_fn")]


def eligible(module, fused: set) -> str:
    """"" if ``module`` can run on :class:`LoRASwiGLUFn` (its projections among the ``fused`` LoRA layers)."""
    if not same_code(type(module), _reference()):
        return f"{type(module).__name__}.forward is not Llama's SwiGLU MLP forward"
    if not is_silu(module.act_fn):
        return f"activation {type(module.act_fn).__name__}, not SiLU"
    if not all(getattr(module, p) in fused for p in PROJECTIONS):
        return "not all of gate/up/down_proj are fused LoRA layers"
    if any(getattr(getattr(module, p).get_base_layer(), "bias", None) is not None for p in PROJECTIONS):
        return "a projection has a bias"
    return ""


def _mlp_forward(self, x):
    found = [parts(getattr(self, p)) if hasattr(getattr(self, p), "_qadapt_backend") else None for p in PROJECTIONS]
    if not torch.is_grad_enabled() or any(f is None for f in found):
        return type(self).forward(self, x)  # inference, or a projection merged / disabled / swapped: the plain MLP
    (gd, gA, gB, gs), (ud, uA, uB, us), (dd, dA, dB, ds) = found
    return run_function(LoRASwiGLUFn, x, gA, gB, uA, uB, dA, dB, ((gd, gs), (ud, us), (dd, ds)),
                        self._qadapt_mlp_recompute)


def fuse(patches, module, recompute: bool = False) -> None:
    """``module``'s forward as :class:`LoRASwiGLUFn`, gate and up kept for the backward or (``recompute``) not."""
    patches.set(module, "_qadapt_mlp_recompute", recompute)
    patches.set(module, "forward", types.MethodType(_mlp_forward, module))
