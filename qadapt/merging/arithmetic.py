"""The merged weight ``W'`` of each adapter method, computed in float32 from a de-quantized base weight ``W``: the same
arithmetic for every backend."""

from __future__ import annotations


def merged_weight(layer, method: str, adapter: str, weight):
    """``W'`` for one tuner layer: ``weight`` (float32, de-quantized) with the adapter folded in.

    Returns ``(W', bias_scale)``: ``bias_scale`` is a vector to multiply the bias with (IA3 on outputs) or None.

    ``weight`` and ``W'`` are ``(out, in)`` whatever the layer stores: PEFT computes the weight change of a
    ``fan_in_fan_out`` layer (transformers' Conv1D, weight stored (in, out)) in that layer's layout, turned here.
    """
    layout = (lambda t: t.t()) if getattr(layer, "fan_in_fan_out", False) else (lambda t: t)
    if method in ("lora", "vera", "adalora"):
        if method == "lora" and adapter in getattr(layer, "lora_variant", {}):  # DoRA
            return _dora(layer, adapter, weight, layout), None
        if method == "adalora":
            delta = _adalora_delta(layer, adapter)
        elif hasattr(layer, "get_delta_weight"):
            delta = layout(layer.get_delta_weight(adapter).float())
        else:
            delta = _lora_delta(layer, adapter)
        return weight + delta.to(weight.device), None
    if method == "dora":
        return _dora(layer, adapter, weight, layout), None
    if method == "ia3":
        scale = layer.ia3_l[adapter].data.float().to(weight.device)
        if layer.is_feedforward:  # scales inputs: columns of W; shape (1, in)
            return weight * scale.view(1, -1), None
        return weight * scale.view(-1, 1), scale.view(-1)  # scales outputs: rows of W and the bias
    raise ValueError(f"unknown method {method!r}")


def _dora(layer, adapter, weight, layout):
    # PEFT's DoRA merge works in the layer's own layout (it reads the base layer's weight itself)
    return layout(layer.lora_variant[adapter].merge_safe(layer, adapter, layout(weight).to(_adapter_dtype(layer, adapter)))).float()


def expert_deltas(wrappers, adapter) -> dict:
    """``{parameter name: weight change}`` of a chain of PEFT ``lora.ParamWrapper`` layers over one fused-experts
    module (each wrapper adapts one 3-D parameter; its delta has the parameter's shape)."""
    return {wrapper.parameter_name: wrapper.get_delta_weight(adapter).float() for wrapper in wrappers}


def _lora_delta(layer, adapter):
    a = layer.lora_A[adapter].weight.float()
    b = layer.lora_B[adapter].weight.float()
    return (b @ a) * layer.scaling[adapter]


def _adalora_delta(layer, adapter):
    # AdaLoRA's SVD form: B (A * E) * scaling / ranknum, as in PEFT's SVDLinear.get_delta_weight.
    a, b, e = layer.lora_A[adapter].float(), layer.lora_B[adapter].float(), layer.lora_E[adapter].float()
    return (b @ (a * e)) * layer.scaling[adapter] / (layer.ranknum[adapter].float() + 1e-5)


def _adapter_dtype(layer, adapter):
    return layer.lora_A[adapter].weight.dtype
