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


class AqlmBackend(QuantBackend):
    name = "aqlm"
    proxy_methods = ("dora", "adalora", "ia3")
    summary = "AQLM additive quantization (M codebooks of 2^B vectors per group of 8/16 weights; 2x8 = 2 bits)"
    requires = ("aqlm", "numba")
    distribution = "aqlm"
    install_hint = "pip install 'qadapt[aqlm]'  (aqlm[cpu]: numba)"
    options = (
        Option("num_codebooks", 2, "M: codebooks summed per weight group (1x16 and 2x8 are AQLM's usual shapes)",
               choices=(1, 2, 3, 4)),
        Option("nbits_per_codebook", 8, "B: each codebook has 2^B entries (8: 256 entries, 16: 65,536)",
               choices=(8, 16)),
        Option("in_group_size", 8, "weights per group along the input dimension", choices=(4, 8, 16)),
        Option("kmeans_iterations", 20, "Lloyd iterations of each codebook's k-means (quantize only)"),
        Option("refine_passes", 3, "code / codebook / scale refinement passes after k-means (quantize only)"),
        Option("seed", 0, "seed of the k-means initialisation (quantize only)"),
        Option("skip_modules", DEFAULT_SKIP, "linear layers kept in full precision (names or name suffixes)",
               type=tuple),
    )

    def check_option_combination(self, options):
        options = dict(options)
        options["skip_modules"] = tuple(options["skip_modules"])
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
        )

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

        from qadapt._hf import load_full_precision, model_dtype

        from ._aqlm_quantize import quantize_weight

        if isinstance(model, (str, os.PathLike)):
            # on CPU, in the dtype its config records (as every backend loads a folder): the codebooks are fitted in
            # float32 whatever it is, and the layers take the model's dtype
            model = load_full_precision(str(model), gpu=False, dtype=model_dtype(str(model)), device_map="cpu")
        not_quantized, capped = [], []
        for name, module in list(model.named_modules()):
            if not isinstance(module, torch.nn.Linear):
                continue
            if _skipped(name, options["skip_modules"]) or module.in_features % options["in_group_size"]:
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
            )
            if result.capped_kmeans:
                capped.append(name)
            model.set_submodule(name, _make_layer(module, result, options))
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
        install_cpu_kernels(model)
        # the codebooks are fitted on CPU; where there is a CUDA GPU the model goes there, as every backend's do
        return model.to("cuda:0") if torch.cuda.is_available() else model

    # ------------------------------------------------------------------ load / save
    def load(self, path, options):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from qadapt._hf import model_dtype, quiet_transformers
        from qadapt.errors import CheckpointError

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
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=model_dtype(path), device_map="cuda:0" if torch.cuda.is_available() else "cpu"
        )
        install_cpu_kernels(model)
        return model

    def is_quantized_checkpoint(self, path):
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
                quant = json.load(handle).get("quantization_config") or {}
        except (OSError, ValueError):
            return False
        return quant.get("quant_method") == "aqlm"

    def save(self, model, path, options):
        import aqlm

        from qadapt._hf import quiet_transformers

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
        try:
            model.save_pretrained(path, safe_serialization=True)
        finally:
            for module, alias in aliases:
                module._parameters["qweight"] = alias

    # ------------------------------------------------------------------ weights
    def dequantize(self, module):
        from ._aqlm_quantize import dequantize_codes

        return dequantize_codes(_unsigned_codes(module), module.codebooks.detach(), module.scales.detach()).to(
            module.codebooks.device
        )

    def requantize(self, module, weight):
        import torch
        from qadapt._hf import clone_module

        from ._aqlm_quantize import reassign_codes

        codes = reassign_codes(weight, _unsigned_codes(module), module.codebooks, module.scales)
        clone = clone_module(module)
        clone.codes = torch.nn.Parameter(
            _pack_codes(codes, module.nbits_per_codebook).to(module.codebooks.device), requires_grad=False
        )
        install_cpu_kernels(clone)
        return clone


# ---------------------------------------------------------------------- layers and kernels
def _make_layer(linear, result, options):
    import aqlm

    dtype = linear.weight.dtype
    layer = aqlm.QuantizedLinear(
        linear.in_features,
        linear.out_features,
        in_group_size=options["in_group_size"],
        out_group_size=1,
        num_codebooks=options["num_codebooks"],
        nbits_per_codebook=options["nbits_per_codebook"],
        bias=linear.bias is not None,
        device="cpu",
        dtype=dtype,
    )
    layer.codes.data = _pack_codes(result.codes, options["nbits_per_codebook"])
    layer.codebooks.data = result.codebooks.to(dtype)
    layer.scales.data = result.scales.to(dtype)
    if linear.bias is not None:
        layer.bias.data = linear.bias.detach().clone()
    layer.requires_grad_(False)
    return layer.to(linear.weight.device)


class _DequantMatmul:
    """Stands in for aqlm's ``gemv_op``/``gemm_op`` (objects with ``apply``): aqlm's de-quantizing function
    (``_dequantize_weight`` + ``F.linear``) with a plain backward, on CPU and CUDA alike. aqlm's own CUDA kernels are
    not used for training: measured on an H100 (aqlm 1.1.7, ``bench/aqlm_cuda_kernels.py``, docs/gpu-runs.md), their
    outputs are right, but for 256-entry codebooks (2x8, 1x8) the gradient their training path (more than 6 rows)
    passes back to the input is wrong by 27% at every shape tried, in float16 and bfloat16; and in float32 they
    refuse to run."""

    def apply(self, input, codes, codebooks, scales, bias):
        return _dequant_function().apply(input, codes, codebooks, scales, bias)


_FUNCTION = None


def _dequant_function():
    global _FUNCTION
    if _FUNCTION is None:
        import torch
        import torch.nn.functional as F
        from aqlm.utils import _dequantize_weight, unpack_int_data

        class DequantizedMatmul(torch.autograd.Function):
            @staticmethod
            def forward(ctx, input, codes, codebooks, scales, bias):
                weight = _dequantize_weight(unpack_int_data(codes, codebooks.shape[1].bit_length() - 1), codebooks, scales)
                ctx.save_for_backward(codes, codebooks, scales)
                return F.linear(input, weight.to(input.dtype), bias)

            @staticmethod
            def backward(ctx, grad_output):
                codes, codebooks, scales = ctx.saved_tensors
                weight = _dequantize_weight(unpack_int_data(codes, codebooks.shape[1].bit_length() - 1), codebooks, scales)
                return grad_output @ weight.to(grad_output.dtype), None, None, None, None

        _FUNCTION = DequantizedMatmul
    return _FUNCTION


_OPS = _DequantMatmul()


def _always(_input):
    return True


def install_cpu_kernels(model_or_layer):
    """Give every aqlm layer qadapt's kernel choice (see the module docstring); codes go back to AQLM's layout."""
    import aqlm

    layers = [model_or_layer] if isinstance(model_or_layer, aqlm.QuantizedLinear) else [
        m for m in model_or_layer.modules() if isinstance(m, aqlm.QuantizedLinear)
    ]
    for layer in layers:
        canonicalize_codes(layer)
        layer.gemv_op = layer.gemm_op = _OPS
        layer.use_gemv_rule = _always
    return model_or_layer


def _codes_permuted(module) -> bool:
    """True when aqlm's CPU ``prepare_matmul_op`` has transposed ``codes`` in place for its numba kernel."""
    if module.gemv_op is None or module.gemv_op is _OPS or module.codebook_size != 256:
        return False
    num_out_groups = module.out_features // module.out_group_size
    num_in_groups = module.in_features // module.in_group_size
    return tuple(module.codes.shape[:2]) == (num_in_groups, num_out_groups)


def canonicalize_codes(module) -> None:
    """Undo aqlm's in-place CPU permutation of ``codes`` (so they can be saved, de-quantized and trained)."""
    if _codes_permuted(module):
        module.codes.data = module.codes.data.permute(1, 0, 2).contiguous()
        module.gemv_op = module.gemm_op = module.use_gemv_rule = None


def _unsigned_codes(module):
    from aqlm.utils import unpack_int_data

    codes = module.codes.detach()
    if _codes_permuted(module):
        codes = codes.permute(1, 0, 2)
    return unpack_int_data(codes, module.nbits_per_codebook).cpu()


# ---------------------------------------------------------------------- small helpers
def _pack_codes(codes, nbits):
    """Unsigned codes -> AQLM's stored signed integers (aqlm.utils.pack_int_data, which runs under
    inference_mode and so returns tensors autograd refuses to save for backward)."""
    from aqlm.utils import get_int_dtype

    codes = codes.long().clone()
    codes[codes >= 2 ** (nbits - 1)] -= 2**nbits
    return codes.to(get_int_dtype(nbits))


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
