"""An example qadapt backend in one file: int8 weight-only quantization, one absmax scale per output row.

Its layer is a subclass of ``nn.Linear`` whose weight is stored as int8 plus float scales; PEFT's LoRA/VeRA/IA3/...
wrap it like any ``nn.Linear``, because its ``weight`` property de-quantizes on the fly.
"""

from __future__ import annotations

import json
import os

import torch

import qadapt
from qadapt.capabilities import declare, yes
from qadapt.hf import load_config, mark_qadapt_only, replace_module


class RowwiseInt8Linear(torch.nn.Linear):
    """``y = x (q * s)^T + b`` with ``q`` int8 (out, in) and ``s`` float (out, 1)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device="meta", dtype=dtype)
        del self.weight  # the int8 buffers below replace it
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=dtype or torch.float32, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)

    @classmethod
    def from_weight(cls, weight, bias=None):
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=torch.float32)
        scale = weight.detach().float().abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
        layer.qweight.copy_(torch.round(weight.detach().float() / scale).clamp(-127, 127).to(torch.int8))
        layer.scale.copy_(scale)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    @property
    def weight(self):
        return self.qweight.float() * self.scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class RowwiseInt8Backend(qadapt.QuantBackend):
    name = "rowwise-int8"
    summary = "example plugin: int8 weights, one absmax scale per output row (pure torch)"
    requires = ("torch",)
    distribution = "qadapt-rowwise-int8"
    install_hint = "pip install -e examples/qadapt-rowwise-int8"

    def capabilities(self, options):
        wraps = yes("the layer is an nn.Linear subclass, so every PEFT method wraps it")
        return declare(
            train={method: wraps for method in qadapt.METHODS},
            requantize=yes("absmax scales are recomputed for the merged weight"),
            dequantize=yes("q * scale"),
            save=yes("int8 and scales saved with safetensors"),
        )

    def quantize(self, model, options, calibration=None):
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model)
        head = model.get_output_embeddings()
        for name, module in list(model.named_modules()):
            if type(module) is torch.nn.Linear and module is not head:
                replace_module(model, name, RowwiseInt8Linear.from_weight(module.weight, module.bias))
        return model

    def folder_options(self, path):
        # this backend's own layout file says the folder is its format; the format has no options
        return {} if os.path.exists(os.path.join(path, "rowwise_int8.json")) else None

    def save(self, model, path, options):
        from safetensors.torch import save_model

        layers = [n for n, m in model.named_modules() if isinstance(m, RowwiseInt8Linear)]
        model.config.save_pretrained(path)
        save_model(model, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "rowwise_int8.json"), "w") as handle:
            json.dump({"layers": layers}, handle)
        # plain transformers would load qweight/scale as missing weights, i.e. random ones: make it refuse instead
        mark_qadapt_only(path, self.name, "int8 weights with per-row scales (rowwise_int8.json)")

    def load(self, path, options):
        from safetensors.torch import load_model
        from transformers import AutoModelForCausalLM

        with open(os.path.join(path, "rowwise_int8.json")) as handle:
            layers = json.load(handle)["layers"]
        model = AutoModelForCausalLM.from_config(load_config(path))
        for name in layers:
            module = model.get_submodule(name)
            replace_module(model, name, RowwiseInt8Linear(module.in_features, module.out_features,
                                                          bias=module.bias is not None))
        load_model(model, os.path.join(path, "model.safetensors"), strict=False)
        return model.eval()

    def quantized_layer_types(self):
        return (RowwiseInt8Linear,)

    def dequantize(self, module):
        return module.weight.float()

    def requantize(self, module, weight):
        return RowwiseInt8Linear.from_weight(weight, module.bias)


@qadapt.hookimpl
def register_backends(register):
    register(RowwiseInt8Backend())
