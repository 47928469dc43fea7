"""GPTQ through GPT-QModel: calibrated 2/3/4/8-bit weight quantization, on CPU and CUDA.

Quantizes with ``gptqmodel.GPTQModel`` (transformers' own ``GPTQConfig`` path imports ``optimum.gptq``, which optimum
2.x no longer has), saves and loads the standard GPTQ checkpoint format (``quantize_config.json`` + packed
``qweight``/``qzeros``/``scales``/``g_idx``), so checkpoints made by gptqmodel itself (or AutoGPTQ) load too.

Kernels: ``kernel="torch"`` (default) is gptqmodel's ``TorchLinear``: pure PyTorch, CPU and CUDA, trainable, and its
packed tensors are the checkpoint's, so qadapt can de-quantize, re-quantize and save them. ``kernel="marlin"`` (CUDA,
4/8-bit symmetric, float16/bfloat16) repacks weights for fast inference: gptqmodel's Marlin layers refuse training
mode, so adapters are trained with ``kernel="torch"`` and served on Marlin: ``qadapt.load(checkpoint, kernel="marlin")``
for a checkpoint ``qadapt.save`` wrote (adapter separate or merged), or ``qadapt.load_adapter`` onto a Marlin base;
``save`` copies the checkpoint the base was loaded from (the repacked layout is never written back).
"""

from __future__ import annotations

from qadapt.backend import Environment, Option, QuantBackend
from qadapt.capabilities import declare, yes
from qadapt.errors import InvalidOptionError
from qadapt.hookspecs import hookimpl

from . import _gptqmodel_common as common

INSTALL = "pip install 'gptqmodel>=7.0' 'optimum>=1.24'  (the `gptq` extra of qadapt-lm)"
KERNELS = {"torch": "TORCH", "marlin": "MARLIN"}

THROUGH_PROXY = (
    "PEFT has no layer for {} on gptqmodel's quantized layers: qadapt presents each as nn.Linear (forward unchanged, "
    "weight de-quantized on access)"
)


class GPTQBackend(common.PackedLayersBackend, QuantBackend):
    name = "gptq"
    proxy_methods = ("dora", "vera", "adalora", "ia3")
    peft_dispatchers = ("dispatch_gptq",)
    gpu_variants = ({"kernel": "marlin", "dtype": "float16"},)
    summary = "GPTQ via GPT-QModel (2/3/4/8 bits, calibrated; CPU and CUDA kernels)"
    requires = ("gptqmodel",)
    distribution = "gptqmodel"
    install_hint = INSTALL
    requires_calibration = True
    options = (
        Option("bits", 4, "bits per weight", choices=(2, 3, 4, 8)),
        Option("group_size", 128, "weights sharing one scale and zero (-1: one group per row)", choices=(-1, 32, 64, 128)),
        Option("desc_act", False, "quantize columns in order of decreasing activation (act-order)", type=bool),
        Option("sym", True, "symmetric quantization (zero point fixed at the middle)", type=bool),
        Option("kernel", "torch", "gptqmodel kernel: 'torch' (CPU/CUDA, re-quantizable) or 'marlin' (CUDA, faster)",
               choices=tuple(KERNELS), runtime=True),
        Option("dtype", "float32", "dtype of activations and unquantized weights (the packed weights' scales stay in "
               "half precision)", choices=("float32", "bfloat16", "float16"), runtime=True),
    )

    # ------------------------------------------------------------------ environment and options
    def check_environment(self) -> Environment:
        return common.check_gptqmodel(Environment, self.library_version(), INSTALL)

    def check_option_combination(self, options):
        if options["kernel"] == "marlin":
            common.check_marlin_options(self.name, options)
            if options["bits"] not in (4, 8) or not options["sym"]:
                raise InvalidOptionError(
                    f"backend 'gptq' with kernel='marlin', bits={options['bits']}, sym={options['sym']}",
                    "Marlin runs only 4- and 8-bit symmetric GPTQ",
                    "Use kernel='torch', or bits=4/8 with sym=True",
                )
        return options

    def capabilities(self, options):
        if options.get("kernel") == "marlin":
            return common.marlin_table()
        requantize = yes("the merged weight is rounded onto the layer's own grid (scales, zero points, g_idx); groups "
                         "it overflows get fresh min-max scales (RTN)")
        return declare(
            train={
                "lora": yes("PEFT's GPTQLoraLinear wraps gptqmodel's quantized layers"),
                "dora": yes(THROUGH_PROXY.format("DoRA (its GPTQLoraLinear refuses it)")),
                "vera": yes(THROUGH_PROXY.format("VeRA")),
                "adalora": yes(THROUGH_PROXY.format("AdaLoRA (it wraps only the class gptqmodel's auto-selection names)")),
                "ia3": yes(THROUGH_PROXY.format("IA3")),
            },
            requantize=requantize,
            dequantize=yes("qweight/qzeros/scales/g_idx are unpacked to the float weight"),
            save=yes("the standard GPTQ checkpoint format (safetensors + quantize_config.json)"),
            sharded=common.NOT_SHARDED,
        )

    # ------------------------------------------------------------------ heavy work
    def quantize(self, model, options, calibration=None):
        common.import_gptqmodel()
        from gptqmodel.quantization import GPTQConfig

        config = GPTQConfig(
            bits=options["bits"], group_size=options["group_size"], desc_act=options["desc_act"], sym=options["sym"],
            pack_impl="original", offload_to_disk=False,
        )
        return self.quantize_with(config, model, options, calibration)

    def load(self, path, options):
        return common.load_quantized(path, KERNELS[options["kernel"]], options["dtype"])

    def folder_options(self, path):
        """``quantization_config`` (transformers, gptqmodel) or ``quantize_config.json`` (AutoGPTQ, gptqmodel)."""
        qconfig = common.read_quantization_config(path)
        method = common.method_of(qconfig)
        if not (method == "gptq" or (qconfig is not None and method is None and "bits" in qconfig)):
            return None
        packing = str(qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq").lower()
        if packing not in ("gptq", "gptq_v2"):
            from qadapt.errors import IncompatibleError

            raise IncompatibleError(f"load {path!r}", f"its GPTQ weights are packed as {packing!r}",
                                    "qadapt's gptq backend reads the 'gptq' (and 'gptq_v2') packing")
        return {"bits": qconfig["bits"], "group_size": qconfig.get("group_size", 128),
                "desc_act": bool(qconfig.get("desc_act", False)), "sym": bool(qconfig.get("sym", True))}

    def quantized_layer_types(self):
        common.import_gptqmodel()
        from gptqmodel.nn_modules.qlinear import BaseQuantLinear

        return (BaseQuantLinear,)

    # what PackedLayersBackend needs: this format's packing
    format_name = "GPTQ"

    def is_packed(self, module):
        return _is_gptq_packed(module)

    def dequantize_packed(self, module):
        return dequantize_gptq(module)

    def requantize_packed(self, module, weight):
        return requantize_gptq(module, weight)

    def checkpoint_tensors(self, module):
        return _checkpoint_tensors(module)


# ---------------------------------------------------------------------------------------------- GPTQ packing
def _is_gptq_packed(module) -> bool:
    """Does ``module`` hold the checkpoint's GPTQ tensors as they are (TorchLinear and its packable relatives)?"""
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear

    return isinstance(module, PackableQuantLinear) and not getattr(module, "planar", False)



def _int_zeros(module):
    """The integer zero points, (groups, out_features), in gptqmodel's in-memory (v2) convention."""
    from gptqmodel.utils.model_dequant import unpack_cols

    # (gptqmodel's unpackers return CPU tensors: moved back to the layer's device)
    zeros = unpack_cols(module.qzeros.detach(), module.bits)[:, : module.out_features].to(module.qzeros.device)
    if module.qzero_format() == 1:  # GPTQ v1 checkpoints store zero - 1
        zeros = zeros + 1
    return zeros


def _checkpoint_tensors(module):
    """A GPTQ layer's tensors as the standard ("gptq", v1) checkpoint stores them: zero points minus one."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from gptqmodel.utils.model_dequant import pack_cols

    if not isinstance(module, BaseQuantLinear):
        return None
    qzeros = module.qzeros
    if module.qzero_format() == 2:
        zeros = _int_zeros(module) - 1  # v1 stores zero - 1 (a zero of 0 wraps to maxq, as in every GPTQ v1 file)
        width = qzeros.shape[1] * (32 // module.bits) if module.bits != 3 else qzeros.shape[1] * 32 // 3
        padded = zeros.new_zeros((zeros.shape[0], width))
        padded[:, : zeros.shape[1]] = zeros
        qzeros = pack_cols(padded, module.bits, pack_dtype=module.qzeros.dtype)
    return {"qweight": module.qweight, "qzeros": qzeros, "scales": module.scales, "g_idx": module.g_idx,
            "bias": getattr(module, "bias", None)}


def dequantize_gptq(module):
    """float32 ``(out_features, in_features)``: ``scales[g_idx] * (codes - zeros[g_idx])``, computed in float32 on the
    layer's device (element-wise: the same bits on CPU and CUDA)."""
    from gptqmodel.utils.model_dequant import unpack_rows

    codes = unpack_rows(module.qweight.detach(), module.bits)[: module.in_features].to(module.qweight.device)
    zeros = _int_zeros(module)
    scales = module.scales.detach().float()
    g_idx = module.g_idx.detach().long()
    weight = scales[g_idx] * (codes - zeros[g_idx]).float()
    return weight.T.contiguous()


def requantize_gptq(module, weight):
    """A copy of ``module`` holding ``weight`` rounded to the nearest level of the layer's own grid (same g_idx,
    scales and zero points wherever the new weights fit them; see :func:`common.fit_grid`): RTN re-quantization.

    Packed by gptqmodel: on CUDA with its CUDA packer (``pack_gpu``; an 8B model's merge takes seconds, not the
    minutes its single-threaded CPU packer takes), elsewhere with ``pack_original``; both write the same bits."""
    import torch

    device = module.qweight.device
    g_idx = module.g_idx.detach().clone()
    scales, zeros = common.fit_grid(weight, module.scales.detach().float(), _int_zeros(module), g_idx,
                                    module.bits, module.sym)
    new = common.clone_layer(module)
    linear = common.plain_linear(weight, getattr(module, "bias", None))
    with torch.inference_mode():
        if device.type == "cuda":
            new.pack_gpu(linear, scales.T.contiguous(), zeros.T.contiguous(), g_idx, device=device)
        else:
            new.pack_original(linear, scales.T.contiguous(), zeros.T.contiguous(), g_idx)
    # the packers pack the zeros as given (v2 convention) and store scales/bias as float16: restore the dtypes.
    new.qzero_format(2)
    new.register_buffer("scales", scales.to(module.scales.dtype))
    if getattr(module, "bias", None) is not None:
        new.register_buffer("bias", module.bias.detach().clone())
    new = new.to(device)
    new.post_init()
    new.train(module.training)
    return new


@hookimpl
def register_backends(register):
    register(GPTQBackend())
