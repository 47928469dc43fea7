"""HQQ: half-quadratic quantization, calibration-free, 1-8 bits with grouped scales and zeros.

Drives hqq's own API: transformers' ``HqqConfig`` path raises "not available yet" in transformers 5.x. Each
``nn.Linear`` (``lm_head`` and MoE routers excepted) becomes ``hqq.core.quantize.HQQLinear``; transformers' ``Conv1D``
(GPT-2) and Falcon's ``FalconLinear`` are made ``nn.Linear`` first, and fused MoE experts are split into per-expert
``nn.Linear`` layers with defuser (``qadapt.hf.linearize`` / ``defuse_experts``, recorded with the checkpoint and
replayed on load). HQQ's state dict is all tensors, so the quantized base saves as one safetensors file beside the
model's ``config.json``.

Kernels: ``kernel="default"`` is HQQ's PyTorch backend (de-quantize, then a matmul): it trains, merges and saves.
``kernel="torchao_int4"`` (CUDA, 4-bit, bfloat16) converts each layer to tinygemm's int4 matmul
(``torch.ops.aten._weight_int4pack_mm``) with HQQ's own layer class (``_hqq_int4``: one packing step mended for
torch >= 2.5), the serving kernel of HQQ's ``prepare_for_inference(backend="torchao_int4")`` without that function's
global settings (inductor flags, float32 matmul precision); nothing trains on it: train, merge and save with the
default kernel, then serve ``qadapt.load("DIR/base", backend="hqq", kernel="torchao_int4")``.
"""

from __future__ import annotations

import json
import os

from qadapt.backend import Option, QuantBackend
from qadapt.capabilities import METHODS, declare, no, yes
from qadapt.hookspecs import hookimpl
from qadapt.merging.requant import POLICIES
from qadapt_plugins._hqq_shards import CODES_PER_ROW, SHARDED, ShardingMembers

LAYOUT_FILE = "hqq_layers.json"
WEIGHTS_FILE = "model.safetensors"
THROUGH_PROXY = "PEFT has no HQQ layer for {}: qadapt presents HQQLinear as nn.Linear (forward unchanged)"
SERVING_ONLY = no(
    "kernel='torchao_int4' is tinygemm's int4 inference matmul: PEFT has no layer for it and it has no backward",
    "Train, merge and save with kernel='default' (qadapt.merge, qadapt.save(model, DIR)), then serve "
    "qadapt.load('DIR/base', backend='hqq', kernel='torchao_int4')",
)


class HQQBackend(ShardingMembers, QuantBackend):
    name = "hqq"
    summary = "HQQ half-quadratic quantization (1-8 bits, no calibration)"
    requires = ("hqq.core.quantize",)
    distribution = "hqq"
    install_hint = "pip install 'hqq>=0.2.5' termcolor  (the `hqq` extra of qadapt-lm)"
    proxy_methods = ("vera", "adalora", "ia3")
    requantize_policies = POLICIES
    training_route_compiles = True  # compiled with CUDA graphs on the H200 (docs/gpu-runs.md, 2026-12-01)
    requantize_uses_inputs = True
    peft_dispatchers = ("dispatch_hqq",)
    demo_options = {"bits": 4, "group_size": 64}
    gpu_variants = ({"kernel": "torchao_int4", "compute_dtype": "bfloat16"},)
    options = (
        Option("bits", 4, "bits per weight", choices=(1, 2, 3, 4, 8)),
        Option("group_size", 64, "weights sharing one scale and zero", choices=(16, 32, 64, 128, 256)),
        Option("compute_dtype", "auto", "dtype of the de-quantized matmul ('auto': the model's dtype)",
               choices=("auto", "float32", "bfloat16", "float16"), runtime=True),
        Option("kernel", "default", "the matmul: 'default' (HQQ's PyTorch backend: trains, merges, saves) or "
               "'torchao_int4' (tinygemm's int4 kernel: CUDA, 4-bit, bfloat16, serving only)",
               choices=("default", "torchao_int4"), runtime=True),
    )

    def check_option_combination(self, options):
        from qadapt.errors import InvalidOptionError

        if options["kernel"] == "torchao_int4":
            import torch

            asked = f"backend 'hqq' with kernel='torchao_int4', bits={options['bits']}"
            if not torch.cuda.is_available():
                raise InvalidOptionError(asked, "tinygemm's int4 kernel runs only on a CUDA GPU",
                                         "Use kernel='default' (the default), which runs on CPU and GPU")
            if options["bits"] != 4:
                raise InvalidOptionError(asked, "tinygemm's kernel multiplies 4-bit weights only",
                                         "Pass bits=4, or kernel='default'")
            if options["group_size"] not in (32, 64, 128, 256):
                raise InvalidOptionError(f"{asked}, group_size={options['group_size']}",
                                         "tinygemm's kernel takes groups of 32, 64, 128 or 256",
                                         "Pass group_size=64 (the default)")
            if options["compute_dtype"] not in ("auto", "bfloat16"):
                raise InvalidOptionError(f"{asked}, compute_dtype={options['compute_dtype']!r}",
                                         "tinygemm's kernel computes in bfloat16 only",
                                         "Pass compute_dtype='bfloat16' (or 'auto' on a bfloat16 model)")
        return options

    def install_problems(self):
        from qadapt.hf import is_importable, is_installed

        if is_installed("hqq") and not is_importable("termcolor"):
            return [("`hqq` is installed without `termcolor` (hqq imports it but does not declare it): `import "
                     "transformers` itself fails", "pip install termcolor")]
        return []

    def capabilities(self, options):
        if options.get("kernel") == "torchao_int4":
            return declare(train={method: SERVING_ONLY for method in METHODS}, requantize=SERVING_ONLY,
                           dequantize=SERVING_ONLY, save=SERVING_ONLY)
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
            sharded=SHARDED,
        )

    # ------------------------------------------------------------------ heavy work
    def _quant_config(self, options):
        from hqq.core.quantize import BaseQuantizeConfig

        return BaseQuantizeConfig(nbits=options["bits"], group_size=options["group_size"])

    def full_precision(self, model, options):
        from qadapt.hf import refuse_fused_experts
        from qadapt.inventory import cannot, matmul_weights

        kept = refuse_fused_experts(super().full_precision(model, options), model)
        # HQQ cuts a weight into rows of group_size (hqq.core.quantize: the element count must divide) and packs
        # `rows` of those into one (bitpack: 4-bit halves the row count, 2-bit quarters it, 1-bit eighths it; 3-bit
        # pads): a layer breaking either fails half-way through an in-place conversion, so it is declared here
        group = options["group_size"]
        rows = 1 if options["bits"] == 3 else CODES_PER_ROW[options["bits"]]  # 3-bit pads its int32 rows
        for weight in matmul_weights(model):
            if weight.kind in ("linear", "conv1d") and weight.name not in kept:
                if weight.elements % group or (weight.elements // group) % rows:
                    kept[weight.name] = cannot(
                        f"{weight.shape[0]}x{weight.shape[1]} weights do not split into groups of {group}"
                        + (f" packed {rows} to a row at {options['bits']} bits" if rows > 1 else "")
                        + " (HQQ's layout); use a group_size that divides them")
                elif options.get("kernel") == "torchao_int4" and (weight.shape[0] % 8 or weight.shape[1] % 128):
                    # _convert_weight_to_int4pack's tiles: [out / 8][in / (8 inner k-tiles x 16)]
                    kept[weight.name] = cannot(
                        f"{weight.shape[0]}x{weight.shape[1]} weights do not fit tinygemm's int4 tiles (out_features "
                        "a multiple of 8, in_features of 128); use kernel='default'")
        return kept

    def quantize(self, model, options, calibration=None):
        from qadapt.hf import (default_device, load_full_precision, prepare_linear_layers, replace_module,
                               to_default_device)

        if isinstance(model, str):
            model = load_full_precision(model, gpu=False)
        compute_dtype = _compute_dtype(options, model.dtype)
        _check_kernel_dtype(options, compute_dtype)  # before anything converts the model in place
        kept = self.full_precision(model, options)
        prepare_linear_layers(model)
        quant_config = self._quant_config(options)
        device = default_device()
        for name, module in _linear_layers(model, kept):
            replace_module(model, name, self._make(module, quant_config, compute_dtype, device))
        return _with_kernel(to_default_device(model), options)

    def _make(self, linear, quant_config, compute_dtype, device):
        from ._hqq_layers import HQQLinear as AutocastSafeHQQLinear

        # del_orig frees the full-precision weight as each layer is quantized (an in-memory model is converted in place).
        return AutocastSafeHQQLinear(linear, quant_config=quant_config, compute_dtype=compute_dtype, device=device,
                                     del_orig=True)

    def save(self, model, path, options):
        from safetensors.torch import save_file

        from hqq.core.quantize import HQQLinear

        from qadapt.hf import mark_qadapt_only, save_config, save_conversions, unshared_state_dict

        layers = [name for name, module in model.named_modules() if isinstance(module, HQQLinear)]
        state = unshared_state_dict(model)  # tied embeddings: safetensors refuses tensors that share memory
        save_config(model, path)
        save_conversions(model, path)
        save_file(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt", "qadapt_backend": "hqq"})
        with open(os.path.join(path, LAYOUT_FILE), "w") as handle:
            json.dump({"layers": layers, "options": options}, handle, indent=2)
        # HQQ's tensors (W_q, scale, zero) under names transformers does not know: it would load random weights
        mark_qadapt_only(path, self.name, f"HQQ layers in qadapt's layout ({LAYOUT_FILE})")

    def load(self, path, options):
        from safetensors.torch import load_file

        from qadapt.hf import default_device, model_from_config, replace_module, to_default_device

        from ._hqq_layers import HQQLinear as AutocastSafeHQQLinear

        with open(os.path.join(path, LAYOUT_FILE)) as handle:
            layout = json.load(handle)
        # what the layers are comes from the layout; how they run (compute_dtype) from the caller
        runtime = {option.name for option in self.options if option.runtime}
        options = {**options, **{k: v for k, v in layout.get("options", {}).items() if k not in runtime}}
        model = model_from_config(path)  # the module layout it was saved from (split experts, Conv1D as nn.Linear)
        state = load_file(os.path.join(path, WEIGHTS_FILE))
        compute_dtype = _compute_dtype(options, model.dtype)
        _check_kernel_dtype(options, compute_dtype)
        device = default_device()
        for name in layout["layers"]:
            layer = AutocastSafeHQQLinear(None, quant_config=self._quant_config(options), compute_dtype=compute_dtype,
                                          device=device)
            prefix = name + "."
            layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            replace_module(model, name, layer)
        rest = {k: v for k, v in state.items() if not any(k.startswith(n + ".") for n in layout["layers"])}
        missing, unexpected = model.load_state_dict(rest, strict=False)[:2]
        missing = [k for k in missing if not any(k.startswith(n + ".") for n in layout["layers"])]
        if missing or unexpected:
            raise ValueError(f"HQQ checkpoint does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        # the HQQ layers are on the device already; embeddings, norms and head join them
        return _with_kernel(to_default_device(model), options).eval()

    def folder_options(self, path):
        """qadapt's own layout (``hqq_layers.json``); transformers' ``HqqConfig`` folders are refused: transformers
        5.23 cannot load them either ("QuantizationMethod.HQQ is not available yet")."""
        from qadapt.errors import IncompatibleError
        from qadapt.hf import folder_quantization_config, layout_options

        options = layout_options(path, LAYOUT_FILE, self)
        if options is not None:
            return options
        if str((folder_quantization_config(path) or {}).get("quant_method", "")).lower() == "hqq":
            raise IncompatibleError(
                f"load {path!r}", "its config.json holds transformers' HqqConfig layout (quant_method='hqq'), which "
                "qadapt's hqq backend does not read (and transformers 5.23 cannot load: 'not available yet')",
                "Quantize the full-precision model with qadapt.load(path, backend='hqq')",
            )
        return None

    def quantized_layer_types(self):
        from hqq.core.quantize import HQQLinear

        return (HQQLinear, *_int4_layer_types())

    def dequantize(self, module):
        return module.dequantize().float()

    def training_dequantizer(self, module):
        """``HQQLinear.dequantize()`` (what HQQ's default training backend runs in its forward and backward), in the
        layer's compute dtype."""
        return lambda dtype: module.dequantize()

    def requantize(self, module, weight, policy="best", hessian=None):
        """A new HQQLinear holding ``weight``; ``policy`` (see qadapt.merging.requant): ``"fresh"`` quantizes ``weight``
        afresh as PEFT does; ``"grid"`` keeps each group's scale and zero and rounds ``weight`` onto them; ``"best"``
        (default) also re-fits each group's scale and zero by least squares and keeps, per group, whichever candidate
        (fresh included) is closest to ``weight``: never further from ``weight`` than the fresh quantization.
        ``hessian`` (optional, (in, in) = X^T X of the layer's inputs on calibration data): the candidates then also
        include a GPTQ-style rounding onto the original grid, and the layer with the lowest OUTPUT error on those
        inputs is kept (fresh, i.e. PEFT's result, among them)."""
        from qadapt.merging.requant import by_policy

        fresh = self._requantize_fresh(module, weight)
        return by_policy(self, policy, weight, hessian, fresh,
                         lambda chosen: self._requantize_on_grid(module, weight, fresh, chosen),
                         lambda: self._requantize_gptq(module, weight, fresh, hessian))

    def _requantize_gptq(self, module, weight, fresh, hessian):
        """GPTQ-style rounding onto the layer's original grid (its groups' scales and zeros)."""
        from qadapt.merging.requant import affine_columns, gptq_on_grid

        meta = module.meta
        out_features, in_features = weight.shape
        group_size = int(meta["group_size"])
        if meta.get("axis") != 1 or in_features % group_size or meta.get("quant_scale") or meta.get("quant_zero"):
            return None
        scale = meta["scale"].float().repeat_interleave(group_size).view(out_features, in_features)
        zero = meta["zero"].float().repeat_interleave(group_size).view(out_features, in_features)
        rounding = affine_columns(scale, zero, 0, 2 ** int(meta["nbits"]) - 1)
        on_grid = gptq_on_grid(weight.float().to(module.W_q.device), hessian, rounding)
        return self._requantize_on_grid(module, on_grid, fresh, "grid")

    def _requantize_on_grid(self, module, weight, fresh, policy):
        import torch
        from hqq.core.quantize import Quantizer

        from qadapt.hf import clone_module

        from qadapt.merging.requant import affine_groups, best_groups

        meta = module.meta
        plain = (
            meta.get("packing") in Quantizer.unpack
            and int(meta["nbits"]) in (1, 2, 4, 8)
            and meta.get("axis") == 1
            and not meta.get("quant_scale")
            and not meta.get("quant_zero")
            and not meta.get("view_as_float")
            and "zero_scale" not in meta
            and not getattr(module, "offload_meta", False)
            and fresh.meta.get("packing") == meta.get("packing")
            and all(not fresh.meta.get(k) for k in ("quant_scale", "quant_zero", "view_as_float"))
            and "zero_scale" not in fresh.meta
        )
        if not plain:
            return None  # layouts this arithmetic does not cover: the fresh quantization stands
        packing, nbits, group_size = meta["packing"], int(meta["nbits"]), int(meta["group_size"])
        compute_dtype = meta.get("compute_dtype", module.compute_dtype)
        device = module.W_q.device
        target = weight.float().to(device).reshape(-1, group_size)

        def deq(q, scale, zero):  # HQQ's Quantizer.dequantize: (W_r - zero) * scale in the compute dtype
            return ((q.to(compute_dtype) - zero) * scale).float()

        old_q = Quantizer.unpack[packing](module.W_q, dtype=torch.uint8)[: target.shape[0]].float()
        scale, zero = meta["scale"], meta["zero"]
        if old_q.shape != target.shape or scale.shape[0] != target.shape[0]:
            return None
        candidates = affine_groups(target, scale, zero, nbits, deq, iterations=0 if policy == "grid" else 2)
        if policy != "grid":
            fresh_q = Quantizer.unpack[packing](fresh.W_q, dtype=torch.uint8)[: target.shape[0]].float()
            candidates.append((fresh_q, fresh.meta["scale"].to(scale.dtype), fresh.meta["zero"].to(zero.dtype)))
        q, new_scale, new_zero, _, _ = best_groups(target, candidates, deq)
        new = clone_module(fresh)
        new.meta = {**fresh.meta, "scale": new_scale.contiguous(), "zero": new_zero.contiguous()}
        new.W_q = torch.nn.Parameter(Quantizer.pack[packing](q.to(torch.uint8)), requires_grad=False)
        return new

    def _requantize_fresh(self, module, weight):
        import torch

        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        # HQQLinear consumes its quant_config dict; rebuild it from the layer's own metadata.
        quant_config = self._quant_config({"bits": int(module.meta["nbits"]), "group_size": int(module.meta["group_size"])})
        return self._make(linear, quant_config, module.compute_dtype, module.device)


def _int4_layer_types():
    import torch

    if not torch.cuda.is_available():  # the kernel's module is imported only where it can run
        return ()
    from ._hqq_int4 import TinygemmInt4Linear

    return (TinygemmInt4Linear,)


def _check_kernel_dtype(options, compute_dtype):
    import torch

    from qadapt.errors import InvalidOptionError

    if options.get("kernel") == "torchao_int4" and compute_dtype != torch.bfloat16:
        raise InvalidOptionError(f"backend 'hqq' with kernel='torchao_int4' on a {compute_dtype} model",
                                 "tinygemm's kernel computes in bfloat16 only",
                                 "Pass compute_dtype='bfloat16'")


def _with_kernel(model, options):
    """``model`` with every HQQ layer converted to ``options["kernel"]`` (nothing to do for "default")."""
    if options.get("kernel", "default") == "default":
        return model
    import torch
    from hqq.core.quantize import HQQLinear

    from qadapt.hf import replace_module

    from ._hqq_int4 import TinygemmInt4Linear

    names = [name for name, module in model.named_modules() if isinstance(module, HQQLinear)]
    for name in names:  # by name, so that each HQQ layer is freed once its replacement is in
        replace_module(model, name, TinygemmInt4Linear.from_hqq(model.get_submodule(name)))
    torch.cuda.empty_cache()
    return model


def _compute_dtype(options, model_dtype):
    import torch

    return model_dtype if options["compute_dtype"] == "auto" else getattr(torch, options["compute_dtype"])


def _linear_layers(model, kept):
    import torch

    output = model.get_output_embeddings()
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output and name not in kept
    ]


@hookimpl
def register_backends(register):
    register(HQQBackend())
