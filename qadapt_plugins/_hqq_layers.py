"""The HQQ layer qadapt builds: hqq's own ``HQQLinear``, made to train under bf16/fp16 autocast.

hqq 0.2.8's training matmul (``HQQMatmulNoCacheMul``, hqq/core/quantize.py:322) is a custom autograd Function
without ``torch.amp.custom_fwd/custom_bwd``: under autocast its forward returns bfloat16, but its backward runs
outside autocast and multiplies the bfloat16 gradient with the weight de-quantized in the layer's compute dtype:
"expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float" on the first backward of every
``Trainer(bf16=True)`` run (TRL's SFTTrainer default too). A backward hook cannot fix it (torch refuses hooks that
change a gradient's dtype). So under autocast the layer runs with autocast off, on its input cast to the compute
dtype: its output and gradients are then in the compute dtype, and the next autocast op casts down again. (Worth
an upstream report to hqq: decorating the Function would fix it there.) Outside autocast, an input in another dtype
than the compute dtype (``compute_dtype='bfloat16'`` on a float32 model) is cast to it, and the output back: hqq's
matmul refused the mix ("expected m1 and m2 to have the same dtype") at the first forward.

The class keeps hqq's name on purpose: PEFT recognises HQQ layers by class name (``_get_in_out_features`` in
peft/tuners/tuners_utils.py, peft 0.21) and warns "Unsupported layer type" for any other.
"""

from __future__ import annotations

import torch
from hqq.core import quantize


class HQQLinear(quantize.HQQLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return super().forward(x.to(self.compute_dtype))
        if x.dtype != self.compute_dtype:  # compute_dtype chosen apart from the model's dtype: the matmul runs in it
            return super().forward(x.to(self.compute_dtype)).to(x.dtype)
        return super().forward(x)

    @classmethod
    def set_backend(cls, backend) -> None:
        # hqq's __init__ calls self.set_backend(...), which assigns hqq's forward to the instance's class
        # (``cls.forward = ...``) and would replace the one above: choose the backend on hqq's class instead, whose
        # forward this one calls
        quantize.HQQLinear.set_backend(backend)
