"""AQLM: additive quantization (Egiazarian et al., 2024): each group of 8 weights is the sum of M codebook vectors.

Layers are the ``aqlm`` package's own ``aqlm.QuantizedLinear`` (codes, codebooks and scales in AQLM's layout);
checkpoints are what transformers' ``AqlmConfig`` loads (``quantization_config`` with ``quant_method: aqlm``).

* ``load`` reads AQLM checkpoints (ours or the published ``*-AQLM-*-hf`` ones) through transformers'
  AQLM integration, with one fix: transformers 5.23 matches ``linear_weights_not_to_quantize`` against module
  names, while AQLM checkpoints list weight names (``lm_head.weight``), so the listed layers would be replaced by
  empty AQLM layers. qadapt adds the module names before loading.
* ``quantize`` is real: the ``aqlm`` pip package has no quantizer, so qadapt runs AQLM's first stage itself
  (residual k-means codebooks, greedy code refinement, per-output-channel scales; see ``_aqlm_quantize``). It is
  data-free: AQLM's calibrated beam search and codebook fine-tuning are not run.
* CPU kernels: aqlm 1.1.7's CPU path for 256-entry codebooks (1x8, 2x8) is a numba LUT kernel that (a) permutes
  ``codes`` in place on first use, which breaks the backward pass and any later save or de-quantization, and (b)
  races: its ``prange`` loop adds into shared output elements, so with more than one numba thread results are wrong
  and change from call to call (measured: errors of 30% of the output's magnitude on 2 cores). qadapt therefore
  gives every AQLM layer on CPU aqlm's own de-quantizing kernel (``_dequantize_weight`` + ``F.linear``) for forward
  and backward, and on CUDA too (see ``_DequantMatmul``: aqlm's CUDA training kernels for 256-entry codebooks pass
  back a wrong input gradient, measured on an H100).
* Serving kernel: ``kernel="aqlm"`` (CUDA, float16/bfloat16) leaves the layers to aqlm's own kernels, whose outputs
  were measured right and which do not rebuild the whole weight for every token. Nothing trains on it (their input
  gradient is wrong): train with ``kernel="dequantize"``, then load the saved adapter onto a ``kernel="aqlm"`` base,
  as for GPTQ/AWQ on Marlin.
"""

from __future__ import annotations

import json
import os
import warnings

from qadapt.backend import Option, QuantBackend
from qadapt.capabilities import declare, no, yes
from qadapt.hookspecs import hookimpl

#: what AQLM leaves in full precision when nothing else is asked (its convert_to_hf.py does the same)
DEFAULT_SKIP = ("lm_head",)
#: ``kernel`` values: qadapt's de-quantizing matmul (trainable, CPU and CUDA) and aqlm's own CUDA kernels (serving)
KERNELS = ("dequantize", "aqlm")
SERVING_ONLY = no(
    "aqlm's own CUDA kernels (kernel='aqlm') pass back a wrong input gradient for 256-entry codebooks (27%, measured "
    "on an H100, docs/aqlm.md): qadapt serves on them and does not train",
    "Train with kernel='dequantize' (the default; CUDA too), then load the saved adapter onto a kernel='aqlm' base "
    "with qadapt.load_adapter to serve it",
)


class AqlmBackend(QuantBackend):
    name = "aqlm"
    proxy_methods = ("dora", "adalora", "ia3")
    peft_dispatchers = ("dispatch_aqlm",)
    #: a short codebook fit for the demo (the default 20 k-means iterations and 3 passes take ~90 s on 2 cores)
    demo_options = {"num_codebooks": 2, "nbits_per_codebook": 8, "kmeans_iterations": 4, "refine_passes": 1}
    matrix_variants = ({"num_codebooks": 2, "nbits_per_codebook": 8}, {"num_codebooks": 1, "nbits_per_codebook": 8},
                       {"num_codebooks": 1, "nbits_per_codebook": 16})
    summary = "AQLM additive quantization (M codebooks of 2^B vectors per group of 8/16 weights; 2x8 = 2 bits)"
    requires = ("aqlm", "numba")
    distribution = "aqlm"
    install_hint = "pip install 'aqlm[cpu]>=1.1.6'  (the `aqlm` extra of qadapt-lm; [cpu] brings numba)"
    options = (
        Option("num_codebooks", 2, "M: codebooks summed per weight group (1x16 and 2x8 are AQLM's usual shapes)",
               choices=(1, 2, 3, 4)),
        Option("nbits_per_codebook", 8, "B: each codebook has 2^B entries (8: 256 entries, 16: 65,536)",
               choices=(8, 16)),
        Option("in_group_size", 8, "weights per group along the input dimension", choices=(4, 8, 16)),
        Option("kmeans_iterations", 20, "Lloyd iterations of each codebook's k-means (quantize only)", minimum=0),
        Option("refine_passes", 3, "code / codebook / scale refinement passes after k-means (quantize only)",
               minimum=0),
        Option("seed", 0, "seed of the k-means initialisation (quantize only)", minimum=0, maximum=2**32 - 1),
        Option("skip_modules", DEFAULT_SKIP, "linear layers kept in full precision (names or name suffixes)",
               type=tuple, items=str),
        Option("kernel", "dequantize", "'dequantize' (qadapt's de-quantizing matmul: CPU and CUDA, trainable) or "
               "'aqlm' (aqlm's own CUDA kernels, float16/bfloat16: serving only, faster)", choices=KERNELS,
               runtime=True),
    )

    def check_option_combination(self, options):
        options = dict(options)
        options["skip_modules"] = tuple(options["skip_modules"])
        if options["kernel"] == "aqlm":
            import torch

            if not torch.cuda.is_available():
                from qadapt.errors import InvalidOptionError

                raise InvalidOptionError(
                    "backend 'aqlm' with kernel='aqlm'", "qadapt uses aqlm's own kernels on a CUDA GPU only: on CPU its "
                    "numba kernel for 256-entry codebooks permutes the codes in place and races on several threads",
                    "Use kernel='dequantize' (the default), which runs on CPU and GPU")
        return options

    # ------------------------------------------------------------------ environment
    def check_environment(self):
        env = super().check_environment()
        if env.ok:
            env.details["cpu_kernel"] = (
                "aqlm's de-quantizing kernel, set by qadapt (aqlm's numba kernel for 256-entry codebooks permutes "
                "codes in place and races on several threads)"
            )
        return env

    # ------------------------------------------------------------------ capabilities
    def capabilities(self, options):
        if options.get("kernel") == "aqlm":
            from qadapt.capabilities import METHODS

            return declare(
                train={method: SERVING_ONLY for method in METHODS},
                requantize=no("a kernel='aqlm' base serves only", "Load the model with kernel='dequantize' to merge"),
                dequantize=yes("codes, codebooks and scales de-quantize exactly (aqlm's own _dequantize_weight)"),
                save=yes("transformers' AQLM format (aqlm's CUDA kernels read the codes as they are stored)"),
                sharded={engine: SERVING_ONLY for engine in ("fsdp2", "zero3")},
            )
        shape = f"{options['num_codebooks']}x{options['nbits_per_codebook']}"
        kernel = (
            f"on CPU qadapt runs {shape} layers with aqlm's de-quantizing kernel in forward and backward"
            + (" instead of aqlm's numba LUT kernel, whose backward fails after it permutes codes in place"
               if options["nbits_per_codebook"] == 8 else "")
        )
        lora = yes(f"PEFT's AqlmLoraLinear (dispatch_aqlm); {kernel}")
        return declare(
            train={
                "lora": lora,
                "dora": yes("PEFT's AqlmLoraLinear refuses DoRA, so qadapt presents the layer as nn.Linear "
                            f"(weight de-quantized on access) to PEFT's DoRA; {kernel}"),
                "vera": yes(f"PEFT's VeRA Linear over aqlm layers (PEFT's forward-only aqlm backend); {kernel}"),
                "adalora": yes("PEFT's AdaLoRA has no layer for aqlm.QuantizedLinear: qadapt presents it as "
                               f"nn.Linear (forward unchanged); {kernel}"),
                "ia3": yes("PEFT's IA3 has no layer for aqlm.QuantizedLinear: qadapt presents it as nn.Linear "
                           f"(forward unchanged); {kernel}"),
            },
            requantize=no(
                "re-quantizing a merged weight with the layer's same codebooks and scales (the only way to keep the "
                "AQLM layer as it is) loses the adapter: a change under ~5% of the weight's norm changes no code, "
                "and on the toy model the merged output stays further from the adapter model than the base model "
                "is (measured by qadapt's conformance kit; numbers in docs/aqlm.md)",
                "Use merge(strategy='dequantize') for an exact full-precision merge, or keep the adapter separate",
            ),
            dequantize=yes("codes, codebooks and scales de-quantize exactly (aqlm's own _dequantize_weight)"),
            save=yes("transformers' AQLM format: safetensors codes/codebooks/scales + quantization_config"),
            sharded={engine: no(f"not verified under {engine}: no sharded run of AQLM layers (integer codes as a "
                                "parameter, codebooks and scales) was made", "Train sharded with bnb bits=4")
                     for engine in ("fsdp2", "zero3")},
        )

    # ------------------------------------------------------------------ scope
    def full_precision(self, model, options):
        """Head and routers by design, and the ``skip_modules``; it cannot take a layer whose input size is not a
        multiple of ``in_group_size`` (left in full precision silently before), transformers' ``Conv1D`` or fused MoE
        experts: their checkpoints are reloaded by transformers' AQLM integration, which builds the model from its
        config (Conv1D, fused experts) and replaces only ``nn.Linear`` layers (transformers 5.23
        integrations/aqlm.py), so converting them when quantizing would not survive a reload."""
        from qadapt.inventory import by_design, cannot, matmul_weights

        kept = super().full_precision(model, options)
        for weight in matmul_weights(model):
            if weight.name in kept:
                continue
            if _skipped(weight.name, options["skip_modules"]):
                kept[weight.name] = by_design("listed in skip_modules")
            elif weight.kind == "conv1d":
                kept[weight.name] = cannot("transformers' Conv1D: AQLM checkpoints are reloaded by transformers' AQLM "
                                           "integration, which replaces nn.Linear layers only")
            elif weight.kind == "experts":
                kept[weight.name] = cannot("fused MoE expert parameter: AQLM checkpoints are reloaded by transformers' "
                                           "AQLM integration, which builds fused experts and replaces nn.Linear only")
            elif weight.kind == "linear" and weight.shape[1] % options["in_group_size"]:
                kept[weight.name] = cannot(f"in_features {weight.shape[1]} is not a multiple of in_group_size "
                                           f"{options['in_group_size']}")
        return kept

    # ------------------------------------------------------------------ helpers
    def quantized_layer_types(self):
        import aqlm

        return (aqlm.QuantizedLinear,)

    def _aqlm_config(self, options, not_quantized):
        from transformers import AqlmConfig

        return AqlmConfig(
            in_group_size=options["in_group_size"],
            out_group_size=1,
            num_codebooks=options["num_codebooks"],
            nbits_per_codebook=options["nbits_per_codebook"],
            linear_weights_not_to_quantize=_with_module_names(sorted(not_quantized)),
        )

    # ------------------------------------------------------------------ quantize
    def quantize(self, model, options, calibration=None):
        import torch
        from transformers.quantizers.quantizer_aqlm import AqlmHfQuantizer

        from qadapt.hf import default_device, load_full_precision, model_dtype, to_default_device

        from ._aqlm_layers import make_layer
        from ._aqlm_quantize import quantize_weight

        if isinstance(model, (str, os.PathLike)):
            # on CPU, in the dtype its config records (as every backend loads a folder): the codebooks are fitted in
            # float32 whatever it is, and the layers take the model's dtype
            model = load_full_precision(str(model), gpu=False, dtype=model_dtype(str(model)), device_map="cpu")
        _check_serving_dtype(options, model.dtype, "quantize for kernel='aqlm'")  # before any work
        kept = self.full_precision(model, options)
        # the k-means runs where the model will run (a CUDA GPU makes an 8B model's minutes, not hours on the host);
        # the layers are built on the CPU and the model moved after, as before
        fit_on = default_device()
        not_quantized, capped = [], []
        for name, module in list(model.named_modules()):
            if not isinstance(module, torch.nn.Linear):
                continue
            if name in kept or _skipped(name, options["skip_modules"]):
                not_quantized.append(f"{name}.weight")
                continue
            result = quantize_weight(
                module.weight,
                in_group_size=options["in_group_size"],
                num_codebooks=options["num_codebooks"],
                nbits_per_codebook=options["nbits_per_codebook"],
                kmeans_iterations=options["kmeans_iterations"],
                refine_passes=options["refine_passes"],
                seed=options["seed"],
                device=fit_on,
            )
            if result.capped_kmeans:
                capped.append(name)
            model.set_submodule(name, make_layer(module, result, options))
        if capped:
            warnings.warn(
                f"AQLM {options['num_codebooks']}x{options['nbits_per_codebook']}: {len(capped)} layer(s) have fewer "
                f"weight groups than codebook entries (e.g. {capped[0]}): every group is stored exactly and the "
                "codebook is larger than the weight it encodes. Use nbits_per_codebook=8 for small layers.",
                stacklevel=2,
            )
        config = self._aqlm_config(options, not_quantized)
        quantizer = AqlmHfQuantizer(config, pre_quantized=True)
        # what transformers' from_pretrained sets on an AQLM model it loads
        model.hf_quantizer = quantizer
        model.is_quantized = True
        model.quantization_method = config.quant_method
        model.config.quantization_config = config
        model.config._is_quantized = True
        # where there is a CUDA GPU the model goes there, as every backend's do
        return _install_kernel(to_default_device(model), options)

    # ------------------------------------------------------------------ load / save
    def load(self, path, options):
        from transformers import AutoConfig, AutoModelForCausalLM

        from qadapt.errors import CheckpointError
        from qadapt.hf import default_device, model_dtype, quiet_transformers

        quiet_transformers()
        config_file = os.path.join(path, "config.json")
        if not os.path.exists(config_file):
            raise CheckpointError(f"load AQLM model from {path}", "config.json is missing", "Pass a folder from qadapt.save")
        with open(config_file, encoding="utf-8") as handle:
            quant = json.load(handle).get("quantization_config") or {}
        if quant.get("quant_method") != "aqlm":
            raise CheckpointError(
                f"load AQLM model from {path}",
                f"its config.json has no AQLM quantization_config (quant_method={quant.get('quant_method')!r})",
                "Quantize it first: qadapt.load(path, backend='aqlm') on a full-precision folder",
            )
        config = AutoConfig.from_pretrained(path)
        quant = dict(config.quantization_config)
        quant["linear_weights_not_to_quantize"] = _with_module_names(quant.get("linear_weights_not_to_quantize") or [])
        config.quantization_config = quant
        # in the dtype the checkpoint records, as every backend loads a folder (qadapt's de-quantizing kernel, not
        # aqlm's float32-only numba one, runs on CPU)
        _check_serving_dtype(options, model_dtype(path), f"load {path!r} with kernel='aqlm'")
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=model_dtype(path), device_map=default_device(), use_safetensors=True
        )
        return _install_kernel(model, options)

    def folder_options(self, path):
        """transformers' ``AqlmConfig`` (``quant_method: aqlm``): the codebook shape, and the layers left in full
        precision (weight names there; module names here). The k-means settings are quantize-time only."""
        from qadapt.hf import folder_quantization_config

        quant = folder_quantization_config(path) or {}
        if quant.get("quant_method") != "aqlm":
            return None
        if quant.get("out_group_size", 1) != 1:
            from qadapt.errors import IncompatibleError

            raise IncompatibleError(f"load {path!r}", f"its AQLM layers have out_group_size={quant['out_group_size']}",
                                    "qadapt's aqlm backend handles out_group_size=1 only")
        skipped = {name[: -len(".weight")] if name.endswith(".weight") else name
                   for name in quant.get("linear_weights_not_to_quantize") or ()}
        return {"num_codebooks": quant.get("num_codebooks", 1), "nbits_per_codebook": quant.get("nbits_per_codebook", 16),
                "in_group_size": quant.get("in_group_size", 8), "skip_modules": tuple(sorted(skipped))}

    def save(self, model, path, options):
        import aqlm

        from qadapt.hf import quiet_transformers

        from ._aqlm_layers import canonicalize_codes

        quiet_transformers()
        aliases = []
        for module in model.modules():
            if isinstance(module, aqlm.QuantizedLinear):
                canonicalize_codes(module)
                # PEFT's dispatch_aqlm sets `target.qweight = target.codes` on the layer it wraps: a second name
                # for the codes that is not part of AQLM's format (and that safetensors refuses as a shared tensor)
                alias = module._parameters.get("qweight")
                if alias is not None and alias is module.codes:
                    aliases.append((module, alias))
                    del module._parameters["qweight"]
        from qadapt.hf import saving_pre_quantized

        try:
            with saving_pre_quantized(model):
                model.save_pretrained(path, safe_serialization=True)
        finally:
            for module, alias in aliases:
                module._parameters["qweight"] = alias

    # ------------------------------------------------------------------ weights
    def dequantize(self, module):
        from ._aqlm_layers import unsigned_codes
        from ._aqlm_quantize import dequantize_codes

        return dequantize_codes(unsigned_codes(module), module.codebooks.detach(), module.scales.detach()).to(
            module.codebooks.device
        )

    def training_dequantizer(self, module):
        """aqlm's own de-quantization (``_dequantize_weight``), what qadapt's AQLM training kernel runs."""
        from ._aqlm_layers import training_weight

        return lambda dtype: training_weight(module).to(dtype)

    def requantize(self, module, weight):
        import torch

        from qadapt.hf import clone_module

        from ._aqlm_layers import install_cpu_kernels, pack_codes, unsigned_codes
        from ._aqlm_quantize import reassign_codes

        codes = reassign_codes(weight, unsigned_codes(module), module.codebooks, module.scales)
        clone = clone_module(module)
        clone.codes = torch.nn.Parameter(
            pack_codes(codes, module.nbits_per_codebook).to(module.codebooks.device), requires_grad=False
        )
        install_cpu_kernels(clone)
        return clone


# ---------------------------------------------------------------------- kernels
def _check_serving_dtype(options, dtype, asked):
    import torch

    if options.get("kernel") == "aqlm" and dtype not in (torch.float16, torch.bfloat16):
        from qadapt.errors import InvalidOptionError

        raise InvalidOptionError(asked, f"aqlm's CUDA kernels compute in float16 or bfloat16 only; the model is {dtype}",
                                 "Quantize a float16/bfloat16 model (model.to(torch.bfloat16)), or use "
                                 "kernel='dequantize'")


def _install_kernel(model, options):
    """qadapt's de-quantizing matmul on every AQLM layer, or (``kernel='aqlm'``, its dtype checked by the caller before
    any work) aqlm's own kernels, chosen by aqlm at the first forward, with a guard that refuses a forward in training
    mode with gradients on."""
    from ._aqlm_layers import install_cpu_kernels, install_serving_kernels

    if options.get("kernel", "dequantize") == "dequantize":
        return install_cpu_kernels(model)
    return install_serving_kernels(model)


# ---------------------------------------------------------------------- small helpers
def _skipped(name, patterns):
    return any(name == p or name.endswith("." + p) for p in patterns)


def _with_module_names(names):
    """AQLM lists weights (``lm_head.weight``); transformers >= 5 matches module names: list both."""
    out = list(names)
    for name in names:
        if name.endswith(".weight") and name[: -len(".weight")] not in out:
            out.append(name[: -len(".weight")])
    return out


@hookimpl
def register_backends(register):
    register(AqlmBackend())
