"""AQLM layers and qadapt's kernel for them (imported only when the aqlm backend is used; see ``aqlm.py``)."""

from __future__ import annotations

import aqlm
import torch
import torch.nn.functional as F
from aqlm.utils import _dequantize_weight, get_int_dtype, unpack_int_data


def make_layer(linear, result, options):
    """An ``aqlm.QuantizedLinear`` holding ``result`` (an ``_aqlm_quantize.AQResult``) for ``linear``, frozen."""
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
    layer.codes.data = pack_codes(result.codes, options["nbits_per_codebook"])
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
        return DequantizedMatmul.apply(input, codes, codebooks, scales, bias)


def training_weight(module):
    """The layer's weight as aqlm's de-quantizing matmul computes it (``(out, in)``, the codebooks' dtype)."""
    codebooks = module.codebooks
    return _dequantize_weight(unpack_int_data(module.codes, codebooks.shape[1].bit_length() - 1), codebooks,
                              module.scales)


class DequantizedMatmul(torch.autograd.Function):
    """aqlm's de-quantizing function (``_dequantize_weight`` + ``F.linear``), the weight rebuilt in the backward
    rather than kept."""

    @staticmethod
    def forward(ctx, input, codes, codebooks, scales, bias):
        weight = _dequantize_weight(unpack_int_data(codes, codebooks.shape[1].bit_length() - 1), codebooks, scales)
        ctx.save_for_backward(codes, codebooks, scales)
        out = F.linear(input, weight.to(input.dtype))
        # the bias out of place: F.linear(x, W, b) on 3-D input returns a view of its addmm result, which autograd
        # marks "created in no_grad mode" inside a Function's forward, and PEFT's AqlmLoraLinear then fails on its
        # in-place ``result += ...`` (torch 2.13, peft 0.21.2: every model whose linears have a bias)
        return out if bias is None else out + bias.to(out.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        codes, codebooks, scales = ctx.saved_tensors
        weight = _dequantize_weight(unpack_int_data(codes, codebooks.shape[1].bit_length() - 1), codebooks, scales)
        return grad_output @ weight.to(grad_output.dtype), None, None, None, None


_OPS = _DequantMatmul()


def _always(_input):
    return True


def install_cpu_kernels(model_or_layer):
    """Give every aqlm layer qadapt's kernel choice (see ``aqlm.py``'s docstring); codes go back to AQLM's layout."""
    layers = [model_or_layer] if isinstance(model_or_layer, aqlm.QuantizedLinear) else [
        m for m in model_or_layer.modules() if isinstance(m, aqlm.QuantizedLinear)
    ]
    for layer in layers:
        canonicalize_codes(layer)
        layer.gemv_op = layer.gemm_op = _OPS
        layer.use_gemv_rule = _always
    return model_or_layer


def install_serving_kernels(model):
    """Leave every aqlm layer to aqlm's own kernel choice (on CUDA: its CUDA/Triton kernels, which read the codes as
    stored), and refuse a forward in training mode with gradients on: those kernels' input gradient is wrong."""
    for layer in model.modules():
        if isinstance(layer, aqlm.QuantizedLinear):
            canonicalize_codes(layer)
            layer.gemv_op = layer.gemm_op = layer.use_gemv_rule = None
    # one hook on the model, not one per layer: a decode step runs it once
    model.register_forward_pre_hook(_refuse_training)
    return model


def _refuse_training(module, args):
    if module.training and torch.is_grad_enabled():
        from qadapt.errors import IncompatibleError

        raise IncompatibleError(
            "train on a kernel='aqlm' base", "aqlm's own CUDA kernels pass back a wrong input gradient for 256-entry "
            "codebooks: qadapt serves on them and does not train", "Load the model with kernel='dequantize' to train, "
            "or call model.eval() (or run under torch.no_grad()) to serve")


def _codes_permuted(module) -> bool:
    """True when aqlm's CPU ``prepare_matmul_op`` has transposed ``codes`` in place for its numba kernel (it never
    does on CUDA, where the shape test alone would be ambiguous for a layer with as many input groups as outputs)."""
    if module.gemv_op is None or module.gemv_op is _OPS or module.codebook_size != 256 or module.codes.is_cuda:
        return False
    num_out_groups = module.out_features // module.out_group_size
    num_in_groups = module.in_features // module.in_group_size
    return tuple(module.codes.shape[:2]) == (num_in_groups, num_out_groups)


def canonicalize_codes(module) -> None:
    """Undo aqlm's in-place CPU permutation of ``codes`` (so they can be saved, de-quantized and trained)."""
    if _codes_permuted(module):
        module.codes.data = module.codes.data.permute(1, 0, 2).contiguous()
        module.gemv_op = module.gemm_op = module.use_gemv_rule = None


def unsigned_codes(module):
    """The layer's codes as unsigned integers, in AQLM's (out groups, in groups, codebooks) layout, on the CPU."""
    codes = module.codes.detach()
    if _codes_permuted(module):
        codes = codes.permute(1, 0, 2)
    return unpack_int_data(codes, module.nbits_per_codebook).cpu()


# ---------------------------------------------------------------------- small helpers
def pack_codes(codes, nbits):
    """Unsigned codes -> AQLM's stored signed integers (aqlm.utils.pack_int_data, which runs under
    inference_mode and so returns tensors autograd refuses to save for backward)."""
    codes = codes.long().clone()
    codes[codes >= 2 ** (nbits - 1)] -= 2**nbits
    return codes.to(get_int_dtype(nbits))
