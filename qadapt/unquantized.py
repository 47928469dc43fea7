"""The full-precision "backend": what qadapt uses for a model that no quantization backend loaded.

It is not a plugin (nothing to install, nothing to list): it lets attach, merge and save treat a plain model like any
other, with every capability supported.
"""

from __future__ import annotations

from .backend import QuantBackend
from .capabilities import METHODS, declare, yes


class Unquantized(QuantBackend):
    name = "none"
    summary = "full precision (no quantization)"
    peft_dispatchers = ()  # plain nn.Linear layers: PEFT's default dispatch
    training_route_compiles = True  # compiled with CUDA graphs on the H200 (docs/gpu-runs.md, 2026-12-01)

    def capabilities(self, options):
        return declare(
            train={method: yes("a plain nn.Linear") for method in METHODS},
            requantize=yes("full-precision weights take any merge exactly"),
            dequantize=yes("the weight is already full precision"),
            save=yes("saved with safetensors like any transformers model"),
        )

    def quantize(self, model, options, calibration=None):
        """Nothing to quantize: the model itself (a folder is loaded in full precision)."""
        return self.load(model, options) if isinstance(model, str) else model

    def quantized_layer_types(self):
        return ()

    def dequantize(self, module):
        """``(out, in)``, also for transformers' Conv1D, which stores its weight ``(in, out)``."""
        from .hf import is_conv1d

        weight = module.weight.detach().float()
        return weight.t() if is_conv1d(module) else weight

    def training_dequantizer(self, module):
        return (lambda dtype: module.weight.to(dtype)) if getattr(module, "weight", None) is not None else None

    def requantize(self, module, weight):
        """``module`` with ``weight`` (``(out, in)``) in its own layout and dtype."""
        import torch

        from .hf import clone_module, is_conv1d

        clone = clone_module(module)
        stored = weight.t().contiguous() if is_conv1d(module) else weight
        clone.weight = torch.nn.Parameter(stored.to(module.weight.dtype), requires_grad=False)
        return clone

    def save(self, model, path, options):
        from .hf import save_full_precision

        save_full_precision(model, path)

    def load(self, path, options):
        from .hf import load_full_precision

        return load_full_precision(path)


UNQUANTIZED = Unquantized()
