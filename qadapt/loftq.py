"""LoftQ initialisation of LoRA on an already-quantized base: ``attach(model, "lora", init_lora_weights="loftq")``.

PEFT offers two LoftQ paths (peft 0.21). ``LoraConfig(init_lora_weights="loftq", loftq_config=...)`` quantizes
full-precision weights itself while attaching, so it never applies to a model qadapt quantized (on a bitsandbytes
layer it factors the packed bytes: 1x1 LoRA matrices and a shape error in the forward).
``peft.replace_lora_weights_loftq`` is the path for a quantized base: for each bitsandbytes 4-bit LoRA layer it sets
``B @ A`` to the best rank-r approximation of ``W - deq(Q(W))``, reading ``W`` from the full-precision safetensors
(peft/utils/loftq_utils.py), on CUDA or XPU only (it moves ``W`` there). It does not divide by the LoRA scaling, so the
layer adds ``scaling * (W - deq(Q(W)))``, right only at ``lora_alpha == r``; at qadapt's default ``lora_alpha = 2r``
the adapter then adds twice the error (measured on the toy Llama's q_proj, rank 16: relative weight error 0.0918
without an adapter, 0.0918 with PEFT's factors at scaling 2, 0.0555 with them divided by sqrt(scaling)). qadapt
divides both factors by ``sqrt(scaling)``.

Which bases LoftQ is offered on is each backend's to say (:meth:`qadapt.QuantBackend.loftq_support`); what else it
needs (CUDA, the full-precision weights) is checked here, before anything changes.
"""

from __future__ import annotations

import os

from .errors import IncompatibleError


def check(asked: str, method: str, record, backend, options: dict) -> str:
    """The folder holding the model's full-precision safetensors, or the refusal (before any change)."""
    if method != "lora":
        raise IncompatibleError(asked, "LoftQ initialises plain LoRA's two matrices; DoRA's magnitude, VeRA, AdaLoRA "
                                "and IA3 have no LoftQ initialisation in PEFT", "Use method='lora', or drop "
                                "init_lora_weights='loftq'")
    if options.get("loftq_config") is not None:
        raise IncompatibleError(asked, "LoftQConfig makes PEFT quantize full-precision weights while attaching; this "
                                "model is quantized already", "Drop loftq_config: qadapt runs LoftQ on the quantized "
                                "layers with the weights of the folder the model was quantized from")
    support = backend.loftq_support(record.options)
    if not support:
        raise IncompatibleError(asked, support.reason, support.hint)
    import torch

    if not torch.cuda.is_available() and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise IncompatibleError(asked, "PEFT computes LoftQ on a CUDA (or XPU) device only (peft 0.21, "
                                "replace_lora_weights_loftq moves each weight to 'cuda')",
                                "Run on a GPU, or drop init_lora_weights='loftq'")
    from .folders import detect

    source = record.source
    if source is None or not os.path.isdir(source):
        raise IncompatibleError(asked, "LoftQ needs the full-precision weights, and this model was quantized in memory",
                                "qadapt.load the model from its full-precision folder (safetensors), then attach")
    if detect(source) is not None or not any(name.endswith(".safetensors") for name in os.listdir(source)):
        raise IncompatibleError(asked, f"LoftQ needs the full-precision weights, and {source!r} holds no full-precision "
                                "safetensors (it was loaded already quantized)",
                                "qadapt.load the model from its full-precision folder (safetensors), then attach")
    return source


def initialise(peft_model, source: str, adapter_name: str) -> None:
    """LoftQ factors for every LoRA layer of ``adapter_name``, divided by ``sqrt(scaling)`` so that the layer's
    ``scaling * B @ A`` is the rank-r approximation of the quantization error whatever ``lora_alpha`` is."""
    import math

    import torch
    from peft import replace_lora_weights_loftq

    replace_lora_weights_loftq(peft_model, model_path=source, adapter_name=adapter_name)
    with torch.no_grad():
        for module in peft_model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and adapter_name in scaling and adapter_name in getattr(module, "lora_A", {}):
                root = math.sqrt(scaling[adapter_name])
                module.lora_A[adapter_name].weight.div_(root)
                module.lora_B[adapter_name].weight.div_(root)
