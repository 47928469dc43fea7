"""A PEFT LoRA layer for quantized layers PEFT does not know, for backend authors.

PEFT's LoRA wraps layer classes it knows; for others, ``LoraConfig._register_custom_module`` takes
``{layer class: LoRA layer class}``. :func:`requantizing_lora_layer` makes that LoRA layer class for a backend:
forward is PEFT's (the quantized layer's output plus the LoRA path); PEFT's own ``merge`` (``merge_and_unload``)
de-quantizes with the backend, folds the adapter in and re-quantizes into a new base layer, and ``unmerge`` puts the
exact original base layer back. A backend returns it from ``peft_layer_types``::

    def peft_layer_types(self):
        return {MyQuantLinear: requantizing_lora_layer(self, dora=True)}

qadapt's own ``qadapt.merge`` does not go through this class: it swaps whole layers itself.
"""

from __future__ import annotations

_CLASSES: dict = {}


def requantizing_lora_layer(backend, *, dora: bool = False, prepare=None):
    """The LoRA layer class for ``backend``'s quantized layers (one class per backend and settings, made on first use).

    :param dora: whether PEFT's DoRA variant may run on it (DoRA reads ``base_layer.weight``: only for layers that
        expose a de-quantized ``weight``); otherwise ``use_dora`` is refused with ``ValueError``, as PEFT refuses what
        its layers cannot do.
    :param prepare: ``prepare(base_layer)``, called before PEFT wraps a layer (e.g. to materialise its weight).
    """
    key = (type(backend), backend.name, dora, prepare)
    if key in _CLASSES:
        return _CLASSES[key]
    import torch
    from peft.tuners.lora.layer import Linear
    from peft.tuners.tuners_utils import check_adapters_to_merge

    class RequantizingLoraLinear(Linear):
        def __init__(self, base_layer, adapter_name, config, **kwargs):
            if prepare is not None:
                prepare(base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer)
            if config.lora_bias or (config.use_dora and not dora):
                refused = "lora_bias" if config.lora_bias else "DoRA"
                raise ValueError(f"{backend.name} layers support {'LoRA and DoRA' if dora else 'plain LoRA'} only "
                                 f"(no {refused})")
            self._qadapt_originals = []
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            for adapter in check_adapters_to_merge(self, adapter_names) or []:
                if adapter not in self.lora_A.keys():
                    continue
                base = self.get_base_layer()
                weight = backend.dequantize(base)
                if adapter in self.lora_variant:
                    merged = self.lora_variant[adapter].merge_safe(self, adapter, weight)
                else:
                    merged = weight + self.get_delta_weight(adapter).float()
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights of adapter {adapter}")
                self._qadapt_originals.append(base)
                self.base_layer = backend.requantize(base, merged)
                self.merged_adapters.append(adapter)

        def unmerge(self) -> None:
            while self.merged_adapters:
                self.merged_adapters.pop()
                self.base_layer = self._qadapt_originals.pop()

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    RequantizingLoraLinear.__qualname__ = RequantizingLoraLinear.__name__ = f"{backend.name.capitalize()}LoraLinear"
    _CLASSES[key] = RequantizingLoraLinear
    return RequantizingLoraLinear
