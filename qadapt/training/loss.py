"""Causal-LM loss without the logits: the output head and cross-entropy in row chunks.

transformers' ``ForCausalLMLoss`` (5.x) upcasts the full ``(tokens, vocab)`` logits to float32 and cross-entropy saves
their log-softmax; the output also holds the bf16 logits, and the backward starts with their fp32 and bf16 gradients:
2.45 GiB at Llama-3-8B (vocab 128,256), 4 x 512 tokens. Here the loss and its gradient w.r.t. the hidden states are
computed in the forward, a chunk of rows at a time, and the logits never exist whole. Implementations, by preference
on CUDA: Liger's fused linear cross-entropy (liger-kernel), Apple's cut-cross-entropy, then qadapt's own chunked torch
Function (:class:`ChunkedLinearCE`, the only one that runs on a CPU). Same semantics as ``ForCausalLMLoss``: labels
shifted by one (or ``shift_labels`` as given), -100 ignored, mean over the counted tokens, or sum over
``num_items_in_batch`` (what Trainer passes under gradient accumulation).

The forward is replaced only where the model's class computes what Llama's ``LlamaForCausalLM.forward`` computes
(:func:`qadapt.training.patching.same_code`: no logit soft-capping or scaling, no router loss), its loss function is
``ForCausalLMLoss`` and its head a frozen bias-free ``nn.Linear``. Calls without labels, without gradients, with
positional arguments, ``return_dict=False`` or TRL's ``fused_lm_head=True`` go to the original forward.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F

from .patching import same_code
from .settings import unusable

IGNORE = -100


class ChunkedLinearCE(torch.autograd.Function):
    """``sum_i CE(h_i W^T, y_i) / divisor``: per chunk of rows the logits are made (in h's dtype, then float32, as
    transformers does), reduced and turned into the gradient w.r.t. h, kept for the backward, then dropped."""

    @staticmethod
    def forward(ctx, h, weight, labels, divisor, chunk):
        grad_h = torch.empty_like(h) if h.requires_grad else None
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], labels[start:start + chunk]
            logits = (hc @ weight.t()).to(torch.promote_types(h.dtype, torch.float32))
            lse = torch.logsumexp(logits, -1)
            valid = yc != IGNORE
            safe = torch.where(valid, yc, 0)
            total += ((lse - logits.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
            if grad_h is not None:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place over the logits
                p.scatter_add_(1, safe[:, None], -torch.ones_like(p[:, :1]))
                p.mul_((valid.float() / divisor)[:, None])
                grad_h[start:start + chunk] = p.to(h.dtype) @ weight
        ctx.save_for_backward(grad_h)
        return total / divisor

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None, None


def auto_chunk(vocab: int, budget: int = 2**28) -> int:
    """Rows per chunk so one chunk's transients (fp32 logits and softmax in place, bf16 copies: ~12 bytes per vocabulary
    entry) stay near ``budget`` (256 MiB): 174 rows at Llama-3's 128,256 entries, 699 at TinyLlama's 32,000."""
    return max(16, budget // (12 * vocab))


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="sum")


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE, reduction="sum", impl="cce")


LIBRARIES = {"liger": ("liger-kernel", _liger), "cce": ("cut-cross-entropy", _cce)}
_PROBED: dict = {}


def _probed(load):
    """The library's loss function once it ran forward and backward on a small CUDA batch here (an import that works
    says nothing about Triton compiling its kernels for this GPU); the failure is raised again on every call."""
    if load not in _PROBED:
        try:
            summed = load()
            h = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            summed(h, torch.randn(128, 64, device="cuda", dtype=torch.bfloat16),
                   torch.randint(0, 128, (16,), device="cuda")).backward()
            _PROBED[load] = summed
        except Exception as exc:  # noqa: BLE001 - kept, so the next call reports the same reason
            _PROBED[load] = exc
    if isinstance(_PROBED[load], Exception):
        raise _PROBED[load]
    return _PROBED[load]


def choose(asked: str, on_cuda: bool):
    """(implementation name, summed-loss function or None for the torch one, notes, fallback reason or "")."""
    notes = []
    order = {"auto": ["liger", "cce"], "liger": ["liger"], "cce": ["cce"], "torch": []}[asked]
    for name in order:
        distribution, load = LIBRARIES[name]
        if not on_cuda:
            notes.append(f"{distribution}: its kernels are Triton, CUDA only (the model is not on a CUDA device)")
            continue
        try:
            return name, _probed(load), notes, ""
        except Exception as exc:  # noqa: BLE001 - not installed, or its kernels do not run here: say which
            notes.append(unusable(distribution, exc))
    fallback = "" if asked in ("auto", "torch") else f"loss={asked!r} cannot run here: {'; '.join(notes)}"
    return "torch", None, notes, fallback


def causal_lm_loss(hidden, weight, labels=None, shift_labels=None, num_items_in_batch=None, summed=None, chunk=1024):
    """transformers' ``ForCausalLMLoss`` over ``hidden @ weight.T`` without the full logits."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    y = shift_labels.reshape(-1).to(hidden.device)
    h = hidden.reshape(-1, hidden.shape[-1])
    divisor = num_items_in_batch if num_items_in_batch is not None else (y != IGNORE).sum()
    divisor = torch.as_tensor(divisor, device=h.device).float().clamp(min=1)
    weight = weight.to(h.dtype)
    if summed is not None:
        return summed(h, weight, y) / divisor
    return ChunkedLinearCE.apply(h, weight, y, divisor, chunk)


def _reference():
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    return LlamaForCausalLM


def trl_fused_head(model) -> bool:
    """Has TRL's SFTTrainer (``trl.trainer.utils.add_fused_lm_head``) already replaced this model's forward?"""
    code = getattr(getattr(model.forward, "__func__", model.forward), "__code__", None)  # functools.wraps hides the name
    return code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename


def eligible(model) -> str:
    from transformers.loss.loss_utils import ForCausalLMLoss

    if not same_code(type(model), _reference()):
        return f"{type(model).__name__}.forward is not Llama's causal-LM forward (logit scaling, soft-capping or an " \
               "extra loss term would be lost)"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return f"its loss function is {getattr(model.loss_function, '__name__', model.loss_function)}, not ForCausalLMLoss"
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"its output head is a {type(head).__name__}{' with a bias' if getattr(head, 'bias', None) is not None else ''}"
    if head.weight.requires_grad:
        return "its output head is trained (the fused loss gives no gradient to the head's weight)"
    if not hasattr(model, model.base_model_prefix):
        return f"no decoder at model.{model.base_model_prefix}"
    return ""


def install(patches, model, report, summed, chunk):
    """Replace ``model.forward`` (the ``*ForCausalLM`` instance) by the chunked-loss one."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    decoder = getattr(model, model.base_model_prefix)
    state = {"inside": False}

    @functools.wraps(type(model).forward)  # the original signature (generate validates its kwargs against it)
    def forward(self, *args, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        passthrough = (labels is None and shift_labels is None) or args or kwargs.get("fused_lm_head") \
            or kwargs.get("return_dict") is False or not torch.is_grad_enabled()
        if passthrough:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return original(*args, **kwargs)
        kwargs.pop("logits_to_keep", None)
        state["inside"] = True
        try:
            out = decoder(**kwargs)
        finally:
            state["inside"] = False
        loss = causal_lm_loss(out.last_hidden_state, model.get_output_embeddings().weight, labels, shift_labels,
                              num_items_in_batch, summed, chunk)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    def watch(module, args, kwargs):
        # a training forward of the decoder that did not come through the chunked loss: say why, once
        if state["inside"] or not (torch.is_grad_enabled() and module.training):
            return
        if trl_fused_head(model):
            report.note_runtime("loss: TRL's fused LM head computes the loss (SFTTrainer), qadapt's chunked loss "
                                "steps aside")
        else:
            report.note_runtime("loss: a training forward without labels (or with positional arguments): the full "
                                "logits were computed and the caller computes the loss")

    handle = decoder.register_forward_pre_hook(watch, with_kwargs=True)
    patches.on_undo(handle.remove)
    patches.set(model, "forward", types.MethodType(forward, model))

