"""torchao: weights as tensor subclasses (int8 weight-only; int4 weight-only where torchao runs it; NF4).

int8 and int4 quantize through transformers' ``TorchAoConfig``; the layers stay ``nn.Linear`` with a quantized weight
tensor, and transformers saves them with safetensors. ``scheme="nf4"`` is torchao's ``NF4Tensor`` (QLoRA's 4-bit
NormalFloat, double-quantized block scales; the tensor torchtune shards with FSDP2), put on the layers by torchao's own
``quantize_``: it trains sharded by FSDP2, and transformers cannot save it, so it is rebuilt from its source folder.
"""

from __future__ import annotations

import math

from qadapt.backend import MemoryProfile, Option, QuantBackend
from qadapt.capabilities import declare, no, yes
from qadapt.errors import BackendUnavailableError
from qadapt.hookspecs import hookimpl
from qadapt.merging.requant import POLICIES

INT4_NOT_TRAINABLE = no(
    "PEFT's torchao LoRA layer accepts only int8 weights (it raises TypeError on Int4Tensor)",
    "Use scheme='int8_weight_only' to train adapters, or bnb bits=4 for a trainable 4-bit base",
)


#: torchao's NF4Tensor quantizes in blocks of 64 weights and double-quantizes the blocks' scales in groups of 256
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
NF4_UNIT = NF4_BLOCK * NF4_SCALER_BLOCK

NF4_NOT_SAVED = no(
    "transformers cannot serialize torchao's NF4Tensor (transformers 5.23: 'Unsupported tensor type: NF4Tensor'), so "
    "the quantized base has no file format",
    "From a sharded run qadapt.distributed.save writes the adapter with the source folder named (its base is "
    "quantized again from it when loaded); in one process, model.save_pretrained(DIR) writes the adapter alone "
    "(PEFT's format) and qadapt.load_adapter puts it on qadapt.load(SOURCE, backend='torchao', scheme='nf4'); or train "
    "on scheme='int8_weight_only' or bnb bits=4 to save the base",
)

NF4_SHARDED = {
    "fsdp2": yes("torchao's NF4Tensor implements FSDP2's all-gather extension: its codes and double-quantized scales "
                 "are sharded together by rows, from 2 processes and for weights whose scale groups split evenly "
                 "across them (checked before sharding)"),
    "zero3": no("not verified: no ZeRO-3 run of torchao's NF4Tensor was made", "Use engine='fsdp2'"),
}

NOT_SHARDED = {
    "fsdp2": no("torchao 0.18's Int8Tensor has no FSDP2 all-gather extension: fully_shard fails (NotImplementedError: "
                "Int8Tensor dispatch ... aten.split)", "Use bnb bits=4 or hqq to train sharded"),
    "zero3": no("not verified: no ZeRO-3 run of torchao's tensor-subclass weights was made", "Use bnb bits=4 to train "
                "sharded"),
}


class _PlacementAndMemory:
    """torchao's placement and memory members (``qadapt.QuantBackend`` documents each)."""

    def placement(self, options):
        from qadapt.backend import PLACEMENTS

        honoured = yes("transformers' from_pretrained places the layers")
        offload = no("CPU offload of torchao's tensor-subclass weights is not verified (accelerate moves them with "
                     "hooks)", "Map every module to a GPU, or use bnb for CPU offload")
        return {name: offload if name == "cpu_offload" else honoured for name in PLACEMENTS}

    def memory_profile(self, options, dtype_bytes):
        if options["scheme"] == "int4_weight_only":
            return MemoryProfile(payload_bits=4, state_bits=2 * 16 / options["group_size"])
        if options["scheme"] == "nf4":  # an int8 scale per block of 64, a float32 factor per 64 x 256
            return MemoryProfile(payload_bits=4, state_bits=8 / NF4_BLOCK + 32 / NF4_UNIT)
        # int8 codes and a scale per row in the model's dtype; torchao's int8 linear keeps each layer's de-quantized
        # weight for the backward (seen with saved-tensor hooks on CPU; docs/benchmarks.md, 8B table)
        return MemoryProfile(payload_bits=8, row_bytes=dtype_bytes, saves_dequantized_weight=True)


class TorchAOBackend(_PlacementAndMemory, QuantBackend):
    name = "torchao"
    summary = "torchao tensor-subclass weights (int8 weight-only; int4 weight-only on CUDA)"
    requires = ("torchao",)
    distribution = "torchao"
    install_hint = "pip install 'torchao>=0.12'  (the `torchao` extra of qadapt-lm)"
    requantize_policies = POLICIES
    requantize_uses_inputs = True
    # int8 weight-only passed the compiled-layers GPU test regionally and with CUDA graphs (H200, 2026-12-02); int8
    # and NF4Tensor then trained compiled in bench/peers.py (docs/gpu-runs.md, seventh session)
    training_route_compiles = True
    peft_dispatchers = ("dispatch_torchao",)
    matrix_variants = ({"scheme": "int8_weight_only"}, {"scheme": "int4_weight_only"}, {"scheme": "nf4"})
    demo_options = {"scheme": "int8_weight_only"}
    harmless_messages = (
        ("torchao", r"Failed to load .*_C_\w+.*\.so",
         "torchao 0.18 tries its CUDA/cutlass extensions on every import; a CPU build has none"),
        ("torchao.kernel.intmm", r"Detected no triton",
         "torchao 0.18 on a machine without Triton (CPU): qadapt uses none of its Triton kernels"),
        ("torch.utils._pytree", r"is an Enum subclass and is now natively supported",
         "torchao 0.18 registers Enums the way torch 2.13 deprecates"),
    )
    options = (
        Option("scheme", "int8_weight_only", "torchao quantization scheme (int4_weight_only: CUDA only, computes in "
               "bfloat16; nf4: torchao's NF4Tensor, trains sharded by FSDP2, not saved)",
               choices=("int8_weight_only", "int4_weight_only", "nf4")),
        Option("group_size", 128, "int4 group size (int4_weight_only only)", choices=(32, 64, 128, 256)),
    )

    def capabilities(self, options):
        if options["scheme"] == "int4_weight_only":
            refusal = {method: INT4_NOT_TRAINABLE for method in ("lora", "dora", "vera", "adalora", "ia3")}
            return declare(
                train=refusal,
                requantize=no("no adapter can be trained on int4"),
                dequantize=no("no adapter can be trained on int4"),
                save=no("no adapter can be trained on int4"),
                sharded=NOT_SHARDED,
            )
        nn_linear = "the layer stays nn.Linear, so PEFT's {} layer wraps it"
        if options["scheme"] == "nf4":
            trains = {method: yes(nn_linear.format(label) + " (NF4Tensor's linear keeps the 4-bit weight for the "
                                  "backward, not a de-quantized copy)")
                      for method, label in (("lora", "LoRA"), ("vera", "VeRA"), ("adalora", "AdaLoRA"), ("ia3", "IA3"))}
            trains["dora"] = no("PEFT's DoRA de-quantizes the base weight with its dequantize(), which on torchao's "
                                "NF4Tensor is a code-table lookup taking other arguments (TypeError at attach)",
                                "Use method='lora' on NF4, or DoRA on scheme='int8_weight_only' or bnb bits=4")
            return declare(
                train=trains,
                requantize=yes("the merged weight is rounded onto the layer's own NF4 grid, or quantized afresh "
                               "(requantize policies)"),
                dequantize=yes("NF4Tensor.get_original_weight()"),
                save=NF4_NOT_SAVED,
                sharded=NF4_SHARDED,
            )
        return declare(
            train={
                "lora": yes("PEFT's TorchaoLoraLinear"),
                "dora": yes(nn_linear.format("DoRA")),
                "vera": yes(nn_linear.format("VeRA")),
                "adalora": yes(nn_linear.format("AdaLoRA")),
                "ia3": yes(nn_linear.format("IA3")),
            },
            requantize=yes("torchao quantizes the merged weight again with the same config"),
            dequantize=yes("the weight tensor's own dequantize()"),
            save=yes("transformers serializes torchao int8 weights with safetensors"),
            sharded=NOT_SHARDED,
        )

    def full_precision(self, model, options):
        """Head and routers by design; transformers' ``TorchAoHfQuantizer`` quantizes ``nn.Linear`` layers only
        (transformers 5.23 quantizer_torchao.py), and checkpoints are reloaded through it, so transformers' ``Conv1D``
        and fused MoE experts cannot be quantized (converting them in memory first would not survive a reload:
        transformers rebuilds Conv1D from the config and re-fuses split experts when it loads the folder)."""
        from qadapt.inventory import cannot, matmul_weights

        kept = super().full_precision(model, options)
        for weight in matmul_weights(model):
            if weight.name in kept:
                continue
            if weight.kind == "conv1d":
                kept[weight.name] = cannot("transformers' Conv1D: transformers' torchao quantizer takes nn.Linear only")
            elif weight.kind == "experts":
                kept[weight.name] = cannot("fused MoE expert parameter: transformers' torchao quantizer takes nn.Linear "
                                           "only, and re-fuses split experts when a saved folder is reloaded")
            elif options["scheme"] == "nf4" and math.prod(weight.shape) % NF4_UNIT:
                kept[weight.name] = cannot(
                    f"{weight.shape[0]} x {weight.shape[1]} weights: torchao's NF4Tensor needs a multiple of "
                    f"{NF4_UNIT:,} (blocks of {NF4_BLOCK}, their scales double-quantized in groups of {NF4_SCALER_BLOCK})")
        return kept

    def _config(self, options):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

        if options["scheme"] == "int4_weight_only":
            from torchao.quantization.quantize_.workflows import Int4PackingFormat

            # tinygemm's layout: its kernel is part of PyTorch's CUDA build (the default "plain" layout needs the
            # separate mslk kernel library)
            return Int4WeightOnlyConfig(group_size=options["group_size"],
                                        int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
        return Int8WeightOnlyConfig()

    def quantize(self, model, options, calibration=None):
        import torch
        from transformers import AutoModelForCausalLM, TorchAoConfig

        from qadapt.hf import as_pretrained_dir, model_dtype, placement, plain_linear_classes, quiet_transformers

        if options["scheme"] == "int4_weight_only" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                "backend 'torchao' with scheme='int4_weight_only'",
                "torchao's int4 weight-only layout needs a CUDA GPU (on CPU its weight conversion fails)",
                "Use scheme='int8_weight_only' on CPU",
            )
        quiet_transformers()
        if options["scheme"] == "nf4":
            return self._quantize_nf4(model, options)
        # tinygemm's int4 kernel takes bfloat16 only: an int4 model computes in bfloat16 whatever it was given in
        dtype = torch.bfloat16 if options["scheme"] == "int4_weight_only" else model_dtype(model)
        # Falcon's FalconLinear computes ``input @ self.weight.T``, which torchao's Int8Tensor cannot run (no
        # aten.permute, torchao 0.18): built as nn.Linear (same weights, F.linear) it runs
        with as_pretrained_dir(model) as path, plain_linear_classes():
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, **placement().from_pretrained(), quantization_config=TorchAoConfig(self._config(options)),
                use_safetensors=True,
            )

    def _quantize_nf4(self, model, options):
        """A copy of ``model`` through from_pretrained (placement honoured), then torchao's ``quantize_`` with its
        NF4 config on every ``nn.Linear`` that :meth:`full_precision` does not keep (transformers' torchao quantizer
        takes no prototype config it could save)."""
        import torch
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig
        from torchao.quantization import quantize_
        from transformers import AutoModelForCausalLM

        from qadapt.hf import as_pretrained_dir, model_dtype, placement, plain_linear_classes

        with as_pretrained_dir(model) as path, plain_linear_classes():
            copy = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype(model), use_safetensors=True,
                                                        **placement().from_pretrained())
        config = NF4WeightOnlyConfig()  # its block sizes are class attributes, not arguments (torchao 0.18)
        if (config.block_size, config.scaler_block_size) != (NF4_BLOCK, NF4_SCALER_BLOCK):
            raise BackendUnavailableError(
                "backend 'torchao' with scheme='nf4'", f"this torchao's NF4 blocks are {config.block_size} / "
                f"{config.scaler_block_size}, qadapt's shape checks expect {NF4_BLOCK} / {NF4_SCALER_BLOCK}",
                "Install the torchao version qadapt-lm pins (the `torchao` extra)")
        kept = self.full_precision(copy, options)
        quantize_(copy, config, filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name not in kept)
        return copy

    def folder_options(self, path):
        """transformers' ``TorchAoConfig`` serialization: ``quant_type`` is ``{"default": {"_type": "<Config class>",
        "_data": {...}}}`` (transformers 5.x) or the older string form."""
        from qadapt.errors import IncompatibleError
        from qadapt.hf import folder_quantization_config

        config = folder_quantization_config(path) or {}
        if config.get("quant_method") != "torchao":
            return None
        quant_type = config.get("quant_type")
        if isinstance(quant_type, dict):
            if len(quant_type) > 1:
                raise IncompatibleError(f"load {path!r}", f"it holds per-module torchao configs ({', '.join(sorted(quant_type))})",
                                        "qadapt records one scheme per model; load it with transformers directly")
            entry = quant_type.get("default") or next(iter(quant_type.values()), {})
            kind, data = entry.get("_type"), entry.get("_data") or {}
        else:
            kind, data = quant_type, config.get("quant_type_kwargs") or {}
        if kind in ("Int8WeightOnlyConfig", "int8_weight_only"):
            granularity = (data.get("granularity") or {}).get("_type", "PerRow")
            if granularity != "PerRow":
                raise IncompatibleError(f"load {path!r}", f"its torchao int8 weights use {granularity} granularity",
                                        "qadapt's torchao backend handles per-row int8 weights")
            return {"scheme": "int8_weight_only"}
        if kind in ("Int4WeightOnlyConfig", "int4_weight_only"):
            return {"scheme": "int4_weight_only", "group_size": data.get("group_size", 128)}
        raise IncompatibleError(
            f"load {path!r}", f"its torchao scheme is {kind} (config.json quantization_config.quant_type)",
            "qadapt's torchao backend offers int8_weight_only and int4_weight_only; load it with transformers directly",
        )

    def load(self, path, options):
        from transformers import AutoModelForCausalLM

        from qadapt.hf import placement, plain_linear_classes, quiet_transformers

        quiet_transformers()
        with plain_linear_classes():
            return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **placement().from_pretrained())

    def save(self, model, path, options):
        from qadapt.hf import saving_pre_quantized

        with saving_pre_quantized(model):
            model.save_pretrained(path, safe_serialization=True)

    def quantized_layer_types(self):
        # torchao keeps nn.Linear and swaps its weight for a tensor subclass: the layers are matched by weight type.
        return ()

    def is_quantized_layer(self, module):
        return _is_subclass_weight(module)

    def dequantize(self, module):
        return _dequantized(module.weight).float()

    def training_dequantizer(self, module):
        """The weight tensor's own de-quantization (int8 weight-only, NF4; int4 trains nothing): torchao's int8 linear
        keeps every de-quantized weight for the backward (12 GiB at Llama-3-8B), this route de-quantizes it again."""
        return (lambda dtype: _dequantized(module.weight).to(dtype)) if _is_subclass_weight(module) else None

    def sharding_problems(self, model, options, engine, world_size):
        """NF4 under FSDP2: torch 2.13's FSDP2 skips the all-gather at one process and copies only the first of a
        tensor's all-gather inputs (NF4Tensor has three: ValueError at the first forward); and torchao splits each
        inner tensor evenly by rows, so every weight's rows and scale groups must divide by the number of processes."""
        if options["scheme"] != "nf4" or engine != "fsdp2":
            return []
        if world_size < 2:
            return ["torchao's NF4Tensor cannot be sharded by FSDP2 in one process: torch 2.13's FSDP2 skips the "
                    "all-gather there and hands NF4Tensor only the first of its three inner tensors. Run 2 or more "
                    "processes, or train in one process without qadapt.distributed.shard (the same model, unsharded)"]
        from qadapt.distributed.layers import quantized_layers

        problems = []
        for name, module in quantized_layers(model, self).items():
            rows, columns = module.weight.shape
            if rows % world_size or (rows * columns // NF4_UNIT) % world_size:
                problems.append(f"{name} ({rows} x {columns}): its rows or its {rows * columns // NF4_UNIT} NF4 scale "
                                f"group(s) do not divide into {world_size} equal shares (torchao splits NF4Tensor "
                                "evenly by rows)")
        return problems

    def requantize(self, module, weight, policy="best", hessian=None):
        """A new layer holding ``weight``; ``policy`` (see qadapt.merging.requant): ``"fresh"`` quantizes ``weight``
        afresh as PEFT does; ``"grid"`` keeps each row's scale and rounds ``weight`` onto it; ``"best"`` (default) also
        re-fits each row's scale by least squares and keeps, per row, whichever candidate (fresh included) is closest
        to ``weight``: never further from ``weight`` than the fresh quantization.
        ``hessian`` (optional, (in, in) = X^T X of the layer's inputs on calibration data): the candidates then also
        include a GPTQ-style rounding onto the original grid, and the layer with the lowest OUTPUT error on those
        inputs is kept (fresh, i.e. PEFT's result, among them)."""
        from qadapt.merging.requant import by_policy

        if _is_nf4(module.weight):
            nf4 = _Nf4Requantizer(self, module, weight)
            return by_policy(self, policy, weight, hessian, nf4.fresh(), nf4.on_grid, lambda: nf4.on_grid(hessian=hessian))
        fresh = self._requantize_fresh(module, weight)
        # the chosen codes are written into a second fresh layer of our own; ``fresh`` stays PEFT's result
        return by_policy(
            self, policy, weight, hessian, fresh,
            lambda chosen: self._requantize_on_grid(module, weight, fresh, self._requantize_fresh(module, weight), chosen),
            lambda: self._requantize_gptq(module, weight, fresh, hessian),
        )

    def _requantize_gptq(self, module, weight, fresh, hessian):
        """GPTQ-style rounding onto the layer's per-row int8 grid; None for layouts it does not cover."""
        if type(module.weight).__name__ != "Int8Tensor":
            return None
        import torch

        from qadapt.merging.requant import affine_columns, gptq_on_grid

        step = module.weight.scale.float().view(-1, 1).expand(*weight.shape)
        on_grid = gptq_on_grid(weight.float().to(step.device), hessian, affine_columns(step, torch.zeros_like(step), -128, 127))
        return self._requantize_on_grid(module, on_grid, fresh, self._requantize_fresh(module, weight), "grid")

    def _requantize_on_grid(self, module, weight, fresh, holder, policy):
        import torch

        from qadapt.merging.requant import best_rows, int8_rows

        old, new = module.weight, holder.weight
        per_row = lambda t: (  # noqa: E731
            type(t).__name__ == "Int8Tensor"
            and list(t.block_size) == [1, t.shape[1]]
            and t.qdata.dtype == torch.int8
            and (t.zero_point is None or not t.zero_point.any())
        )
        if not (per_row(old) and per_row(new)) or old.shape != weight.shape:
            return None  # layouts this arithmetic does not cover: the fresh quantization stands
        target = weight.float().to(old.qdata.device)

        def deq(codes, row_scale):  # torchao's dequantize_affine with zero_point 0, in float32
            return codes.float() * row_scale.float().view(-1, 1)

        candidates = int8_rows(target, old.scale.view(-1), -128, 127, deq)
        if policy == "grid":
            candidates = candidates[:1]
        else:
            candidates.append((fresh.weight.qdata.float(), fresh.weight.scale.view(-1)))
        codes, row_scale, _, _ = best_rows(target, candidates, deq)
        with torch.no_grad():  # ``holder`` is ours alone: write the chosen codes and scales into its tensor
            new.qdata.copy_(codes.to(torch.int8))
            new.scale.copy_(row_scale.view_as(new.scale).to(new.scale.dtype))
        return holder

    def _requantize_fresh(self, module, weight):
        import torch
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        from qadapt.hf import clone_module

        holder = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        with torch.no_grad():
            holder[0].weight.copy_(weight.to(module.weight.dtype))
        holder = holder.to(module.weight.device, module.weight.dtype)
        quantize_(holder, Int8WeightOnlyConfig())
        clone = clone_module(module)
        clone.weight = holder[0].weight
        return clone


class _Nf4Requantizer:
    """A merged weight back onto NF4: afresh (PEFT's way), or onto the layer's own grid (its block scales, as
    de-quantized from their double quantization, kept; each weight rounded to the nearest NF4 value, or GPTQ-style
    with the layer's input statistics). ``"best"`` keeps the closer of the grid layer and the fresh one per layer:
    NF4's double-quantized block scales cannot be re-fitted or mixed block by block without quantizing them again."""

    def __init__(self, backend, module, weight):
        self.backend, self.module, self.weight = backend, module, weight

    def fresh(self):
        from torchao.quantization import NF4Tensor

        old = self.module.weight
        tensor = NF4Tensor.from_tensor(self.weight.to(old.device, old.dtype).contiguous(), old.block_size,
                                       old.scaler_block_size)
        return self._layer(tensor)

    def on_grid(self, policy="grid", hessian=None):
        import torch
        from torchao.quantization import NF4Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import construct_nf4_args

        from qadapt.merging.requant import blockwise_4bit, codebook_columns, gptq_on_grid

        old = self.module.weight
        scales = old.dequantize_scalers(old.quantized_scalers, old.quantization_factor, old.scaler_block_size).float()
        code = old.nf4.float()
        target = self.weight.float().to(old.device)
        if hessian is not None:
            per_weight = scales.repeat_interleave(old.block_size).view_as(target)
            target = gptq_on_grid(target, hessian, codebook_columns(per_weight, code))
        codes, _, _ = blockwise_4bit(target.reshape(-1, old.block_size), scales.view(-1, 1), code)
        codes = codes.reshape(-1)
        packed = (codes[::2] << 4 | codes[1::2]).to(torch.uint8)
        return self._layer(NF4Tensor(*construct_nf4_args(old, {"quantized_data": packed})))

    def _layer(self, tensor):
        import torch

        from qadapt.hf import clone_module

        clone = clone_module(self.module)
        clone.weight = torch.nn.Parameter(tensor, requires_grad=False)
        return clone


def _weight_data(module):
    """The layer's weight as a tensor (a parameter's data; a DTensor's local shard under FSDP2)."""
    import torch

    weight = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Linear) or weight is None:
        return None
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return data.to_local() if hasattr(data, "to_local") else data


def _is_subclass_weight(module):
    import torch

    data = _weight_data(module)
    return data is not None and type(data) is not torch.Tensor and hasattr(data, "dequantize")


def _is_nf4(weight) -> bool:
    return type(weight.data if hasattr(weight, "data") else weight).__name__ == "NF4Tensor"


def _dequantized(weight):
    """``weight`` de-quantized: NF4Tensor's ``get_original_weight()`` (its ``dequantize`` is a code-table lookup),
    the other torchao tensors' ``dequantize()``."""
    data = weight.data if hasattr(weight, "data") else weight
    return data.get_original_weight() if _is_nf4(data) else data.dequantize()


@hookimpl
def register_backends(register):
    register(TorchAOBackend())
