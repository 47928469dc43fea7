"""bitsandbytes: 4-bit (NF4/FP4, optional double quantization) and 8-bit (LLM.int8) weights.

Quantizes through transformers' ``BitsAndBytesConfig`` (the path users know); saves and reloads with transformers'
own bitsandbytes serialization (safetensors). bitsandbytes >= 0.45 runs both formats on CPU.

MoE: transformers 5 stores experts as fused 3-D parameters, which its bitsandbytes integration leaves in full
precision (5.23 has no bnb handling of fused experts). For 4-bit, qadapt quantizes them in place with bitsandbytes'
own parametrization API (``bitsandbytes.nn.parametrize.replace_parameter_4bit``, bitsandbytes >= 0.48, marked
experimental there) in the same format as the linear layers; transformers cannot save or reload those tensors
(``save_pretrained`` fails reverting its MoE conversion on them, ``from_pretrained`` refuses their packed shape), so
they are saved in a side file (:data:`EXPERTS_FILE`, bitsandbytes' own state-dict layout) and put back with
``replace_parameter_4bit_prequantized``. 8-bit has no parametrization: experts are refused on 8-bit.
"""

from __future__ import annotations

import struct

from qadapt.backend import Option, QuantBackend
from qadapt.capabilities import declare, no, yes
from qadapt.hookspecs import hookimpl
from qadapt.merging.requant import POLICIES
from qadapt_plugins._bnb_shards import SHARDED_4BIT, SHARDED_8BIT, ShardingMembers

DTYPES = ("float32", "bfloat16", "float16")
#: the side file holding 4-bit fused expert parameters (packed data and QuantState tensors)
EXPERTS_FILE = "qadapt_experts.safetensors"
#: bitsandbytes de-quantizes LLM.int8 rows as ``code * SCB * float32(1/127)`` (``int8_vectorwise_dequant``)
INT8_STEP = struct.unpack("f", struct.pack("f", 1 / 127))[0]


class BitsAndBytesBackend(ShardingMembers, QuantBackend):
    name = "bnb"
    summary = "bitsandbytes 4-bit NF4/FP4 (double quant) and 8-bit LLM.int8 weights"
    requires = ("bitsandbytes",)
    distribution = "bitsandbytes"
    install_hint = "pip install 'bitsandbytes>=0.45'  (the `bnb` extra of qadapt-lm)"
    requantize_policies = POLICIES
    training_route_compiles = True  # compiled with CUDA graphs on the H200 (docs/gpu-runs.md, 2026-12-01)
    requantize_uses_inputs = True
    peft_dispatchers = ("dispatch_bnb_8bit", "dispatch_bnb_4bit")
    matrix_variants = ({"bits": 4}, {"bits": 4, "quant_type": "fp4", "double_quant": False}, {"bits": 8})
    demo_options = {"bits": 4, "quant_type": "nf4", "double_quant": True}
    harmless_messages = (
        ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community",
         "bitsandbytes 0.50 looks for an optional Hub kernel; its own CPU kernel runs instead"),
    )
    options = (
        Option("bits", 4, "4-bit (NF4/FP4) or 8-bit (LLM.int8) weights", choices=(4, 8)),
        Option("quant_type", "nf4", "4-bit data type", choices=("nf4", "fp4")),
        Option("double_quant", True, "also quantize the 4-bit scales (saves ~0.37 bits/parameter)"),
        Option("compute_dtype", "auto", "dtype of the 4-bit matmul ('auto': the model's dtype)",
               choices=("auto",) + DTYPES, runtime=True),
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
            sharded=SHARDED_4BIT if options["bits"] == 4 else SHARDED_8BIT,
        )

    def full_precision(self, model, options):
        from qadapt.inventory import cannot, matmul_weights

        kept = super().full_precision(model, options)
        for weight in matmul_weights(model):
            if weight.kind != "experts":
                continue
            if options["bits"] == 8:
                kept[weight.name] = cannot("fused MoE expert parameter: bitsandbytes has no 8-bit parametrization "
                                           "(bitsandbytes.nn.parametrize is 4-bit only in 0.50); use bits=4")
            elif weight.elements % options["blocksize"]:
                kept[weight.name] = cannot(f"fused MoE expert parameter of {weight.elements} weights, not a multiple "
                                           f"of the 4-bit block size {options['blocksize']}")
        return kept
    def loftq_support(self, options):
        if options["bits"] == 4 and options["quant_type"] == "nf4":
            return yes("PEFT's replace_lora_weights_loftq on bitsandbytes 4-bit layers (NF4, as in the LoftQ paper)")
        return no(
            "qadapt offers LoftQ on bitsandbytes 4-bit NF4 only (PEFT's LoftQ for a quantized base handles 4-bit "
            f"layers; the LoftQ paper and PEFT's tests use NF4), not bits={options['bits']}, "
            f"quant_type={options['quant_type']!r}",
            "Quantize with bits=4, quant_type='nf4' for LoftQ, or drop init_lora_weights='loftq'",
        )

    def forward_tolerance(self, options):
        # LLM.int8's forward casts activations to float16 and rounds them to int8 too: up to 0.024 measured on the
        # architecture panel (IA3 on Falcon and GPT-2; 0.02 on the toy Llama)
        return 0.03 if options["bits"] == 8 else super().forward_tolerance(options)

    # ------------------------------------------------------------------ heavy work
    def _config(self, options, dtype, skip=None):
        import torch
        from transformers import BitsAndBytesConfig

        from qadapt.hf import placement

        if options["bits"] == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip,
                                      llm_int8_enable_fp32_cpu_offload=placement().cpu_offload)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            llm_int8_skip_modules=skip,
            bnb_4bit_quant_type=options["quant_type"],
            bnb_4bit_use_double_quant=options["double_quant"],
            bnb_4bit_compute_dtype=dtype if options["compute_dtype"] == "auto" else getattr(torch, options["compute_dtype"]),
            # the packed bytes stored as the model's dtype: FSDP2 and DeepSpeed then shard them like any weight
            # (accelerate 1.15's FSDP2 leaves uint8 Params4bit unsharded, a warning only); the same bytes either way
            bnb_4bit_quant_storage=dtype,
            llm_int8_enable_fp32_cpu_offload=placement().cpu_offload,
        )

    def quantize(self, model, options, calibration=None):
        from qadapt.hf import as_pretrained_dir, model_dtype

        dtype = model_dtype(model)
        skip = self._skip_modules(model, options)
        if options["blocksize"] != 64:
            quantized = self._quantize_blocksize(model, options, skip)
        else:
            with as_pretrained_dir(model) as path:
                quantized = self._from_pretrained(path, dtype, quantization_config=self._config(options, dtype, skip))
        if options["bits"] == 4:
            quantize_experts(quantized, options)
        return quantized

    def _skip_modules(self, model, options):
        """The linear layers transformers must leave in full precision: None (its own default: the output head) unless
        the model has routers that are nn.Linear layers (Qwen2-MoE's shared_expert_gate), which transformers would
        quantize; then every layer :meth:`full_precision` keeps, the head included, by full name."""
        import torch

        from qadapt.hf import checkpoint_shape

        shape = checkpoint_shape(model) if isinstance(model, str) else model
        kept = self.full_precision(shape, options)
        modules = dict(shape.named_modules())
        linear_routers = [n for n in kept if isinstance(modules.get(n), torch.nn.Linear)
                          and modules[n] is not shape.get_output_embeddings()]
        return sorted(kept) if linear_routers else None

    def _quantize_blocksize(self, model, options, skip):
        # transformers' BitsAndBytesConfig has no block size: quantize its layers ourselves.
        from qadapt.hf import as_pretrained_dir, model_dtype, replace_module

        dtype = model_dtype(model)
        with as_pretrained_dir(model) as path:
            quantized = self._from_pretrained(path, dtype, quantization_config=self._config(options, dtype, skip))
            full = self._from_pretrained(path, dtype)
        full_modules = dict(full.named_modules())
        for name, module in list(quantized.named_modules()):
            if isinstance(module, self.quantized_layer_types()):
                weight = full_modules[name].weight.detach().float()
                replace_module(quantized, name, self._requantize(module, weight, options["blocksize"]))
        return quantized

    def _from_pretrained(self, path, dtype, **kwargs):
        from transformers import AutoModelForCausalLM

        from qadapt.hf import placement, plain_linear_classes, quiet_transformers

        quiet_transformers()
        # transformers' replace_with_bnb_linear matches ``type(module) is nn.Linear`` (5.23): Falcon's FalconLinear
        # layers would silently stay in full precision; built as nn.Linear they are quantized (same weights, same
        # forward)
        with plain_linear_classes():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                         **placement().from_pretrained(), **kwargs)
        _keep_cpu_layout(model)
        return model

    def folder_options(self, path):
        """What transformers' bitsandbytes serialization records: ``config.json`` has the bits, data type, double
        quantization and compute dtype; the 4-bit block size is only in each layer's ``quant_state`` entry of the
        safetensors files."""
        from qadapt.hf import folder_quantization_config

        config = folder_quantization_config(path)
        if config is None or str(config.get("quant_method", "")).lower() != "bitsandbytes":
            return None
        if config.get("load_in_8bit") or config.get("_load_in_8bit"):
            if config.get("llm_int8_has_fp16_weight"):
                from qadapt.errors import IncompatibleError

                raise IncompatibleError(f"load {path!r}", "its bitsandbytes config keeps 8-bit weights in float16 "
                                        "(llm_int8_has_fp16_weight=True): they are not quantized",
                                        "Load it with transformers directly")
            return {"bits": 8}
        options = {
            "bits": 4,
            # BitsAndBytesConfig's own defaults where the config leaves a key out
            "quant_type": config.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(config.get("bnb_4bit_use_double_quant", False)),
            "compute_dtype": str(config.get("bnb_4bit_compute_dtype") or "float32").replace("torch.", ""),
        }
        sizes = _stored_blocksizes(path)
        if len(sizes) > 1:
            from qadapt.errors import IncompatibleError

            raise IncompatibleError(f"load {path!r}", f"its 4-bit layers use several block sizes ({sorted(sizes)})",
                                    "qadapt records one blocksize per model; load it with transformers directly")
        if sizes:
            options["blocksize"] = sizes.pop()
        return options

    def load(self, path, options):
        import os

        import torch

        if not os.path.exists(os.path.join(path, EXPERTS_FILE)):
            model = self._from_pretrained(path, None)
        else:
            from transformers import AutoModelForCausalLM

            from qadapt.hf import placement, plain_linear_classes, quiet_transformers

            quiet_transformers()
            with plain_linear_classes():
                model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, use_safetensors=True,
                                                                   **placement().from_pretrained())
            load_experts(model, path, info)
            _keep_cpu_layout(model)
        if options["bits"] == 4 and options["compute_dtype"] != "auto":
            # a runtime option: the folder's compute dtype unless the caller chose another
            for module in model.modules():
                if isinstance(module, self.quantized_layer_types()):
                    module.compute_dtype = getattr(torch, options["compute_dtype"])
        return model

    def save(self, model, path, options):
        from qadapt.hf import saving_pre_quantized

        experts = quantized_experts(model)
        with saving_pre_quantized(model):
            if not experts:
                model.save_pretrained(path, safe_serialization=True)
                return
            # the default save_original_format=True reverts transformers' MoE weight conversion, which fails on packed
            # tensors ("Undefined Operation encountered!", transformers 5.23 core_model_loading.py)
            model.save_pretrained(path, safe_serialization=True, save_original_format=False)
        split_experts(path, experts)

    def requantize_parameters(self, module, weights):
        """A copy of a fused-experts ``module`` whose 4-bit parameters hold ``weights``, quantized afresh in the same
        format (type, double quantization, block size); a parameter whose value is unchanged keeps its stored bytes."""
        import torch
        import torch.nn.utils.parametrize as parametrize
        from bitsandbytes.nn.parametrize import replace_parameter_4bit, replace_parameter_4bit_prequantized

        from qadapt.hf import unparametrized_copy

        states, stored = {}, {}
        for name in weights:
            if parametrize.is_parametrized(module, name):
                states[name] = module.parametrizations[name][0].quant_state
                stored[name] = module.parametrizations[name].original
        unchanged = {name for name in states if torch.equal(getattr(module, name).float(), weights[name].float())}
        copy = unparametrized_copy(module, {name: (stored[name] if name in unchanged else
                                                   weights[name].to(states[name].dtype) if name in states else weights[name])
                                            for name in weights})
        for name, state in states.items():
            if name in unchanged:
                replace_parameter_4bit_prequantized(copy, name, state.as_dict(packed=True), stored[name].device)
            else:
                replace_parameter_4bit(copy, name, compress_statistics=state.nested, quant_type=state.quant_type,
                                       blocksize=state.blocksize)
        return copy

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

    def training_dequantizer(self, module):
        """4-bit: ``bitsandbytes.functional.dequantize_4bit`` (what bitsandbytes' own MatMul4Bit runs in its forward
        and again in its backward). 8-bit: none: LLM.int8's forward also rounds the activations, which a de-quantized
        matmul would not reproduce (its own backward already re-uses the int8 weight)."""
        import bitsandbytes as bnb

        if not isinstance(module, bnb.nn.Linear4bit):
            return None
        state = getattr(module.weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return None  # not quantized yet, or repacked for bitsandbytes' CPU inference kernel
        # Linear4bit.forward computes in its compute_dtype where it has one, else in the input's
        return lambda dtype: bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(
            module.compute_dtype or dtype)

    def requantize(self, module, weight, policy="best", hessian=None):
        """A new layer holding ``weight``; ``policy`` (see qadapt.merging.requant): ``"fresh"`` quantizes ``weight``
        afresh as PEFT does; ``"grid"`` keeps the original scales (4-bit absmax blocks, 8-bit SCB rows) and rounds
        ``weight`` onto them; ``"best"`` (default) also searches each block's / row's scale and keeps, per block or
        row, whichever candidate (fresh included) is closest to ``weight``, so the result is never further from
        ``weight`` than the fresh quantization.
        ``hessian`` (optional, (in, in) = X^T X of the layer's inputs on calibration data): the candidates then also
        include a GPTQ-style rounding onto the original grid, and the layer with the lowest OUTPUT error on those
        inputs is kept (fresh, i.e. PEFT's result, among them)."""
        from qadapt.merging.requant import by_policy

        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
        fresh = self._requantize(module, weight, blocksize)
        return by_policy(self, policy, weight, hessian, fresh,
                         lambda chosen: self._requantize_on_grid(module, weight, fresh, chosen),
                         lambda: self._requantize_gptq(module, weight, fresh, hessian))

    def _requantize_gptq(self, module, weight, fresh, hessian):
        """GPTQ-style rounding onto the layer's original grid (absmax blocks or SCB rows)."""
        import bitsandbytes as bnb
        import torch

        from qadapt.merging.requant import affine_columns, codebook_columns, gptq_on_grid

        out_features, in_features = weight.shape
        old = module.weight
        if isinstance(module, bnb.nn.Linear4bit):
            state = old.quant_state
            if state is None or getattr(state, "packing_format_for_cpu", False) or weight.numel() % state.blocksize:
                return None
            absmax = _block_absmax(state, old.device).repeat_interleave(state.blocksize).view(out_features, in_features)
            rounding = codebook_columns(absmax, state.code.float().to(old.device))
        else:
            scb = old.SCB if old.SCB is not None else getattr(module.state, "SCB", None)
            if scb is None:
                return None
            step = (scb.float() * INT8_STEP).view(-1, 1).expand(out_features, in_features)
            rounding = affine_columns(step, torch.zeros_like(step), -127, 127)
        on_grid = gptq_on_grid(weight.float().to(old.device), hessian, rounding)
        return self._requantize_on_grid(module, on_grid, fresh, "grid")

    def _requantize_on_grid(self, module, weight, fresh, policy):
        import bitsandbytes as bnb

        if isinstance(module, bnb.nn.Linear4bit):
            return self._requantize_4bit_on_grid(module, weight, fresh, policy)
        return self._requantize_8bit_on_grid(module, weight, fresh, policy)

    def _requantize_4bit_on_grid(self, module, weight, fresh, policy, window=8):
        import copy

        import bitsandbytes as bnb
        import torch

        from qadapt.hf import clone_module

        from qadapt.merging.requant import blockwise_4bit

        old = module.weight
        state = old.quant_state
        if state is None or getattr(state, "packing_format_for_cpu", False) or weight.numel() % state.blocksize:
            return None  # layouts this arithmetic does not cover: the fresh quantization stands
        device = old.device
        target = weight.float().to(device).reshape(-1, state.blocksize)
        code = state.code.float().to(device)
        if state.nested:
            table = state.state2.code.float().to(device)
            nested = state.state2.absmax.float().to(device)
            group = torch.arange(target.shape[0], device=device) // state.state2.blocksize
            scale = nested[group].view(-1, 1)
            offset = float(state.offset)
            old_index = state.absmax.long().view(-1, 1)
            if policy == "grid":
                indices = old_index
            else:  # the original absmax code, its neighbours, and the codes around the fresh absmax
                fresh_value = (target.abs().amax(dim=1, keepdim=True) - offset) / scale
                fresh_index = torch.bucketize(fresh_value.contiguous(), (table[1:] + table[:-1]) / 2)
                steps = torch.arange(-window, window + 1, device=device).view(1, -1)
                indices = torch.cat([old_index + steps, fresh_index + steps], dim=1).clamp(0, table.numel() - 1)
            values = table[indices] * scale + offset
        else:
            old_absmax = state.absmax.float().to(device).view(-1, 1)
            values = old_absmax
            if policy != "grid":
                q0 = code[unpack_4bit(old.data, weight.numel()).long()].view_as(target)
                ls = (q0 * target).sum(dim=1, keepdim=True) / (q0 * q0).sum(dim=1, keepdim=True).clamp_min(1e-30)
                ls = torch.where(ls > 0, ls * old_absmax, old_absmax)  # code * absmax: the LS factor rescales absmax
                values = torch.cat([old_absmax, target.abs().amax(dim=1, keepdim=True), ls], dim=1)
        codes, chosen, _ = blockwise_4bit(target, values, code)
        new_state = copy.deepcopy(state)
        if state.nested:
            new_state.absmax = torch.gather(indices, 1, chosen.view(-1, 1)).view(-1).to(state.absmax.dtype)
        else:
            new_state.absmax = torch.gather(values, 1, chosen.view(-1, 1)).view(-1).to(state.absmax.dtype)
        clone = clone_module(module)
        clone.weight = bnb.nn.Params4bit(
            pack_4bit(codes) if old.dtype == torch.uint8 else pack_4bit(codes).reshape(-1).view(old.dtype).reshape(-1, 1),
            requires_grad=False,
            quant_state=new_state,
            blocksize=state.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=clone,
            bnb_quantized=True,
        )
        # Params4bit(quant_state=...) leaves the module's quant_state alone: it still held the old layer's (copied by
        # clone_module). Under FSDP2 the forward reads the module's, so it would pair the new codes with old scales.
        clone.quant_state = new_state
        return clone

    def _requantize_8bit_on_grid(self, module, weight, fresh, policy):
        import bitsandbytes as bnb
        import torch

        from qadapt.hf import clone_module

        from qadapt.merging.requant import best_rows, int8_rows

        old = module.weight
        scb = old.SCB if old.SCB is not None else getattr(module.state, "SCB", None)
        if scb is None or old.data.dtype != torch.int8:
            return None
        device = old.device
        target = weight.float().to(device)

        def deq(codes, row_scale):  # bitsandbytes' int8_vectorwise_dequant
            return codes.float() * row_scale.view(-1, 1) * INT8_STEP

        candidates = int8_rows(target, scb.float(), -127, 127, deq)
        if policy == "grid":
            candidates = candidates[:1]
        else:
            fresh_scb = fresh.weight.SCB if fresh.weight.SCB is not None else fresh.state.SCB
            candidates.append((fresh.weight.data.float(), fresh_scb.float()))
        codes, row_scale, _, _ = best_rows(target, candidates, deq)
        codes = codes.to(torch.int8).contiguous()
        clone = clone_module(module)
        clone.state = bnb.MatmulLtState()
        clone.state.threshold = module.state.threshold
        clone.state.has_fp16_weights = False
        clone.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes,
                                         SCB=row_scale.to(scb.dtype).contiguous())
        return clone

    def _requantize(self, module, weight, blocksize):
        import bitsandbytes as bnb

        from qadapt.hf import clone_module

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


def quantize_experts(model, options) -> list[str]:
    """Quantize every fused expert parameter of ``model`` to 4 bits in place, in the linear layers' format."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    from qadapt.inventory import expert_parameters

    done = []
    for name, module in list(model.named_modules()):
        for parameter in expert_parameters(module):
            replace_parameter_4bit(module, parameter, compress_statistics=options["double_quant"],
                                   quant_type=options["quant_type"], blocksize=options["blocksize"])
            done.append(f"{name}.{parameter}")
    return done


def quantized_experts(model) -> list[str]:
    """Full names of the 4-bit parametrized fused expert parameters of ``model``."""
    import torch.nn.utils.parametrize as parametrize

    from qadapt.inventory import expert_parameters

    return [f"{name}.{parameter}" for name, module in model.named_modules() for parameter in expert_parameters(module)
            if parametrize.is_parametrized(module, parameter)]


def split_experts(path, experts) -> None:
    """Move the tensors of ``experts`` (packed data, QuantState) from transformers' files in ``path`` to
    :data:`EXPERTS_FILE`, so that ``from_pretrained`` reads the rest unchanged."""
    import glob
    import os

    from safetensors.torch import load_file, save_file

    def is_expert_key(key):
        return any(key == name or key.startswith(name + ".") for name in experts)

    side = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        state = load_file(file)
        moved = {key: tensor for key, tensor in state.items() if is_expert_key(key)}
        if moved:
            side.update(moved)
            save_file({k: v for k, v in state.items() if k not in moved}, file, metadata={"format": "pt"})
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        import json

        with open(index) as handle:
            data = json.load(handle)
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not is_expert_key(k)}
        with open(index, "w") as handle:
            json.dump(data, handle, indent=2)
    save_file(side, os.path.join(path, EXPERTS_FILE), metadata={"format": "pt", "experts": ",".join(experts)})


def load_experts(model, path, info) -> None:
    """Put the 4-bit experts of :data:`EXPERTS_FILE` into ``model`` (just loaded by ``from_pretrained``, which left
    them missing); refuse any other missing, unexpected or mismatched tensor."""
    import os

    import torch
    from bitsandbytes.nn.parametrize import replace_parameter_4bit_prequantized
    from safetensors import safe_open
    from safetensors.torch import load_file

    from qadapt.errors import CheckpointError

    file = os.path.join(path, EXPERTS_FILE)
    with safe_open(file, "pt") as handle:
        experts = (handle.metadata() or {}).get("experts", "").split(",")
    missing = [k for k in info.get("missing_keys", []) if k not in experts]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise CheckpointError(f"load {path!r} with backend 'bnb'", f"the checkpoint does not match its config (missing "
                              f"{missing[:3]}, unexpected {list(info.get('unexpected_keys') or [])[:3]})",
                              "Save the model again")
    side = load_file(file)
    for full in experts:
        module_name, _, parameter = full.rpartition(".")
        module = model.get_submodule(module_name)
        device = getattr(module, parameter).device
        setattr(module, parameter, torch.nn.Parameter(side[full].to(device), requires_grad=False))
        state = {k[len(full) + 1:]: v for k, v in side.items() if k.startswith(full + ".")}
        replace_parameter_4bit_prequantized(module, parameter, state, device)


def _block_absmax(state, device):
    """The de-quantized absmax of every 4-bit block, as bitsandbytes computes it (double quantization included)."""
    import torch

    if not state.nested:
        return state.absmax.float().to(device)
    nested = state.state2.absmax.float().to(device)
    group = torch.arange(state.absmax.numel(), device=device) // state.state2.blocksize
    return state.state2.code.float().to(device)[state.absmax.long()] * nested[group] + float(state.offset)


def _stored_blocksizes(path):
    """The 4-bit block sizes bitsandbytes wrote into the ``quant_state`` entries of the folder's safetensors files."""
    import json
    import os

    from safetensors import safe_open

    sizes = set()
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, name), framework="pt") as handle:
            for key in handle.keys():
                if ".quant_state.bitsandbytes__" in key:
                    sizes.add(json.loads(bytes(handle.get_tensor(key).tolist()).decode())["blocksize"])
    return sizes


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


def pack_4bit(codes):
    """bitsandbytes' packing: two codes a byte, the first in the high nibble; shape (n/2, 1) uint8."""
    import torch

    flat = codes.reshape(-1).to(torch.uint8)
    return ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)


def unpack_4bit(data, numel):
    """The 4-bit codes of bitsandbytes' packed bytes, in order."""
    import torch

    flat = data.reshape(-1).view(torch.uint8)  # the packed bytes, whatever dtype stores them
    out = torch.empty(flat.numel() * 2, dtype=torch.uint8, device=data.device)
    out[0::2] = flat >> 4
    out[1::2] = flat & 0x0F
    return out[:numel]


@hookimpl
def register_backends(register):
    register(BitsAndBytesBackend())
