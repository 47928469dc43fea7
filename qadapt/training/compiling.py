"""Regional compilation: ``torch.compile`` on each decoder layer (PyTorch's recipe for repeated blocks: one layer's
compile time, shared by every identical layer), the rest eager."""

from __future__ import annotations


def layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(patches, found) -> None:
    for _, layer in found:
        layer.compile()
        patches.on_undo(lambda layer=layer: setattr(layer, "_compiled_call_impl", None))
