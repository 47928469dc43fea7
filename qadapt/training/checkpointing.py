"""Gradient checkpointing that works with quantized layers, in two forms, and PEFT's input-gradient hook.

"recompute": transformers' own per-decoder-layer checkpointing with ``torch.utils.checkpoint`` non-reentrant (no
input-gradient hook needed, works with every backend's layers: the recompute runs the same forward, de-quantizing
again). "offload": each decoder layer runs without keeping its activations, its input is copied to pinned host
memory on a side CUDA stream, and the layer is recomputed from that copy in the backward (unsloth's offloaded
gradient checkpointing): only one layer's activations and one hidden-state tensor per layer on the host. Both go
through ``PreTrainedModel._set_gradient_checkpointing`` (transformers 5.4 to 5.23), which hands each
``GradientCheckpointingLayer`` the function that runs it.
"""

from __future__ import annotations

import functools

import torch

_STREAMS: dict = {}


def _side_stream(device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _to_host(hidden):
    """(host copy, event to wait for before reading it): pinned and asynchronous on CUDA, a plain copy elsewhere."""
    if not hidden.is_cuda:
        return hidden.detach().clone(), None
    stream = _side_stream(hidden.device)
    stream.wait_stream(torch.cuda.current_stream(hidden.device))
    host = torch.empty(hidden.shape, dtype=hidden.dtype, device="cpu", pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(hidden.detach(), non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    hidden.record_stream(stream)  # the allocator must not hand its memory out before the copy has read it
    return host, done


def _autocast_state(device_type):
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class OffloadedLayer(torch.autograd.Function):
    """``run(hidden)`` without keeping its activations; ``hidden`` kept on the host; recomputed in the backward with
    the forward's RNG and autocast state (as ``torch.utils.checkpoint`` does)."""

    @staticmethod
    def forward(ctx, run, hidden):
        ctx.run, ctx.device = run, hidden.device
        ctx.stash, ctx.copied = _to_host(hidden)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = _autocast_state(hidden.device.type)
        with torch.no_grad():
            out = run(hidden)
        return out

    @staticmethod
    def backward(ctx, dy):
        if ctx.copied is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
        hidden = ctx.stash.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.stash = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden)
        torch.autograd.backward(out, dy)
        return None, hidden.grad


def offloaded_checkpoint(function, hidden, *args, **kwargs):
    """The checkpoint function transformers calls as ``func(partial(layer.forward, **kwargs), hidden, ...)``."""
    if not torch.is_grad_enabled():
        return function(hidden, *args, **kwargs)
    run = functools.partial(_first, function, args, kwargs)
    if not hidden.requires_grad:  # layer 0 reads the frozen embeddings: the Function needs a differentiable input
        hidden = hidden.detach().requires_grad_(True)
    out = OffloadedLayer.apply(run, hidden)
    return out


def _first(function, args, kwargs, hidden):
    out = function(hidden, *args, **kwargs)
    if isinstance(out, tuple):  # transformers < 5 layers returned tuples; only the hidden state carries gradients
        if any(isinstance(o, torch.Tensor) and o.requires_grad for o in out[1:]):
            raise RuntimeError("offloaded checkpointing keeps only a layer's first output")
        return out[0]
    return out


def recompute_checkpoint():
    from torch.utils.checkpoint import checkpoint

    return functools.partial(checkpoint, use_reentrant=False)


def supports(model) -> str:
    if not getattr(model, "supports_gradient_checkpointing", False):
        return f"{type(model).__name__} does not support gradient checkpointing (supports_gradient_checkpointing=False)"
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not any(isinstance(m, GradientCheckpointingLayer) for m in model.modules()):
        return "no GradientCheckpointingLayer in the model (its layers are not checkpointed by transformers)"
    return ""


def chosen_layers(layers, count=None):
    """The names of ``count`` of the decoder ``layers`` (name, module), spread evenly; all of them for None."""
    names = [name for name, _ in layers]
    if count is None or count >= len(names):
        return names
    return [names[(i * len(names)) // count] for i in range(count)]


def enable(patches, model, mode: str, names=None) -> int:
    """Checkpoint the decoder layers of ``model`` (a ``PreTrainedModel``) named in ``names`` (None: every one)
    eagerly, through transformers' own hook; the number of layers checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    function = recompute_checkpoint() if mode == "recompute" else offloaded_checkpoint
    model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)
    # transformers 5.23 renamed it (the old name warns); 5.4-5.17 have only the old one
    patches.on_undo(getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)
    if names is not None:
        for name, module in model.named_modules():
            if isinstance(module, GradientCheckpointingLayer) and name not in names:
                module.gradient_checkpointing = False
    return sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing for m in model.modules())


def input_grads(patches, model) -> None:
    """PEFT's convention: the input embeddings' output requires grad (reentrant checkpointing needs it)."""
    model.enable_input_require_grads()
    patches.on_undo(model.disable_input_require_grads)


