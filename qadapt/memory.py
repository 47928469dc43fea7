"""True storage of a model's weights: ``get_memory_footprint()`` reports the full-precision size for torchao's
tensor subclasses and misses what bitsandbytes hangs on its parameters.

:func:`storage_bytes` walks every tensor reachable from parameters, buffers, tensor subclasses
(``__tensor_flatten__``: torchao), attributes of parameter objects (bitsandbytes' ``quant_state`` with its nested
double-quant state, LLM.int8's ``SCB``), the ``quant_state`` of bitsandbytes' parametrizations (4-bit MoE experts),
HQQ's ``meta`` dicts and tensors held as plain module attributes (INC's layers cache their de-quantized float32 weight
as ``layer.weight`` after the first forward: more than the packed model itself on the toy Llama, and neither a
parameter nor a buffer); each storage is counted once. Bits per matmul weight after a load: ``qadapt.load_report(model)``.
"""

from __future__ import annotations


def storage_bytes(model, include=None) -> int:
    """Bytes of every distinct tensor storage ``model`` (any ``nn.Module``) holds.

    :param include: optional predicate on module names: only modules (and their children) it accepts are counted.
    """
    import torch

    seen: set = set()
    total = 0

    def add(obj, depth=0):
        nonlocal total
        if depth > 6 or obj is None:
            return
        if isinstance(obj, torch.nn.Module):  # back-references (Params4bit.module) are not storage of their own
            return
        if isinstance(obj, torch.Tensor):
            data = obj.data if isinstance(obj, torch.nn.Parameter) else obj
            if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
                for name in data.__tensor_flatten__()[0]:
                    add(getattr(data, name), depth + 1)
            elif data.device.type != "meta":
                storage = data.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
            # bitsandbytes hangs its statistics on the parameter object itself (quant_state, SCB, CB)
            for key, value in getattr(obj, "__dict__", {}).items():
                if key != "module":
                    add(value, depth + 1)
            return
        if isinstance(obj, dict):
            for value in obj.values():
                add(value, depth + 1)
            return
        if isinstance(obj, (list, tuple)):
            for value in obj:
                add(value, depth + 1)
            return
        if type(obj).__name__ in ("QuantState", "MatmulLtState"):
            for value in vars(obj).values():
                add(value, depth + 1)

    for name, module in model.named_modules():
        if include is not None and not include(name):
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            add(tensor)
        meta = getattr(module, "meta", None)  # HQQ: scales and zeros
        if isinstance(meta, dict):
            add(meta)
        state = getattr(module, "state", None)  # bitsandbytes 8-bit: MatmulLtState (CB/SCB share the weight's)
        if type(state).__name__ == "MatmulLtState":
            add(state)
        # bitsandbytes' parametrization of fused MoE experts (bitsandbytes.nn.parametrize) keeps the QuantState on
        # the parametrization module, not on a parameter: without this, 4-bit experts' absmax were not counted
        quant_state = module.__dict__.get("quant_state")
        if type(quant_state).__name__ == "QuantState":
            add(quant_state)
        for value in vars(module).values():  # plain tensor attributes: INC caches its de-quantized weight there
            if isinstance(value, torch.Tensor):
                add(value)
    return total
