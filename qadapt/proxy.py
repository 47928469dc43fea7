"""Presenting a quantized layer to PEFT as an ``nn.Linear``, for the adapter methods PEFT has no layer for.

PEFT's VeRA, AdaLoRA and IA3 wrap only the layer classes they know (``nn.Linear`` and bitsandbytes'), and unlike LoRA
they have no hook for custom layers. Their forward passes only call the base layer; they read ``base_layer.weight``
for its shape, dtype and device when attaching. :class:`QuantizedLinearProxy` is an ``nn.Linear`` whose forward runs
the quantized layer unchanged and whose ``weight`` is the de-quantized weight, computed on access. A backend lists
the methods that need it in ``QuantBackend.proxy_methods``; qadapt wraps the targets before attaching and unwraps them
for saving and merging, so checkpoints never contain the proxy.
"""

from __future__ import annotations

import torch

from .hf import replace_module


class QuantizedLinearProxy(torch.nn.Linear):
    def __init__(self, quantized: torch.nn.Module, dequantize, in_features: int, out_features: int) -> None:
        torch.nn.Module.__init__(self)
        self.quantized = quantized
        self.in_features = in_features
        self.out_features = out_features
        self._dequantize = dequantize

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._dequantize(self.quantized).detach()

    @property
    def bias(self):  # type: ignore[override]
        return getattr(self.quantized, "bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantized(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantized={type(self.quantized).__name__}"


def wrap(model, names, backend) -> None:
    """Replace each quantized layer named in ``names`` by a proxy around it."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinearProxy) or not backend.is_quantized_layer(module):
            continue
        out_features, in_features = backend.dequantize(module).shape
        replace_module(model, name, QuantizedLinearProxy(module, backend.dequantize, in_features, out_features))


def unwrap(module):
    return module.quantized if isinstance(module, QuantizedLinearProxy) else module
