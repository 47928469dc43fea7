"""EETQ: int8 weight-only quantization (per output channel, symmetric) for CUDA, and EETQ-format weights in torch.

EETQ (NetEase-FuXi/EETQ) quantizes a weight ``W`` (out x in) as ``q = clamp(round(W / s), -128, 127)`` with one
scale per output channel ``s = max|W_row| / 128`` (float16), then *preprocesses* the int8 matrix ``q^T`` (in x out)
for its CUTLASS kernel (``csrc/cutlass_kernels/cutlass_preprocessors.cc``, from FasterTransformer). For SM75-SM89
that layout is, in order:

1. ``permute_B_rows_for_mixed_gemm``: in every 16-row tile, rows are reordered 0 1 8 9 2 3 10 11 4 5 12 13 6 7 14 15;
2. ``subbyte_transpose``: to column-major (out x in);
3. ``interleave_column_major_tensor``: ColumnMajorTileInterleave<64, 2>: each pair of columns is interleaved in
   64-element tiles;
4. ``add_bias_and_interleave_int8s_inplace``: +128 on every byte (unsigned), then bytes 1 and 2 of every 4 swapped.

The stored tensor keeps the shape (in x out). transformers' EETQ integration saves it as ``<layer>.weight`` with
``<layer>.weight_scales`` (float16) and ``quantization_config = {"quant_method": "eetq", "weights": "int8"}``.

Where EETQ itself cannot run (no wheel for this Python, no CUDA, SM90+ refused with "Unsupported Arch", transformers
5 fetching EETQ's kernels from the Hub at run time), this plugin's ``kernel="torch"`` route undoes that layout
(``_eetq_layers.unpreprocess_int8``, on the weight's device) and computes ``x @ (q * s)^T`` with the de-quantized weight in
torch, on any device; in training the weight is de-quantized again in the backward rather than kept. The
layout code is a re-implementation from EETQ's source; it is checked against EETQ's own ``quant_weights`` only by
the GPU test ``test_layout_matches_eetq_library``, which needs a machine where EETQ runs.
"""

from __future__ import annotations

import json
import os
import sys

from qadapt.backend import Environment, Option, QuantBackend
from qadapt.capabilities import declare, no, yes
from qadapt.hookspecs import hookimpl

#: EETQ's int8 tile: both weight dimensions must be multiples of it (its kernels and its layout)
TILE = 64
WEIGHTS_FILE = "model.safetensors"
THROUGH_PROXY = yes(
    "PEFT has no custom-layer hook for this method and its EETQ support is forward-only: qadapt presents the layer "
    "as nn.Linear (forward unchanged, weight de-quantized on access)"
)


def library_problem():
    """Why EETQ's own library cannot run here, or None if it can. Never raises."""
    try:
        import eetq  # noqa: F401  (importable at all?)
    except Exception as exc:
        if sys.version_info[:2] != (3, 10):
            return (
                f"eetq is not importable ({type(exc).__name__}: {exc}); PyPI's only build (eetq 1.0.0, 2024) is one "
                f"cp310 wheel and this is Python {sys.version_info[0]}.{sys.version_info[1]}; building it needs the "
                "CUDA toolkit and CUTLASS"
            )
        return f"eetq is not importable ({type(exc).__name__}: {exc})"
    try:
        import torch
    except Exception as exc:  # pragma: no cover
        return f"torch is not importable ({exc})"
    if not torch.cuda.is_available():
        return "EETQ's kernels need a CUDA GPU and torch sees none"
    major, minor = torch.cuda.get_device_capability()
    sm = 10 * major + minor
    if sm >= 90:
        return (f"EETQ's CUTLASS kernels refuse compute capability {major}.{minor} ('Unsupported Arch' for SM90 and "
                "newer; EETQ issues #12 and #30)")
    if sm < 75:
        return f"EETQ's kernels need compute capability 7.5-8.9; this GPU is {major}.{minor}"
    return None


class EETQBackend(QuantBackend):
    name = "eetq"
    proxy_methods = ("dora", "vera", "adalora", "ia3")
    peft_dispatchers = ()  # qadapt's own LoRA layer, through LoRA's custom-module hook
    summary = "EETQ int8 weight-only (per-channel); EETQ's CUDA kernels, or its weight format run in torch"
    requires = ()
    distribution = "eetq"
    install_hint = "pip install eetq (Python 3.10 wheel only; CUDA GPU of compute capability 7.5-8.9)"
    options = (
        Option("kernel", "auto", "eetq: EETQ's CUDA kernel; torch: de-quantize EETQ's format and matmul in torch; "
               "auto: eetq where it runs, else torch", choices=("auto", "eetq", "torch"), runtime=True),
    )

    # ------------------------------------------------------------------ environment
    def check_environment(self) -> Environment:
        problem = library_problem()
        transformers_path = (
            "transformers 5's EetqConfig path is not used: it downloads EETQ's kernels from the Hugging Face Hub "
            "(kernels-community/quantization-eetq) at run time"
        )
        try:
            import torch  # noqa: F401
        except Exception as exc:  # pragma: no cover
            return Environment(ok=False, reason=f"torch is not importable ({exc})")
        if problem is None:
            return Environment(ok=True, version=self.library_version(),
                               details={"kernel": "eetq", "transformers": transformers_path})
        return Environment(
            ok=True,
            version=self.library_version(),
            reason=f"EETQ's own kernels cannot run here: {problem}",
            hint="kernel='torch' (the default 'auto' here) runs EETQ's int8 format with torch de-quantization",
            details={"kernel": "torch", "eetq_kernels": problem, "transformers": transformers_path},
        )

    def check_option_combination(self, options):
        from qadapt.errors import BackendUnavailableError

        if options["kernel"] == "eetq":
            problem = library_problem()
            if problem:
                raise BackendUnavailableError("backend 'eetq' with kernel='eetq'", problem,
                                              "Use kernel='torch' (or 'auto') to run EETQ's format with torch")
        return options

    def _kernel(self, options):
        if options["kernel"] == "auto":
            return "eetq" if library_problem() is None else "torch"
        return options["kernel"]

    # ------------------------------------------------------------------ capabilities
    def capabilities(self, options):
        return declare(
            train={
                "lora": yes("qadapt's LoRA layer for EETQ layers, registered with PEFT's custom-module hook"),
                "dora": yes("PEFT's DoRA reads base_layer.weight, which holds EETQ's preprocessed bytes: qadapt "
                            "presents the layer as nn.Linear whose weight is de-quantized on access"),
                "vera": THROUGH_PROXY,
                "adalora": THROUGH_PROXY,
                "ia3": THROUGH_PROXY,
            },
            requantize=yes("per-channel int8 re-quantization of the merged weight, written in EETQ's layout"),
            dequantize=yes("EETQ's layout undone; q * scale in float16, as EETQ's kernel de-quantizes"),
            save=yes("transformers' EETQ checkpoint layout: int8 weight, float16 weight_scales, safetensors"),
            sharded={engine: no(f"not verified under {engine}: no sharded run of EETQ's layers was made",
                                "Train sharded with bnb bits=4") for engine in ("fsdp2", "zero3")},
        )

    # ------------------------------------------------------------------ scope
    def full_precision(self, model, options):
        """The output head and routers by design; any layer (or expert) with a dimension that is not a multiple of 64
        cannot be held by EETQ's int8 tile layout. Checked for every layer before any is converted (a bare
        ValueError used to come from the first bad layer's constructor, after the earlier ones were converted)."""
        from qadapt.inventory import cannot, matmul_weights

        from qadapt.hf import refuse_fused_experts

        kept = refuse_fused_experts(super().full_precision(model, options), model)
        for weight in matmul_weights(model):
            if weight.name in kept or weight.kind not in ("linear", "conv1d", "experts"):
                continue
            out_features, in_features = weight.shape[-2:]
            if out_features % TILE or in_features % TILE:
                kept[weight.name] = cannot(f"{in_features}->{out_features}: EETQ's int8 layout needs both weight "
                                           f"dimensions to be multiples of {TILE}")
        return kept

    # ------------------------------------------------------------------ heavy work
    def quantize(self, model, options, calibration=None):
        import torch

        from qadapt.hf import load_full_precision, prepare_linear_layers, replace_module, to_default_device

        from ._eetq_layers import EetqTorchLinear

        if isinstance(model, str):
            model = load_full_precision(model, gpu=False)
        kept = self.full_precision(model, options)
        prepare_linear_layers(model)
        kernel = self._kernel(options)
        head = model.get_output_embeddings()
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and module is not head and name not in kept:
                replace_module(model, name, EetqTorchLinear.from_linear(module, kernel=kernel))
        return to_default_device(model)

    def folder_options(self, path):
        """transformers' EETQ layout (``quant_method: eetq``, int8 weights): nothing to choose but the kernel."""
        from qadapt.hf import folder_quantization_config

        quant = folder_quantization_config(path) or {}
        if quant.get("quant_method") != "eetq":
            return None
        if quant.get("weights", "int8") != "int8":
            from qadapt.errors import IncompatibleError

            raise IncompatibleError(f"load {path!r}", f"its EETQ weights are {quant['weights']!r}", "EETQ stores int8 only")
        return {}

    def load(self, path, options):
        """Load a transformers EETQ checkpoint (``quant_method: eetq``): every ``nn.Linear`` not in
        ``modules_to_not_convert`` becomes an :class:`EetqTorchLinear` reading ``weight``/``weight_scales``."""
        import torch

        from qadapt.errors import CheckpointError
        from qadapt.hf import model_from_config, read_safetensors_folder, replace_module, to_default_device

        from ._eetq_layers import EetqTorchLinear

        with open(os.path.join(path, "config.json")) as handle:
            quant = json.load(handle).get("quantization_config") or {}
        skip = quant.get("modules_to_not_convert") or ["lm_head"]
        model = model_from_config(path)  # the layout it was saved from (split experts, Conv1D made nn.Linear)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        kernel = self._kernel(options)
        for name, module in list(model.named_modules()):
            # full names (qadapt's checkpoints); "lm_head"-style suffixes (transformers' own EETQ checkpoints)
            if isinstance(module, torch.nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
                replace_module(model, name, EetqTorchLinear(module.in_features, module.out_features,
                                                            bias=module.bias is not None, kernel=kernel))
        state = read_safetensors_folder(path, WEIGHTS_FILE)
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        missing = [k for k in model.state_dict() if k not in state and not k.endswith("inv_freq")]
        if unexpected or (missing and not (getattr(config, "tie_word_embeddings", False)
                                           and missing == ["lm_head.weight"])):
            raise CheckpointError(f"load {path!r} with backend 'eetq'",
                                  f"tensors missing: {missing[:3]}, unexpected: {unexpected[:3]}",
                                  "Is this an EETQ checkpoint of this architecture?")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        return to_default_device(model.eval())

    def save(self, model, path, options):
        import torch
        from safetensors.torch import save_file

        from qadapt.hf import save_conversions, unshared_state_dict

        from ._eetq_layers import EetqTorchLinear

        state = unshared_state_dict(model)
        config = model.config.to_dict()
        # every linear layer left in full precision (head, routers, layers allowed by the user), by full name
        kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, EetqTorchLinear)]
        config["quantization_config"] = {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": kept}
        save_conversions(model, path)
        with open(os.path.join(path, "config.json"), "w") as handle:
            json.dump(config, handle, indent=2, default=str)
        save_file(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt", "qadapt_backend": "eetq"})

    def quantized_layer_types(self):
        from ._eetq_layers import EetqTorchLinear

        return (EetqTorchLinear,)

    def dequantize(self, module):
        return module.dequantize().float()

    def training_dequantizer(self, module):
        """``q * scale`` in float16, the weight EETQ's kernel and the torch route multiply with (cast to the input's
        dtype, as the torch route does)."""
        return lambda dtype: module.dequantize().to(dtype)

    def requantize(self, module, weight):
        from ._eetq_layers import EetqTorchLinear

        layer = EetqTorchLinear.from_weight(weight, module.bias, kernel=module.kernel)
        return layer.to(module.weight.device)

    def peft_layer_types(self):
        from qadapt.peft_layers import requantizing_lora_layer

        from ._eetq_layers import EetqTorchLinear

        return {EetqTorchLinear: requantizing_lora_layer(self)}


@hookimpl
def register_backends(register):
    register(EETQBackend())
