"""EETQ's int8 format in torch: the layout functions and the layer (imported only when the eetq backend is used).

See ``qadapt_plugins/eetq.py`` for the format; this module holds everything that needs torch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ROW_PERMUTATION = (0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15)
BYTE_SWAP = (0, 2, 1, 3)  # its own inverse
TILE = 64  # both dimensions must be multiples of this (EETQ's kernels have the same limit)


def _check_shape(rows, cols):
    if rows % TILE or cols % TILE:
        raise ValueError(f"EETQ's int8 layout needs both weight dimensions to be multiples of {TILE}; got {cols}x{rows}")


def symmetric_quantize(weight):
    """EETQ's ``quant_weights(W^T, int8)`` before preprocessing: ``W`` is (out, in); returns ``q^T`` int8 (in, out)
    and float16 scales (out,). Scale ``max|W_row| / 128`` (float32 for the rounding, stored in float16); C's
    ``round`` (half away from zero); clamp to [-128, 127]."""
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
    return torch.tensor(values, device=device)


def preprocess_int8(q):
    """EETQ's ``preprocess_weights`` for SM75-SM89 on an int8 (in, out) matrix (see the module docstring)."""
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
    from EETQ import quant_weights  # the compiled extension shipped by the eetq wheel

    q, scales = quant_weights(weight.detach().t().contiguous().to(torch.float16).cpu(), torch.int8, False)
    return q, scales.to(torch.float16)


class EetqTorchLinear(torch.nn.Module):
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
