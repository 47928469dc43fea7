"""Lean RMSNorm: transformers' Llama RMSNorm arithmetic, keeping its input in the model dtype for the backward.

``LlamaRMSNorm.forward`` (transformers 5.x) upcasts its input to float32 and autograd saves that copy and the
normalised fp32 product: 4 bytes per element where the bf16 input (2 bytes) and one fp32 ``rstd`` per row would do
(1.5 GiB of Llama-3-8B's saved tensors at 4 x 512 tokens). :class:`RMSNormFn` computes the same values and saves
``x`` and ``rstd``. On CUDA, with liger-kernel installed, Liger's RMSNorm kernel (casting mode "llama", not in place:
the gradient it would overwrite also flows down the residual branch) does the same in one kernel each way.
"""

from __future__ import annotations

import functools
import types

import torch

from .patching import same_code
from .settings import unusable


class RMSNormFn(torch.autograd.Function):
    """``recomputable``: the fused Functions that read this output (q/k/v, the SwiGLU MLP) keep this norm's input, rstd
    and weight (kept here anyway) instead of the output, and recompute it in their backward: one hidden-wide tensor
    less per norm (1.0 GiB at Llama-3-8B, 4 x 512 tokens). Only without checkpointing: under checkpointing the saved
    tensors must not be read during the forward."""

    @staticmethod
    def forward(ctx, x, weight, eps, recomputable=False):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 for half precision, as transformers does
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        ctx.qadapt_recomputable = recomputable
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        acc = rstd.dtype
        xhat = x.to(acc) * rstd
        gw = (dy * weight).to(acc)  # the gradient of the product, then through the cast to x's dtype
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.to(acc) * xhat.to(x.dtype).to(acc)).sum(tuple(range(dy.dim() - 1))).to(weight.dtype)
        return dx.to(x.dtype), dw, None, None


def stash(x) -> tuple:
    """What a Function saves for its input ``x``: ``(x,)``, or where ``x`` is a recomputable lean norm's output, that
    norm's ``(input, rstd, weight)`` (already kept by the norm: nothing more is kept). Under ``torch.compile`` (which
    cannot read ``grad_fn``) always ``(x,)``: ``prepare`` does not combine ``norm="recompute"`` with compilation."""
    if torch.compiler.is_compiling():
        return (x,)
    node = x.grad_fn
    if node is not None and getattr(node, "qadapt_recomputable", False):
        return tuple(node.saved_tensors)
    return (x,)


def unstash(saved):
    """The input :func:`stash` kept, recomputed with the norm's own arithmetic where it was a norm's output."""
    if len(saved) == 1:
        return saved[0]
    x, rstd, weight = saved
    return weight * (x.to(rstd.dtype) * rstd).to(x.dtype)


@functools.lru_cache(maxsize=None)
def liger_rms_norm():
    """(Liger's RMSNorm function, "") once it ran forward and backward on a small CUDA tensor here, else (None, why):
    an import that works says nothing about Triton compiling its kernel for this GPU and Triton version."""
    try:
        from liger_kernel.transformers.functional import liger_rms_norm as function

        x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        function(x, torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-6, 0.0, "llama", False).sum().backward()
    except Exception as exc:  # noqa: BLE001 - any failure means the torch path, and the report says which
        return None, unusable("liger-kernel's RMSNorm", exc)
    return function, ""


def _reference():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm


def candidates(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]


def eligible(module) -> str:
    if not same_code(type(module), _reference()):
        return f"{type(module).__name__}.forward is not Llama's RMSNorm forward"
    if getattr(module, "weight", None) is None or module.weight.dim() != 1:
        return "no 1-d weight"
    return ""


def _torch_forward(self, x):
    return RMSNormFn.apply(x, self.weight, self.variance_epsilon, self._qadapt_recomputable)


def _liger_forward(self, x):
    if not x.is_cuda:
        return RMSNormFn.apply(x, self.weight, self.variance_epsilon)
    return self._qadapt_liger(x, self.weight, self.variance_epsilon, 0.0, "llama", False)


def lean(patches, module, liger=None, recomputable=False) -> None:
    if liger is not None:
        patches.set(module, "_qadapt_liger", liger)
        patches.set(module, "forward", types.MethodType(_liger_forward, module))
    else:
        patches.set(module, "_qadapt_recomputable", recomputable)
        patches.set(module, "forward", types.MethodType(_torch_forward, module))
