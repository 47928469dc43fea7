"""Intel Neural Compressor (INC): CPU weight-only quantization (RTN or GPTQ), 2/3/4/8-bit integers or NF4/FP4.

Drives INC 3.x's own API, ``neural_compressor.torch.quantization.prepare`` / ``convert``, which replaces each
``nn.Linear`` (``lm_head`` excepted) with ``INCWeightOnlyLinear``: packed int32 weights, float16 scales and zero
points in the Hugging Face "optimum" layout (``qweight``/``scales``/``qzeros``). Facts this plugin is built on, read off
INC 3.10 (``neural-compressor-pt``):

* On CPU, ``INCWeightOnlyLinear.forward`` de-quantizes the weight once (``recover()``), caches it as a float tensor in
  ``layer.weight`` and runs ``F.linear``: the packed format saves disk, not run-time memory.
* PEFT cannot attach LoRA to it (PEFT's ``dispatch_inc`` knows only the FP8 ``PatchedLinear`` of Intel Gaudi), so this
  plugin supplies qadapt's re-quantizing LoRA layer (``qadapt.peft_layers``) through
  ``LoraConfig._register_custom_module``.
  VeRA, IA3 and AdaLoRA have no such hook in PEFT 0.21: qadapt presents the layer as nn.Linear to them (qadapt.proxy).
* INC's own ``save`` pickles the model with ``torch.save``; this plugin writes the packed tensors with safetensors
  plus a JSON description of every layer and rebuilds the layers on load.
* GPTQ runs on CPU but INC's GPTQ always resolves ``model_path`` (and downloads from the hub when it is not a local
  folder, even with layer-wise mode off): this plugin gives it the local folder of the model.
* FP8 (``FP8Config``) quantizes for Intel Gaudi; on CPU INC answers "only QDQ mode is supported on CPU device".
"""

from __future__ import annotations

import importlib.metadata
import json
import os

from qadapt.backend import Environment, Option, QuantBackend
from qadapt.capabilities import declare, no, yes
from qadapt.hookspecs import hookimpl

LAYOUT_FILE = "inc_layers.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
THROUGH_PROXY = yes(
    "PEFT has no custom-layer hook for this method and does not know INCWeightOnlyLinear: qadapt presents the "
    "layer as nn.Linear (forward unchanged, weight de-quantized on access)"
)
FP8_REASON = (
    "INC's FP8 path (FP8Config) quantizes for Intel Gaudi (HPU) accelerators; on a CPU INC refuses it "
    "('only QDQ mode is supported on CPU device') and this machine has no Gaudi"
)


class INCBackend(QuantBackend):
    name = "inc"
    proxy_methods = ("vera", "adalora", "ia3")
    peft_dispatchers = ()  # qadapt's own LoRA layer, through LoRA's custom-module hook
    matrix_variants = ({"algorithm": "rtn", "bits": 4},)
    not_run_on = {"gpu": "INC's weight-only layers are CPU code (its FP8 path needs Intel Gaudi)"}
    harmless_messages = (
        ("neural_compressor", r"Auto detect accelerator|hw aligned scales not supported|has already been set, update "
         r"it|Below warning will be shown only once|TBB is not installed",
         "INC 3.10 announces the accelerator it picked (the CPU), its default configs and an optional threading "
         "library"),
    )
    summary = "Intel Neural Compressor weight-only RTN/GPTQ (2-8 bit int, NF4/FP4) on CPU"
    requires = ("neural_compressor.torch.quantization",)
    distribution = "neural-compressor-pt"
    install_hint = "pip install 'neural-compressor-pt>=3.2'  (the `inc` extra of qadapt-lm; not plain neural-compressor)"
    options = (
        Option("algorithm", "rtn", "rtn: round to nearest, no data; gptq: error-correcting, needs calibration batches",
               choices=("rtn", "gptq")),
        Option("bits", 4, "bits per integer weight (dtype='int')", choices=(2, 3, 4, 8)),
        Option("group_size", 64, "weights sharing one scale (-1: one group per output channel)",
               choices=(-1, 32, 64, 128, 256)),
        Option("sym", True, "symmetric integer grid (False: asymmetric, with per-group zero points)"),
        Option("dtype", "int", "integer grid, or the 4-bit NF4/FP4 code books; 'fp8' needs Intel Gaudi",
               choices=("int", "nf4", "fp4", "fp8")),
        Option("act_order", False, "GPTQ only: quantize columns in order of decreasing activation size"),
    )

    #: RTN needs no data; algorithm='gptq' does (quantize() refuses it without calibration batches)
    requires_calibration = False

    def needs_calibration(self, options):
        return options["algorithm"] == "gptq"

    # ------------------------------------------------------------------ environment
    def install_problems(self):
        from qadapt.hf import is_importable, is_installed

        if is_installed("neural-compressor") and not is_importable("prettytable"):
            return [("`neural-compressor` is installed without its torch dependencies (prettytable, ...): PEFT imports "
                     "it for every LoRA attach and fails, whatever the backend",
                     "pip uninstall neural-compressor && pip install neural-compressor-pt")]
        return []

    def check_environment(self) -> Environment:
        version = self.library_version()
        plain = _dist_version("neural-compressor")
        if version is None and plain is not None:
            return Environment(
                ok=False,
                version=plain,
                reason=(
                    f"plain neural-compressor {plain} is installed without neural-compressor-pt: it lacks the PyTorch "
                    "half's dependencies (prettytable, ...), and PEFT imports it on every LoRA attach, which then fails "
                    "for EVERY backend, not only INC"
                ),
                hint="pip uninstall neural-compressor && pip install 'neural-compressor-pt>=3.2'",
            )
        checks = (
            "neural_compressor.torch.quantization",
            "neural_compressor.torch.algorithms.weight_only.modules",
            # what PEFT's dispatch_inc imports for every LoRA attach, whatever the backend
            "neural_compressor.torch.algorithms.fp8_quant._quant_common.helper_modules",
        )
        import importlib

        for module in checks:
            try:
                importlib.import_module(module)
            except Exception as exc:
                breaks_peft = module.endswith("helper_modules")
                return Environment(
                    ok=False,
                    version=version,
                    reason=f"{module} is not importable ({type(exc).__name__}: {exc})"
                    + ("; PEFT imports it on every LoRA attach, so LoRA fails for every backend" if breaks_peft else ""),
                    hint=f"Install: {self.install_hint}",
                )
        return Environment(ok=True, version=version, details={"fp8": FP8_REASON})

    # ------------------------------------------------------------------ options
    def check_option_combination(self, options):
        from qadapt.errors import InvalidOptionError

        if options["dtype"] == "fp8":
            raise InvalidOptionError("backend 'inc' with dtype='fp8'", FP8_REASON,
                                     "Use dtype='int' (or 'nf4'/'fp4') for CPU weight-only quantization")
        if options["dtype"] in ("nf4", "fp4") and (options["bits"] != 4 or options["algorithm"] != "rtn"):
            raise InvalidOptionError(
                f"backend 'inc' with dtype={options['dtype']!r}, bits={options['bits']}, algorithm={options['algorithm']!r}",
                "NF4/FP4 are 4-bit code books, quantized here with RTN only",
                "Use bits=4 and algorithm='rtn' with them, or dtype='int'",
            )
        if options["dtype"] in ("nf4", "fp4") and not options["sym"]:
            raise InvalidOptionError(f"backend 'inc' with dtype={options['dtype']!r}, sym=False",
                                     "NF4/FP4 code books are symmetric", "Drop sym=False")
        if options["act_order"] and options["algorithm"] != "gptq":
            raise InvalidOptionError("backend 'inc' with act_order=True", "act_order is a GPTQ option",
                                     "Use algorithm='gptq' or drop act_order")
        return options

    # ------------------------------------------------------------------ capabilities
    def capabilities(self, options):
        return declare(
            train={
                "lora": yes("qadapt's LoRA layer for INCWeightOnlyLinear, registered with PEFT's custom-module hook"),
                "dora": yes("the same layer with PEFT's DoRA variant (it reads INC's de-quantized weight)"),
                "vera": THROUGH_PROXY,
                "adalora": THROUGH_PROXY,
                "ia3": THROUGH_PROXY,
            },
            requantize=yes(
                "INC's RTN re-quantizes the merged weight with the layer's bits, group size, scheme and dtype "
                "(a GPTQ layer is re-quantized by RTN: GPTQ would need the layer's calibration inputs)"
            ),
            dequantize=yes("packed weights, zero points and float16 scales unpack exactly (same values as INC's forward)"),
            save=yes("packed tensors in safetensors plus a JSON description of each layer"),
            sharded={engine: no(f"not verified under {engine}: INC's INCWeightOnlyLinear keeps its packed weight in "
                                "buffers, which engines do not shard", "Train sharded with bnb bits=4")
                     for engine in ("fsdp2", "zero3")},
        )

    # ------------------------------------------------------------------ heavy work
    def full_precision(self, model, options):
        from qadapt.hf import refuse_fused_experts

        return refuse_fused_experts(super().full_precision(model, options), model)

    def _config(self, options, model_path=None, kept=()):
        import re

        from neural_compressor.torch.quantization import GPTQConfig, RTNConfig

        common = dict(dtype=options["dtype"], bits=options["bits"], use_sym=options["sym"],
                      group_size=options["group_size"])
        if options["algorithm"] == "gptq":
            config = GPTQConfig(**common, act_order=options["act_order"], model_path=model_path)
        else:
            config = RTNConfig(**common, use_layer_wise=False)
        if kept:  # routers and layers allowed to stay in full precision (INC matches names as regular expressions)
            config.set_local([re.escape(name) for name in kept], type(config)(dtype="fp32"))
        return config

    def quantize(self, model, options, calibration=None):
        import tempfile

        from neural_compressor.torch.quantization import convert, prepare

        from qadapt.hf import load_full_precision, prepare_linear_layers

        _quiet_inc()
        if options["algorithm"] == "gptq" and not calibration:  # refused before the model is changed
            from qadapt.errors import InvalidOptionError

            raise InvalidOptionError("backend 'inc' with algorithm='gptq'", "GPTQ needs calibration batches",
                                     "Pass calibration (a list of input_ids batches), or use algorithm='rtn'")
        if isinstance(model, str):
            model = load_full_precision(model, gpu=False)
        _to_float32(model)
        model.eval()
        kept = sorted(self.full_precision(model, options))
        # INC quantizes nn.Linear, not fused 3-D experts; and transformers' Conv1D only if transformers was imported
        # before INC (neural_compressor/torch/quantization/config.py builds WOQ_WHITE_LIST at import, INC 3.10)
        prepare_linear_layers(model)
        if options["algorithm"] == "gptq":
            import torch

            # INC's GPTQ resolves model_path even when not layer-wise and downloads from the hub when it is not a
            # folder; an empty local folder keeps it offline (it reads nothing from it when not layer-wise).
            with tempfile.TemporaryDirectory(prefix="qadapt-inc-") as folder:
                prepared = prepare(model, self._config(options, model_path=folder, kept=kept))
                with torch.no_grad():
                    for batch in calibration:
                        prepared(batch.to(_model_device(prepared)))
                quantized = convert(prepared)
        else:
            quantized = convert(prepare(model, self._config(options, kept=kept)))
        for _, layer in _inc_layers(quantized):
            layer._qadapt_scheme = "sym" if options["sym"] else "asym"
        # INC's convert() sets is_quantized=True on the model (neural_compressor/torch/quantization/quantize.py:320,
        # INC 3.10); transformers' Trainer then takes it for a model transformers quantized and reads its
        # hf_quantizer, which it has not ("no attribute 'hf_quantizer'"). Without the attribute, PreTrainedModel's own
        # is_quantized (hf_quantizer is not None) answers, as for a model loaded from a folder.
        quantized.__dict__.pop("is_quantized", None)
        return quantized

    def save(self, model, path, options):
        from safetensors.torch import save_file

        from qadapt.hf import mark_qadapt_only, save_config, save_conversions, unshared_state_dict

        layers = {name: _layer_spec(layer) for name, layer in _inc_layers(model)}
        state = unshared_state_dict(model)  # tied weights: safetensors refuses shared storage
        save_config(model, path)
        save_conversions(model, path)
        save_file(state, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt", "qadapt_backend": "inc"})
        with open(os.path.join(path, LAYOUT_FILE), "w") as handle:
            json.dump({"format_version": FORMAT_VERSION, "library_version": self.library_version(),
                       "options": options, "layers": layers}, handle, indent=2)
        # packed qweight/qzeros/scales under names transformers does not know: it would load random weights
        mark_qadapt_only(path, self.name, f"INC weight-only layers in qadapt's layout ({LAYOUT_FILE})")

    def load(self, path, options):
        import torch
        from safetensors.torch import load_file

        from qadapt.errors import CheckpointError
        from qadapt.hf import model_from_config, replace_module

        layout_path = os.path.join(path, LAYOUT_FILE)
        if not os.path.exists(layout_path):
            raise CheckpointError(f"load {path!r} with backend 'inc'", f"{LAYOUT_FILE} is missing",
                                  "Save the model with qadapt (backend 'inc') first")
        with open(layout_path) as handle:
            layout = json.load(handle)
        # the layout it was saved from (split experts), in float32: INC's layers compute in it
        model = model_from_config(path, dtype=torch.float32)
        config = model.config
        for name, spec in layout["layers"].items():
            replace_module(model, name, _build_layer(spec))
        state = load_file(os.path.join(path, WEIGHTS_FILE))
        model.load_state_dict(state, strict=True)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        for name, spec in layout["layers"].items():
            model.get_submodule(name)._qadapt_scheme = spec.get("scheme")
        return model.eval()

    def folder_options(self, path):
        """qadapt's own layout (``inc_layers.json``: the options and every layer's description)."""
        from qadapt.hf import layout_options

        return layout_options(path, LAYOUT_FILE, self)

    def quantized_layer_types(self):
        from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

        return (INCWeightOnlyLinear,)

    def dequantize(self, module):
        return dequantize_layer(module).float()

    def training_dequantizer(self, module):
        """The weight INC's own forward computes with (``dequantize_layer``), in its dtype (INC casts the input to it;
        float16 becomes float32 on a CPU, as INC's forward does)."""
        def weight(dtype):
            import torch

            found = dequantize_layer(module)
            return found.float() if found.dtype == torch.float16 and found.device.type == "cpu" else found

        return weight

    def requantize(self, module, weight):
        return rtn_layer(weight, module, scheme=_scheme(module))

    def peft_layer_types(self):
        from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

        from qadapt.peft_layers import requantizing_lora_layer

        # DoRA reads base_layer.weight: INC's forward caches its de-quantized weight there (``warm``)
        return {INCWeightOnlyLinear: requantizing_lora_layer(self, dora=True, prepare=warm)}


# ---------------------------------------------------------------------- layers
def dequantize_layer(module):
    """The weight INC's own forward computes with (``recover()``), vectorised: ``(q - zero) * scale`` in the layer's
    scale dtype, NF4/FP4 codes mapped through INC's table. Shape ``(out_features, in_features)``."""
    import torch

    unpacked = module.unpack()
    weight = unpacked["int_weight"]
    scales = unpacked["scales"]
    zp = unpacked["zp"]
    g_idx = unpacked.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(module.in_features, device=scales.device) // module.group_size
    g_idx = g_idx.long()
    scale = scales[:, g_idx]
    if zp is not None:
        values = (weight.to(torch.int32) - zp[:, g_idx].to(torch.int32)).to(torch.int8)
        return values * scale  # int8 x float16 -> float16, as INC's recover()
    return (weight * scale).to(module.float_type)


def rtn_layer(weight, like, *, scheme):
    """A new ``INCWeightOnlyLinear`` holding ``weight`` quantized by INC's RTN with ``like``'s format (what
    ``RTNQuantizer.convert`` does for one layer)."""
    import torch
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear
    from neural_compressor.torch.algorithms.weight_only.utility import quant_tensor

    weight = weight.detach().to(torch.float32, copy=True)
    bias = like.bias
    has_bias = bias is not None  # the optimum layout always has a bias buffer (zeros when the Linear had none)
    group_size = like.group_size if like.group_size != like.in_features else -1
    int_weight, scale, zp = quant_tensor(
        weight, dtype=like.dtype, bits=like.bits, group_size=group_size, scheme=scheme,
        quantile=1.0, return_int=True, full_range=False, double_quant=False,
    )
    layer = INCWeightOnlyLinear(
        like.in_features, like.out_features, dtype=like.dtype, bits=like.bits, group_size=group_size,
        zp=zp is not None, bias=has_bias, use_optimum_format=like.use_optimum_format, device="cpu",
    )
    layer.pack(int_weight, scale, zp, bias.detach().clone() if has_bias else None)
    layer._qadapt_scheme = scheme
    return layer.to(like.scales.device)


def _scheme(module) -> str:
    scheme = getattr(module, "_qadapt_scheme", None)
    if scheme:
        return scheme
    # A layer quantized elsewhere: INC's symmetric int layers store the constant zero point 2**(bits-1).
    zp = module.unpack()["zp"]
    if zp is None or module.dtype != "int":
        return "sym"
    return "sym" if bool((zp == 2 ** (module.bits - 1)).all()) else "asym"


def _layer_spec(layer) -> dict:
    import torch

    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "dtype": layer.dtype,
        "bits": layer.bits,
        "group_size": layer.group_size if layer.group_size != layer.in_features else -1,
        "zp": hasattr(layer, "qzeros"),
        "bias": layer.bias is not None,
        "scale_dtype": str(layer.scale_dtype).replace("torch.", ""),
        "compression_dtype": str(layer.compression_dtype).replace("torch.", ""),
        "compression_dim": layer.compression_dim,
        "g_idx": "g_idx" in layer._buffers and isinstance(layer._buffers["g_idx"], torch.Tensor),
        "use_optimum_format": layer.use_optimum_format,
        "scheme": _scheme(layer),
    }


def _to_float32(model) -> None:
    """INC's weight-only layers compute in float32 on a CPU (they cast their input to it and return float32): a
    half-precision model's embeddings, norms and head would then meet float32 activations and its first forward
    fail ("expected m1 and m2 to have the same dtype"). The model is converted to float32, and a warning says so."""
    import warnings

    import torch

    dtype = getattr(model, "dtype", torch.float32)
    if dtype != torch.float32:
        warnings.warn(f"backend 'inc': INC's weight-only layers compute in float32 on the CPU; the {dtype} model "
                      "(embeddings, norms and head too) is converted to float32", stacklevel=4)
        model.float()


def _build_layer(spec):
    import torch
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    kwargs = {k: spec[k] for k in ("in_features", "out_features", "dtype", "bits", "group_size", "zp", "bias",
                                    "compression_dim", "g_idx", "use_optimum_format")}
    return INCWeightOnlyLinear(**kwargs, scale_dtype=getattr(torch, spec["scale_dtype"]),
                               compression_dtype=getattr(torch, spec["compression_dtype"]), device="cpu")


def _inc_layers(model):
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, INCWeightOnlyLinear)]


def warm(layer):
    """Run INC's own forward once so the layer caches its de-quantized weight in ``layer.weight`` (what INC does on
    the first call anyway); PEFT's DoRA reads the weight from there."""
    import torch

    if not hasattr(layer, "weight"):
        with torch.no_grad():
            layer(torch.zeros(1, layer.in_features, dtype=torch.float32, device=layer.scales.device))
    return layer


# ---------------------------------------------------------------------- helpers
def _dist_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        return "cpu"


def _quiet_inc():
    import logging

    logging.getLogger("neural_compressor").setLevel(logging.WARNING)


@hookimpl
def register_backends(register):
    register(INCBackend())
