"""bitsandbytes: 4-bit (NF4/FP4, optional double quantization) and 8-bit (LLM.int8) weights.

Quantizes through transformers' ``BitsAndBytesConfig`` (the path users know); saves and reloads with transformers'
own bitsandbytes serialization (safetensors). bitsandbytes >= 0.45 runs both formats on CPU.
"""

from __future__ import annotations

from qadapt.backend import Option, QuantBackend
from qadapt.capabilities import declare, no, yes
from qadapt.hookspecs import hookimpl

DTYPES = ("float32", "bfloat16", "float16")


class BitsAndBytesBackend(QuantBackend):
    name = "bnb"
    summary = "bitsandbytes 4-bit NF4/FP4 (double quant) and 8-bit LLM.int8 weights"
    requires = ("bitsandbytes",)
    distribution = "bitsandbytes"
    install_hint = "pip install 'qadapt[bnb]'"
    options = (
        Option("bits", 4, "4-bit (NF4/FP4) or 8-bit (LLM.int8) weights", choices=(4, 8)),
        Option("quant_type", "nf4", "4-bit data type", choices=("nf4", "fp4")),
        Option("double_quant", True, "also quantize the 4-bit scales (saves ~0.37 bits/parameter)"),
        Option("compute_dtype", "float32", "dtype of the 4-bit matmul", choices=DTYPES),
        Option("blocksize", 64, "4-bit quantization block size", choices=(64, 128, 256)),
    )

    def check_option_combination(self, options):
        if options["bits"] == 8 and (options["quant_type"] != "nf4" or options["double_quant"] is not True):
            # quant_type/double_quant only mean something for 4-bit: accept their defaults, refuse anything else.
            from qadapt.errors import InvalidOptionError

            raise InvalidOptionError(
                f"backend 'bnb' with bits=8, quant_type={options['quant_type']!r}, double_quant={options['double_quant']}",
                "quant_type and double_quant apply to 4-bit weights only",
                "Drop them, or use bits=4",
            )
        return options

    # ------------------------------------------------------------------ capabilities
    def capabilities(self, options):
        return declare(
            train={
                "lora": yes("PEFT's bitsandbytes LoRA layers"),
                "dora": yes("PEFT's DoRA de-quantizes the weight for its norm")
                if options["bits"] == 4
                else no(
                    "DoRA on 8-bit bitsandbytes fails in bitsandbytes' MatMul8bitLt backward (AttributeError on its "
                    "weight state; seen with peft 0.21, bitsandbytes 0.50)",
                    "Use bits=4 for DoRA, or method='lora' on 8-bit",
                ),
                "vera": yes("PEFT's bitsandbytes VeRA layers"),
                "adalora": yes("PEFT's bitsandbytes AdaLoRA layers"),
                "ia3": yes("PEFT's bitsandbytes IA3 layers"),
            },
            requantize=yes("bitsandbytes quantizes a merged weight on the fly (fresh absmax scales)"),
            dequantize=yes("bitsandbytes de-quantizes 4-bit and 8-bit weights exactly"),
            save=yes("transformers serializes bitsandbytes weights with safetensors"),
        )

    def forward_tolerance(self, options):
        # LLM.int8's forward casts activations to float16 and rounds them to int8 too.
        return 0.02 if options["bits"] == 8 else super().forward_tolerance(options)

    # ------------------------------------------------------------------ heavy work
    def _config(self, options):
        import torch
        from transformers import BitsAndBytesConfig

        if options["bits"] == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=options["quant_type"],
            bnb_4bit_use_double_quant=options["double_quant"],
            bnb_4bit_compute_dtype=getattr(torch, options["compute_dtype"]),
            bnb_4bit_quant_storage=torch.uint8,
        )

    def quantize(self, model, options, calibration=None):
        from qadapt._hf import as_pretrained_dir, model_dtype

        dtype = model_dtype(model)
        if options["blocksize"] != 64:
            return self._quantize_blocksize(model, options)
        with as_pretrained_dir(model) as path:
            return self._from_pretrained(path, dtype, quantization_config=self._config(options))

    def _quantize_blocksize(self, model, options):
        # transformers' BitsAndBytesConfig has no block size: quantize its layers ourselves.
        from qadapt._hf import as_pretrained_dir, model_dtype

        dtype = model_dtype(model)
        with as_pretrained_dir(model) as path:
            quantized = self._from_pretrained(path, dtype, quantization_config=self._config(options))
            full = self._from_pretrained(path, dtype)
        full_modules = dict(full.named_modules())
        for name, module in list(quantized.named_modules()):
            if isinstance(module, self.quantized_layer_types()):
                weight = full_modules[name].weight.detach().float()
                parent_name, _, child = name.rpartition(".")
                setattr(quantized.get_submodule(parent_name), child, self._requantize(module, weight, options["blocksize"]))
        return quantized

    def _from_pretrained(self, path, dtype, **kwargs):
        from transformers import AutoModelForCausalLM

        from qadapt._hf import quiet_transformers

        quiet_transformers()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=_device_map(), **kwargs)
        _keep_cpu_layout(model)
        return model

    def load(self, path, options):
        return self._from_pretrained(path, None)

    def save(self, model, path, options):
        model.save_pretrained(path, safe_serialization=True)

    def quantized_layer_types(self):
        import bitsandbytes as bnb

        return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)

    def dequantize(self, module):
        import copy

        import bitsandbytes as bnb
        from peft.utils.integrations import dequantize_bnb_weight

        weight = module.weight
        quant_state = getattr(weight, "quant_state", None)
        if getattr(quant_state, "packing_format_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place at the first inference forward;
            # bnb.functional.dequantize_4bit would misread that layout. Undo the packing on a copy.
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(quant_state))
            return bnb.functional.dequantize_4bit(data, state).float()
        return dequantize_bnb_weight(weight, state=getattr(module, "state", None)).float()

    def requantize(self, module, weight):
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
        return self._requantize(module, weight, blocksize)

    def _requantize(self, module, weight, blocksize):
        import bitsandbytes as bnb

        from qadapt._hf import clone_module

        device = module.weight.device
        clone = clone_module(module)
        if isinstance(module, bnb.nn.Linear4bit):
            old = module.weight
            clone.weight = bnb.nn.Params4bit(
                weight.to("cpu", old.quant_state.dtype if old.quant_state else weight.dtype),
                requires_grad=False,
                blocksize=blocksize,
                compress_statistics=old.compress_statistics,
                quant_type=old.quant_type,
                quant_storage=old.quant_storage,
                module=clone,
            ).to(device)
        else:
            clone.state = bnb.MatmulLtState()
            clone.state.threshold = module.state.threshold
            clone.state.has_fp16_weights = False
            clone.weight = bnb.nn.Int8Params(weight.to("cpu", torch_dtype_of(module)), requires_grad=False,
                                             has_fp16_weights=False).to(device)
        return clone


def _keep_cpu_layout(model):
    """Stop bitsandbytes from repacking 4-bit weights in place for its AVX512-BF16 CPU kernel.

    It does so at the first inference forward, after which PEFT's DoRA (and any reader of the weight) de-quantizes
    the repacked bytes as if they were the standard layout and gets garbage. Training never uses that kernel.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def torch_dtype_of(module):
    import torch

    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None else torch.float16


def _device_map():
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


@hookimpl
def register_backends(register):
    register(BitsAndBytesBackend())
