"""Training configurations: :func:`prepare` puts a model in its fastest low-memory training setup, part by part.

One module per part: ``checkpointing`` (recompute / offload, input gradients), ``dtypes`` (PEFT's kbit upcast and
freezing), ``dequant`` (the backends' training de-quantization routes), ``lora`` (fused LoRA Function), ``mlp``
(fused SwiGLU), ``norm`` (lean RMSNorm), ``loss`` (chunked linear cross-entropy), ``compiling`` (regional compile);
``settings`` (modes and choices), ``report`` (what was done), ``patching`` (reversible changes), ``prepare``.
"""

from .prepare import prepare, report_of, unprepare
from .report import PartReport, PrepareReport

__all__ = ["prepare", "unprepare", "report_of", "PrepareReport", "PartReport"]
