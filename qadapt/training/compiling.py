"""Regional compilation: ``torch.compile`` on each decoder layer (PyTorch's recipe for repeated blocks: one layer's
compile time, shared by every identical layer), the rest eager; optionally with CUDA graphs (mode
``"reduce-overhead"``), which replay each layer's kernels without the host launching them one by one."""

from __future__ import annotations

import functools


def layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(patches, found, graphs: bool = False, transformers_checkpoints: bool = True) -> None:
    """What ``Module.compile`` does, with ``fullgraph=True`` (a graph break inside qadapt's fused Functions ran them
    half traced and gave wrongly shaped outputs: H200, torch 2.11, Liger's kernels inside; a break is now an error at
    the first step) and without common-subexpression elimination of the joint graph (see :func:`_without_cse`).
    ``transformers_checkpoints=False``: qadapt's recorded graphs take over the layers' checkpointing (their
    ``gradient_checkpointing`` flag is turned off), so the whole call is compiled even where the flag is on now."""
    import torch

    for _, layer in found:
        if transformers_checkpoints and _checkpoints_in_forward(layer):
            _compile_inside_checkpoint(patches, layer, graphs)
            continue
        compiled = torch.compile(layer._call_impl, fullgraph=True, mode="reduce-overhead" if graphs else None)
        layer._compiled_call_impl = functools.partial(_without_cse, compiled)
        patches.on_undo(lambda layer=layer: setattr(layer, "_compiled_call_impl", None))


def _checkpoints_in_forward(layer) -> bool:
    """Does transformers checkpoint this layer inside its ``forward`` (transformers 5.23; 5.17 did it in
    ``__call__``)? Then a compiled call would trace qadapt's checkpoint Functions, which dynamo cannot
    ("Attempted to call function marked as skipped": ``torch.get_rng_state``)."""
    return bool(layer.__dict__.get("gradient_checkpointing")) and \
        getattr(getattr(type(layer).forward, "__code__", None), "co_name", "") == "forward_with_checkpointing"


def _compile_inside_checkpoint(patches, layer, graphs: bool) -> None:
    """Compile the layer's own forward and run it inside its checkpoint: transformers hands the checkpoint function
    ``partial(forward, layer, **kwargs)``, whose ``forward`` becomes the compiled one (as under transformers 5.17,
    where the checkpoint wrapped the compiled call). Evaluation forwards (not checkpointed) stay eager."""
    import torch

    original = type(layer).forward.__wrapped__
    compiled = torch.compile(original, fullgraph=True, mode="reduce-overhead" if graphs else None)
    checkpoint = layer._gradient_checkpointing_func

    def through_compiled(function, *args, **kwargs):
        if isinstance(function, functools.partial) and function.func is original:
            function = functools.partial(_without_cse, compiled, *function.args, **function.keywords)
        return checkpoint(function, *args, **kwargs)

    patches.set(layer, "_gradient_checkpointing_func", through_compiled)


def _without_cse(compiled, *args, **kwargs):
    """Run ``compiled`` with AOT autograd's CSE off while it compiles: a fused Function de-quantizes its weight in the
    forward and again in the backward; CSE makes the two one node, which the partitioner then saves for the backward
    (a custom op is not recomputed): every de-quantized weight kept, 25.8 GiB instead of 12.8 at Llama-3-8B (H200,
    2026-12-01). Without CSE the backward's de-quantization stays in the backward."""
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    with functorch_config.patch(cse=False), dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT):
        return compiled(*args, **kwargs)


#: Every compiled decoder layer of every prepared model in a process shares one code object, and each variant (model,
#: backend, dtype, whether the layer's input requires grad, training or evaluation) is one more entry of its cache;
#: dynamo's default limit is 8, and with ``fullgraph=True`` the ninth is a hard error at that forward (seen on the
#: H200: the seventh compiled model of one pytest process failed with "Dynamo recompile limit exceeded").
RECOMPILE_LIMIT = 256
