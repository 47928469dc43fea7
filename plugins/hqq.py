"""HQQ: half-quadratic quantization, calibration-free, 1-8 bits with grouped scales and zeros.

Drives hqq's own API: transformers' ``HqqConfig`` path raises "not available yet" in transformers 5.x. Each
``nn.Linear`` (``lm_head`` excepted) becomes ``hqq.core.quantize.HQQLinear``. HQQ's state dict is all tensors, so the
quantized base saves as one safetensors file beside the model's ``config.json``.
"""

from __future__ import annotations

import json
import os

from qadapt.backend import Option, QuantBackend
from qadapt.capabilities import declare, yes
from qadapt.hookspecs import hookimpl

LAYOUT_FILE = "hqq_layers.json"
WEIGHTS_FILE = "model.safetensors"
THROUGH_PROXY = "PEFT has no HQQ layer for {}: qadapt presents HQQLinear as nn.Linear (forward unchanged)"


class HQQBackend(QuantBackend):
    name = "hqq"
    summary = "HQQ half-quadratic quantization (1-8 bits, no calibration)"
    requires = ("hqq.core.quantize",)
    distribution = "hqq"
    install_hint = "pip install 'qadapt[hqq]'"
    proxy_methods = ("vera", "adalora", "ia3")
    options = (
        Option("bits", 4, "bits per weight", choices=(1, 2, 3, 4, 8)),
        Option("group_size", 64, "weights sharing one scale and zero", choices=(16, 32, 64, 128, 256)),
        Option("compute_dtype", "float32", "dtype of the de-quantized matmul", choices=("float32", "bfloat16", "float16")),
    )

    def capabilities(self, options):
        return declare(
            train={
                "lora": yes("PEFT's HqqLoraLinear"),
                "dora": yes("PEFT's HqqLoraLinear with use_dora"),
                "vera": yes(THROUGH_PROXY.format("VeRA")),
                "adalora": yes(THROUGH_PROXY.format("AdaLoRA")),
                "ia3": yes(THROUGH_PROXY.format("IA3")),
            },
            requantize=yes("HQQ re-quantizes the merged weight with the same bits and group size"),
            dequantize=yes("HQQLinear.dequantize()"),
            save=yes("HQQ's state dict is plain tensors, saved with safetensors"),
        )

    # ------------------------------------------------------------------ heavy work
    def _quant_config(self, options):
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=options["bits"], group_size=options["group_size"])

    def quantize(self, model, options, calibration=None):
        import torch

        if isinstance(model, str):
            model = _load_full(model)
        quant_config = self._quant_config(options)
        compute_dtype = getattr(torch, options["compute_dtype"])
        device = _device()
        for name, module in _linear_layers(model):
            _replace(model, name, self._make(module, quant_config, compute_dtype, device))
        return model.to(device) if device != "cpu" else model

    def _make(self, linear, quant_config, compute_dtype, device):
        from hqq.core.quantize import HQQLinear

        # del_orig frees the full-precision weight as each layer is quantized (an in-memory model is converted in place).
        return HQQLinear(linear, quant_config=quant_config, compute_dtype=compute_dtype, device=device, del_orig=True)

    def save(self, model, path, options):
        from safetensors.torch import save_file

        from hqq.core.quantize import HQQLinear

        layers = [name for name, module in model.named_modules() if isinstance(module, HQQLinear)]
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        model.config.save_pretrained(path)
        save_file(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt", "qadapt_backend": "hqq"})
        with open(os.path.join(path, LAYOUT_FILE), "w") as handle:
            json.dump({"layers": layers, "options": options}, handle, indent=2)

    def load(self, path, options):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        from hqq.core.quantize import HQQLinear

        with open(os.path.join(path, LAYOUT_FILE)) as handle:
            layout = json.load(handle)
        options = {**options, **layout.get("options", {})}
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
        state = load_file(os.path.join(path, WEIGHTS_FILE))
        compute_dtype = getattr(torch, options["compute_dtype"])
        device = _device()
        for name in layout["layers"]:
            layer = HQQLinear(None, quant_config=self._quant_config(options), compute_dtype=compute_dtype, device=device)
            prefix = name + "."
            layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            _replace(model, name, layer)
        rest = {k: v for k, v in state.items() if not any(k.startswith(n + ".") for n in layout["layers"])}
        missing, unexpected = model.load_state_dict(rest, strict=False)[:2]
        missing = [k for k in missing if not any(k.startswith(n + ".") for n in layout["layers"])]
        if missing or unexpected:
            raise ValueError(f"HQQ checkpoint does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return model.eval()

    def is_quantized_checkpoint(self, path):
        return os.path.exists(os.path.join(path, LAYOUT_FILE))

    def quantized_layer_types(self):
        from hqq.core.quantize import HQQLinear

        return (HQQLinear,)

    def dequantize(self, module):
        return module.dequantize().float()

    def requantize(self, module, weight):
        import torch

        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        # HQQLinear consumes its quant_config dict; rebuild it from the layer's own metadata.
        quant_config = self._quant_config({"bits": int(module.meta["nbits"]), "group_size": int(module.meta["group_size"])})
        return self._make(linear, quant_config, module.compute_dtype, module.device)


def _load_full(path):
    from transformers import AutoModelForCausalLM

    from qadapt._hf import quiet_transformers

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path)


def _linear_layers(model):
    import torch

    output = model.get_output_embeddings()
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output
    ]


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _device():
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@hookimpl
def register_backends(register):
    register(HQQBackend())
