"""gptqmodel's AWQ torch layer computing in float32 (imported only when the awq backend is used; see ``awq.py``)."""

from __future__ import annotations

from ._gptqmodel_common import import_gptqmodel

import_gptqmodel()  # quietly, before any gptqmodel module

import torch  # noqa: E402
from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear  # noqa: E402

from .awq import dequantize_awq  # noqa: E402


class AwqTorchLinearFloat32(AwqTorchLinear):
    """``AwqTorchLinear`` whose forward computes in float32 for float32 inputs (gptqmodel's casts every input to
    float16): the de-quantized weight is exact in float32, so a float32 model stays float32."""

    _qadapt_float32 = True

    def forward(self, x):
        if x.dtype != torch.float32:
            return super().forward(x)
        weight = dequantize_awq(self).T  # (in, out), float32
        out = torch.matmul(x, weight)
        if self.bias is not None:
            out = out + self.bias.float()
        return out
