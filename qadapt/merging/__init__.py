"""Explicit, measured, reversible merges.

qadapt merges with its own arithmetic, the same for every backend: de-quantize the base weight ``W``, compute the
merged weight ``W'`` of the adapter method (:mod:`.arithmetic`), and either re-quantize ``W'`` in the backend's format
(``"requantize"``, with the backend's policies: :mod:`.requant`, :mod:`.plan`) or keep it in full precision
(``"dequantize"``). The original quantized modules are kept aside, so an unmerge puts back the exact original tensors.
Every merge is measured (:mod:`.engine`): per layer, how much of the adapter's weight change survives re-quantization;
for the model, the output error on a calibration batch against the unmerged adapter model, which computes
``deq(W) x + adapter(x)`` exactly, i.e. the unquantized merge (:mod:`.report`).
"""

from .report import LayerMerge, MergeReport, MergeState

__all__ = ["LayerMerge", "MergeReport", "MergeState"]
