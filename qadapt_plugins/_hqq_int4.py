"""HQQ's serving kernel: an HQQ 4-bit layer as tinygemm's int4 matmul (``torch.ops.aten._weight_int4pack_mm``, CUDA).

HQQ's own conversion (``hqq.backends.torchao.HQQLinearTorchWeightOnlynt4``, hqq 0.2.8) hands
``torch.ops.aten._convert_weight_to_int4pack`` the codes as int32 (one a value); since torch 2.5 the op takes uint8,
two codes a byte, and refuses int32 ("Expected in.dtype() == at::kByte", H200, torch 2.11, 2026-12-02). The class
below is HQQ's, with that one step packed the way torch (and torchao's tinygemm layout) now packs it: the high nibble
is the even column. Everything else (the conversion of HQQ's scales and zeros, the matmul) is HQQ's code.
(Worth an upstream report to hqq.)
"""

from __future__ import annotations

import torch
from hqq.backends.torchao import HQQLinearTorchWeightOnlynt4
from hqq.core.quantize import Quantizer


class TinygemmInt4Linear(HQQLinearTorchWeightOnlynt4):
    @classmethod
    def from_hqq(cls, layer):
        """The tinygemm layer holding ``layer``'s (an ``HQQLinear``, 4-bit, grouped along its rows) codes."""
        if layer.meta["nbits"] != 4 or layer.meta["axis"] != 1:
            raise ValueError(f"tinygemm takes 4-bit weights grouped along the rows (axis=1), not nbits="
                             f"{layer.meta['nbits']}, axis={layer.meta['axis']}")
        converted = cls(None, quant_config=layer.quant_config, compute_dtype=layer.compute_dtype, device=layer.device,
                        del_orig=False, initialize=False, padding=False)
        return converted.initialize_with_hqq_quants(layer.W_q, layer.meta, layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.compute_dtype:  # a float32 model with compute_dtype='bfloat16': tinygemm takes bfloat16
            return super().forward(x.to(self.compute_dtype)).to(x.dtype)
        return super().forward(x)

    @torch.no_grad()
    def process_hqq_quants(self, W_q, meta):
        scales, zeros, shape = meta["scale"], meta["zero"], meta["shape"]
        if meta["packing"] is not None:
            W_q = Quantizer.unpack[meta["packing"]](W_q)
        if self.groupsize is None:
            self.groupsize = 128
            W_q = W_q.reshape([-1, self.groupsize])
            scales = self.reshape_meta_axis1(scales, self.groupsize, shape)
            zeros = self.reshape_meta_axis1(zeros, self.groupsize, shape)
        codes, scales, zeros = self.hqq_quants_to_torch_quants(W_q=W_q, scales=scales, zeros=zeros, shape=shape,
                                                              nbits=self.nbits)
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)  # (out, in / 2): two codes a byte
        self.weight_int4pack = torch.ops.aten._convert_weight_to_int4pack(packed, self.inner_k_tiles)
        self.scales_and_zeros = self.pack_scales_and_zeros(scales, zeros)
