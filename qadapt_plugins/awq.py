"""AWQ (activation-aware weight quantization) through GPT-QModel; AutoAWQ is archived upstream and not used.

Quantizing needs a CUDA GPU (gptqmodel's AWQ search raises "AWQ: CUDA is not available" elsewhere): on a machine
without one, ``quantize`` refuses before any work. Loading AWQ checkpoints (the "gemm" format of AutoAWQ, vLLM and
transformers: ``qweight``/``qzeros`` packed along the output dimension in AWQ's interleaved order, ``scales``) works
on CPU and GPU with gptqmodel's pure-PyTorch ``AwqTorchLinear`` (``kernel="torch"``, the default); on CUDA
``kernel="marlin"`` (float16/bfloat16) is faster for inference but repacks the weights and refuses training mode:
train with ``kernel="torch"``, then serve on Marlin: ``qadapt.load(checkpoint, kernel="marlin")`` for a checkpoint
``qadapt.save`` wrote, or ``qadapt.load_adapter`` onto a Marlin base.

AWQ folds its per-channel activation scales into the preceding layers, so a layer's de-quantized weight is the weight
that layer applies to its (scaled) input: exactly what an adapter on that layer sees, and what a merge must change.
"""

from __future__ import annotations

import os

from qadapt.backend import Environment, Option, QuantBackend
from qadapt.capabilities import declare, yes
from qadapt.errors import BackendUnavailableError
from qadapt.hookspecs import hookimpl

from . import _gptqmodel_common as common

INSTALL = "pip install 'gptqmodel>=7.0' 'optimum>=1.24'  (the `awq` extra of qadapt-lm)"
KERNELS = {"torch": "AWQ_TORCH", "marlin": "AWQ_MARLIN"}

THROUGH_PROXY = (
    "PEFT has no layer for {} on gptqmodel's AWQ layers: qadapt presents each as nn.Linear (forward unchanged, "
    "weight de-quantized on access)"
)


class AWQBackend(common.PackedLayersBackend, QuantBackend):
    name = "awq"
    proxy_methods = ("dora", "vera", "adalora", "ia3")
    peft_dispatchers = ("dispatch_awq",)
    gpu_variants = ({"kernel": "marlin", "dtype": "float16"},)
    #: AWQ's scale search needs CUDA: where it cannot run, the adapter cells are verified on this checkpoint, made on
    #: a GPU by tools/make_awq_tiny.py
    verification_checkpoint = os.path.join(os.path.dirname(__file__), "data", "awq-tiny")
    summary = "AWQ via GPT-QModel (4-bit activation-aware; quantizing needs CUDA, loading runs on CPU too)"
    requires = ("gptqmodel",)
    distribution = "gptqmodel"
    install_hint = INSTALL
    requires_calibration = True
    options = (
        Option("bits", 4, "bits per weight (AWQ checkpoints are 4-bit)", choices=(4,)),
        Option("group_size", 128, "weights sharing one scale and zero", choices=(32, 64, 128)),
        Option("zero_point", True, "asymmetric quantization with zero points (AWQ's default)", type=bool),
        Option("kernel", "torch", "gptqmodel kernel: 'torch' (CPU/CUDA, re-quantizable) or 'marlin' (CUDA, faster)",
               choices=tuple(KERNELS), runtime=True),
        Option("dtype", "float32", "dtype of activations and unquantized weights (scales stay in half precision)",
               choices=("float32", "bfloat16", "float16"), runtime=True),
    )

    def check_option_combination(self, options):
        if options["kernel"] == "marlin":
            common.check_marlin_options(self.name, options)
        return options

    def check_environment(self) -> Environment:
        env = common.check_gptqmodel(Environment, self.library_version(), INSTALL)
        if env.ok and not env.details.get("cuda"):
            env.details["note"] = "no CUDA GPU: AWQ checkpoints load and train here, quantizing needs a GPU"
        return env

    def capabilities(self, options):
        if options.get("kernel") == "marlin":
            return common.marlin_table()
        requantize = yes("the merged weight is rounded onto the layer's own grid (scales, zero points); groups it "
                         "overflows get fresh min-max scales (RTN)")
        return declare(
            train={
                "lora": yes("PEFT's AwqLoraLinear wraps gptqmodel's AWQ layers"),
                "dora": yes(THROUGH_PROXY.format("DoRA (its AwqLoraLinear refuses it)")),
                "vera": yes(THROUGH_PROXY.format("VeRA")),
                "adalora": yes(THROUGH_PROXY.format("AdaLoRA")),
                "ia3": yes(THROUGH_PROXY.format("IA3")),
            },
            requantize=requantize,
            dequantize=yes("qweight/qzeros (AWQ order) and scales are unpacked to the float weight"),
            save=yes("the AWQ 'gemm' checkpoint format (safetensors + quantization_config)"),
            sharded=common.NOT_SHARDED,
        )

    # ------------------------------------------------------------------ heavy work
    def quantize(self, model, options, calibration=None):
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                "quantize with backend 'awq'",
                "AWQ quantization needs a CUDA GPU (gptqmodel's AWQ scale search runs only on CUDA)",
                "Quantize on a GPU machine and load the saved AWQ checkpoint here with qadapt.load(path, backend='awq'), "
                "or use backend='gptq', which quantizes on CPU",
            )
        common.import_gptqmodel()
        from gptqmodel.quantization import AWQConfig

        config = AWQConfig(bits=options["bits"], group_size=options["group_size"], sym=not options["zero_point"],
                           offload_to_disk=False)
        return self.quantize_with(config, model, options, calibration)

    def load(self, path, options):
        model = common.load_quantized(path, KERNELS[options["kernel"]], options["dtype"])
        if options["dtype"] == "float32":
            _compute_in_float32(model)
        return model

    def folder_options(self, path):
        """``quantization_config`` with ``quant_method: awq`` (AutoAWQ, gptqmodel, transformers)."""
        qconfig = common.read_quantization_config(path)
        if common.method_of(qconfig) != "awq":
            return None
        packing = str(qconfig.get("version") or qconfig.get("checkpoint_format") or qconfig.get("format") or "gemm")
        if packing.lower() != "gemm":
            from qadapt.errors import IncompatibleError

            raise IncompatibleError(f"load {path!r}", f"its AWQ weights are packed as {packing!r}",
                                    "qadapt's awq backend reads AWQ's 'gemm' packing")
        return {"bits": qconfig.get("bits", qconfig.get("w_bit", 4)),
                "group_size": qconfig.get("group_size", qconfig.get("q_group_size", 128)),
                "zero_point": bool(qconfig.get("zero_point", True))}

    def quantized_layer_types(self):
        common.import_gptqmodel()
        from gptqmodel.nn_modules.qlinear import AWQuantLinear

        return (AWQuantLinear,)

    # what PackedLayersBackend needs: this format's packing
    format_name = "AWQ"

    def is_packed(self, module):
        return _is_awq_packed(module)

    def dequantize_packed(self, module):
        return dequantize_awq(module)

    def requantize_packed(self, module, weight):
        return requantize_awq(module, weight)

    def training_dequantizer(self, module):
        """What the torch kernel multiplies with: qadapt's exact float32 de-quantization for float32 inputs on its
        float32 layer (``_awq_layers``), else gptqmodel's ``dequantize_gemm`` in the kernel's compute dtype (the
        input's if half precision, else float16)."""
        if not self.is_packed(module):
            return None
        import torch
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        def weight(dtype):
            if dtype == torch.float32 and getattr(module, "_qadapt_float32", False):
                return dequantize_awq(module)
            compute = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16
            return dequantize_gemm(qweight=module.qweight, qzeros=module.qzeros, scales=module.scales.to(compute),
                                   bits=module.bits, group_size=module.group_size).t()

        return weight

    def checkpoint_tensors(self, module):
        return _checkpoint_tensors(module)


# ---------------------------------------------------------------------------------------------- AWQ packing
def _is_awq_packed(module) -> bool:
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    return isinstance(module, AwqTorchLinear)



def _checkpoint_tensors(module):
    from gptqmodel.nn_modules.qlinear import AWQuantLinear

    if not isinstance(module, AWQuantLinear):
        return None
    return {"qweight": module.qweight, "qzeros": module.qzeros, "scales": module.scales,
            "bias": getattr(module, "bias", None)}


def _codes_and_zeros(module):
    """The integer codes (in, out) and zero points (groups, out), undoing AWQ's interleaved packing order."""
    from gptqmodel.quantization.awq.utils.packing_utils import reverse_awq_order, unpack_awq

    qweight, qzeros = module.qweight.detach(), module.qzeros.detach()
    codes, zeros = unpack_awq(qweight, qzeros, module.bits, module.out_features)
    codes, zeros = reverse_awq_order(codes, zeros, module.bits)
    mask = 2**module.bits - 1
    return codes & mask, zeros & mask


def dequantize_awq(module):
    """float32 ``(out_features, in_features)``: ``(codes - zeros[group]) * scales[group]``, in float32."""
    codes, zeros = _codes_and_zeros(module)
    group = module.group_size if module.group_size > 0 else module.in_features
    scales = module.scales.detach().float()
    weight = (codes - zeros.repeat_interleave(group, dim=0)).float() * scales.repeat_interleave(group, dim=0)
    return weight.T.contiguous()


def requantize_awq(module, weight):
    """A copy of ``module`` holding ``weight`` on the layer's own grid (scales and zero points kept wherever the new
    weights fit them, fresh min-max ones for groups they overflow; see :func:`common.fit_grid`), packed by
    gptqmodel's own AWQ packer."""
    import torch

    device = module.qweight.device
    group = module.group_size if module.group_size > 0 else module.in_features
    g_idx = torch.arange(module.in_features, device=device) // group
    _, zeros = _codes_and_zeros(module)
    scales, zeros = common.fit_grid(weight, module.scales.detach().float(), zeros, g_idx, module.bits, module.sym)
    # gptqmodel's AWQ packer does not clamp codes to [0, maxq] (an overflow would wrap): clamp the weights first
    maxq = 2**module.bits - 1
    step, zero = scales[g_idx].T, zeros[g_idx].T.float()
    weight = torch.maximum(torch.minimum(weight.float().to(device), step * (maxq - zero)), -step * zero)
    new = common.clone_layer(module)
    linear = common.plain_linear(weight, getattr(module, "bias", None))
    with torch.inference_mode():  # element-wise torch on the layer's device: the same bits on CPU and CUDA
        new.pack(linear, scales.T.contiguous(), zeros.T.contiguous())
    new.register_buffer("scales", scales.to(module.scales.dtype))
    if getattr(module, "bias", None) is not None:
        new.register_buffer("bias", module.bias.detach().clone())
    new = new.to(device)
    new.post_init()
    if getattr(module, "_qadapt_float32", False):
        _compute_in_float32_layer(new)
    new.train(module.training)
    return new


# ---------------------------------------------------------------------------------------------- float32 compute
def _compute_in_float32_layer(module) -> None:
    """Switch a plain ``AwqTorchLinear`` to qadapt's float32-computing subclass (``_awq_layers``)."""
    if _is_awq_packed(module) and type(module).__name__ == "AwqTorchLinear":
        from ._awq_layers import AwqTorchLinearFloat32

        module.__class__ = AwqTorchLinearFloat32


def _compute_in_float32(model) -> None:
    for module in model.modules():
        _compute_in_float32_layer(module)


@hookimpl
def register_backends(register):
    register(AWQBackend())
