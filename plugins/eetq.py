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
(:func:`unpreprocess_int8`, on the weight's device) and computes ``x @ (q * s)^T`` with the de-quantized weight in
torch, on any device; in training the weight is de-quantized again in the backward rather than kept. The
layout code is a re-implementation from EETQ's source; it is checked against EETQ's own ``quant_weights`` only by
the GPU test ``test_layout_matches_eetq_library``, which needs a machine where EETQ runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from qadapt.backend import Environment, Option, QuantBackend
from qadapt.capabilities import declare, yes
from qadapt.hookspecs import hookimpl

ROW_PERMUTATION = (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)
BYTE_SWAP = (0, 2, 1, 3)  # its own inverse
TILE = 64  # both dimensions must be multiples of this (EETQ's kernels have the same limit)
WEIGHTS_FILE = "model.safetensors"
THROUGH_PROXY = yes(
    "PEFT has no custom-layer hook for this method and its EETQ support is forward-only: qadapt presents the layer "
    "as nn.Linear (forward unchanged, weight de-quantized on access)"
)


def library_problem():
    """Why EETQ's own library cannot run here, or None if it can. Never raises."""
    try:
        import eetq  # noqa: F401
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
        )

    # ------------------------------------------------------------------ heavy work
    def quantize(self, model, options, calibration=None):
        import torch

        from qadapt._hf import load_full_precision

        if isinstance(model, str):
            model = load_full_precision(model, gpu=False)
        kernel = self._kernel(options)
        head = model.get_output_embeddings()
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and module is not head:
                _replace(model, name, layer_class().from_linear(module, kernel=kernel))
        return _to_gpu_if_any(model)

    def is_quantized_checkpoint(self, path):
        try:
            with open(os.path.join(path, "config.json")) as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return False
        return config.get("quantization_config", {}).get("quant_method") == "eetq"

    def load(self, path, options):
        """Load a transformers EETQ checkpoint (``quant_method: eetq``): every ``nn.Linear`` not in
        ``modules_to_not_convert`` becomes an :class:`EetqTorchLinear` reading ``weight``/``weight_scales``."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        quant = config.quantization_config
        quant = quant if isinstance(quant, dict) else quant.to_dict()
        skip = quant.get("modules_to_not_convert") or ["lm_head"]
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
        kernel = self._kernel(options)
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
                _replace(model, name, layer_class()(module.in_features, module.out_features,
                                                      bias=module.bias is not None, kernel=kernel))
        state = _read_state(path)
        model.load_state_dict(state, strict=False)
        missing = [k for k in model.state_dict() if k not in state and not k.endswith("inv_freq")]
        if missing and not (getattr(config, "tie_word_embeddings", False) and missing == ["lm_head.weight"]):
            from qadapt.errors import CheckpointError

            raise CheckpointError(f"load {path!r} with backend 'eetq'", f"tensors missing: {missing[:3]}",
                                  "Is this an EETQ checkpoint of this architecture?")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        return _to_gpu_if_any(model.eval())

    def save(self, model, path, options):
        from safetensors.torch import save_file

        state, seen = {}, set()
        for key, tensor in model.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            if tensor.numel() and tensor.data_ptr() in seen:
                tensor = tensor.clone()
            seen.add(tensor.data_ptr())
            state[key] = tensor
        config = model.config.to_dict()
        head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
        config["quantization_config"] = {"quant_method": "eetq", "weights": "int8", "modules_to_not_convert": head}
        with open(os.path.join(path, "config.json"), "w") as handle:
            json.dump(config, handle, indent=2, default=str)
        save_file(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt", "qadapt_backend": "eetq"})

    def quantized_layer_types(self):
        return (layer_class(),)

    def dequantize(self, module):
        return module.dequantize().float()

    def requantize(self, module, weight):
        layer = layer_class().from_weight(weight, module.bias, kernel=module.kernel)
        return layer.to(module.weight.device)

    def peft_layer_types(self):
        return {layer_class(): lora_layer_class()}


# ---------------------------------------------------------------------- the format
def _check_shape(rows, cols):
    if rows % TILE or cols % TILE:
        raise ValueError(f"EETQ's int8 layout needs both weight dimensions to be multiples of {TILE}; got {cols}x{rows}")


def symmetric_quantize(weight):
    """EETQ's ``quant_weights(W^T, int8)`` before preprocessing: ``W`` is (out, in); returns ``q^T`` int8 (in, out)
    and float16 scales (out,). Scale ``max|W_row| / 128`` (float32 for the rounding, stored in float16); C's
    ``round`` (half away from zero); clamp to [-128, 127]."""
    import torch

    w = weight.detach().to(torch.float32).t()  # (in, out): EETQ quantizes the transposed weight per column
    scale = w.abs().amax(dim=0) * (1.0 / 128.0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = w / safe
    rounded = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    q = rounded.clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.float16)


@functools.lru_cache(maxsize=None)
def _index(values, device):
    """A small index tensor, made once per device: building it in each call would copy it from host memory every
    forward and backward, and a copy from pageable memory waits for the GPU to finish its queue."""
    import torch

    return torch.tensor(values, device=device)


def preprocess_int8(q):
    """EETQ's ``preprocess_weights`` for SM75-SM89 on an int8 (in, out) matrix (see the module docstring)."""
    import torch

    rows, cols = q.shape
    _check_shape(rows, cols)
    perm = _index(ROW_PERMUTATION, q.device)
    x = q.reshape(rows // 16, 16, cols)[:, perm, :].reshape(rows, cols)  # 1. row permutation per 16-row tile
    x = x.t().contiguous()  # 2. column-major: (out, in)
    x = x.reshape(cols // 2, 2, rows // TILE, TILE).permute(0, 2, 1, 3).reshape(-1)  # 3. ColumnMajorTileInterleave<64,2>
    u = (x.to(torch.int16) + 128).to(torch.uint8)  # 4a. +128
    u = u.reshape(-1, 4)[:, _index(BYTE_SWAP, q.device)].reshape(rows, cols)  # 4b. bytes 1 <-> 2 of 4
    return u.view(torch.int8)


def unpreprocess_int8(stored):
    """Undo :func:`preprocess_int8`: EETQ's stored (in, out) bytes back to the int8 matrix ``q^T`` (in, out), on
    the stored tensor's device (the torch route runs this in every forward and backward)."""
    import torch

    rows, cols = stored.shape
    _check_shape(rows, cols)
    device = stored.device
    u = stored.contiguous().view(torch.uint8).reshape(-1, 4)[:, _index(BYTE_SWAP, device)].reshape(-1)
    x = (u ^ 0x80).view(torch.int8)  # -128: flipping the top bit of an unsigned byte is subtracting 128 from it
    x = x.reshape(cols // 2, rows // TILE, 2, TILE).permute(0, 2, 1, 3).reshape(cols, rows)
    x = x.t().contiguous()
    q = torch.empty_like(x)
    q.reshape(rows // 16, 16, cols)[:, _index(ROW_PERMUTATION, device), :] = x.reshape(rows // 16, 16, cols)
    return q


def _eetq_quant_weights(weight):
    """EETQ's own quantizer (library, CUDA build) on ``W`` (out, in): (stored int8 (in, out), float16 scales)."""
    import torch
    from EETQ import quant_weights  # the compiled extension shipped by the eetq wheel

    q, scales = quant_weights(weight.detach().t().contiguous().to(torch.float16).cpu(), torch.int8, False)
    return q, scales.to(torch.float16)


# ---------------------------------------------------------------------- the layer
def _layer_class():
    import torch
    import torch.nn.functional as F

    class _EetqTorchLinear(torch.nn.Module):
        """An EETQ int8 layer with transformers' EetqLinear tensors (``weight`` (in, out) int8 in EETQ's layout,
        ``weight_scales`` (out,) float16, ``bias`` float16). ``kernel='eetq'`` runs EETQ's ``w8_a16_gemm`` (CUDA,
        SM75-89); ``kernel='torch'`` de-quantizes and uses ``F.linear``. The weight is frozen; gradients flow to
        the input (for adapters)."""

        def __init__(self, in_features, out_features, bias=False, kernel="torch", device=None):
            super().__init__()
            _check_shape(in_features, out_features)
            self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
            self.register_buffer("weight", torch.zeros(in_features, out_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scales", torch.ones(out_features, dtype=torch.float16, device=device))
            if bias:
                self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
            else:
                self.bias = None

        @classmethod
        def from_weight(cls, weight, bias=None, kernel="torch"):
            layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, kernel=kernel)
            if kernel == "eetq":
                stored, scales = _eetq_quant_weights(weight)
            else:
                q, scales = symmetric_quantize(weight)
                stored = preprocess_int8(q)
            layer.weight.copy_(stored)
            layer.weight_scales.copy_(scales)
            if bias is not None:
                layer.bias.copy_(bias.detach())
            return layer.to(weight.device)

        @classmethod
        def from_linear(cls, linear, kernel="torch"):
            return cls.from_weight(linear.weight, linear.bias, kernel=kernel)

        def int8_weight(self):
            """``q`` as (out, in) int8."""
            return unpreprocess_int8(self.weight).t()

        def dequantize(self):
            """(out, in) float16: ``q * scale`` in float16, the values EETQ's kernel multiplies with."""
            return self.int8_weight().to(torch.float16) * self.weight_scales.view(-1, 1)

        def forward(self, x):
            if self.kernel == "eetq" and x.is_cuda:
                out = _EetqGemm.apply(x, self)
            elif x.requires_grad and torch.is_grad_enabled():
                out = _DequantizedMatmul.apply(x, self)
            else:
                out = F.linear(x, self.dequantize().to(x.dtype if x.is_floating_point() else torch.float32))
            return out + self.bias.to(out.dtype) if self.bias is not None else out

        def extra_repr(self):
            return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"

    class _DequantizedMatmul(torch.autograd.Function):
        """``x @ W^T`` with ``W`` de-quantized again in the backward instead of saved: autograd would otherwise keep
        every layer's de-quantized weight alive until the backward, more memory than the unquantized model
        (bitsandbytes' 4-bit matmul makes the same choice)."""

        @staticmethod
        def forward(ctx, x, layer):
            ctx.layer = layer
            return F.linear(x, layer.dequantize().to(x.dtype))

        @staticmethod
        def backward(ctx, grad):
            return grad @ ctx.layer.dequantize().to(grad.dtype), None

    class _EetqGemm(_DequantizedMatmul):
        """The forward on EETQ's ``w8_a16_gemm``; the same backward."""

        @staticmethod
        def forward(ctx, x, layer):
            from EETQ import w8_a16_gemm

            ctx.layer = layer
            return w8_a16_gemm(x.to(torch.float16), layer.weight, layer.weight_scales).to(x.dtype)

    return _EetqTorchLinear


def _to_gpu_if_any(model):
    """Where there is a CUDA GPU the model goes there, as every backend's models do."""
    import torch

    return model.to("cuda:0") if torch.cuda.is_available() else model


_CLASSES = {}


def layer_class():
    """The EETQ layer class (built on first use, so importing this module imports no torch)."""
    if "layer" not in _CLASSES:
        _CLASSES["layer"] = _layer_class()
    return _CLASSES["layer"]


def __getattr__(name):
    if name == "EetqTorchLinear":
        return layer_class()
    raise AttributeError(name)


def lora_layer_class():
    """PEFT's ``lora.Linear`` around an EETQ layer. PEFT's own merge would add to the int8 bytes: ``merge``
    re-quantizes into a new base layer and ``unmerge`` puts the original back."""
    if "lora" in _CLASSES:
        return _CLASSES["lora"]
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class EetqLoraLinear(Linear):
        def __init__(self, base_layer, adapter_name, config, **kwargs):
            if config.use_dora or config.lora_bias:
                raise ValueError("EETQ layers support plain LoRA only (no DoRA, no lora_bias)")
            self._qadapt_originals = []
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def merge(self, safe_merge=False, adapter_names=None):
            for adapter in check_adapters_to_merge(self, adapter_names) or []:
                if adapter not in self.lora_A.keys():
                    continue
                base = self.get_base_layer()
                merged = base.dequantize().float() + self.get_delta_weight(adapter).float()
                self._qadapt_originals.append(base)
                self.base_layer = layer_class().from_weight(merged, base.bias, kernel=base.kernel)
                self.merged_adapters.append(adapter)

        def unmerge(self):
            while self.merged_adapters:
                self.merged_adapters.pop()
                self.base_layer = self._qadapt_originals.pop()

    _CLASSES["lora"] = EetqLoraLinear
    return EetqLoraLinear


# ---------------------------------------------------------------------- helpers
def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _read_state(path):
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        files = [WEIGHTS_FILE]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


@hookimpl
def register_backends(register):
    register(EETQBackend())
