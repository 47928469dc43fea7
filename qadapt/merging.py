"""Explicit, measured, reversible merges.

qadapt merges with its own arithmetic, the same for every backend: de-quantize the base weight ``W``, compute the
merged weight ``W'`` of the adapter method, and either re-quantize ``W'`` in the backend's format (``"requantize"``) or
keep it in full precision (``"dequantize"``). The original quantized modules are kept aside, so :func:`unmerge` puts
back the exact original tensors. Every merge is measured: per layer, how much of the adapter's weight change
survives re-quantization; for the model, the output error on a calibration batch against the unmerged adapter model,
which computes ``deq(W) x + adapter(x)`` exactly, i.e. the unquantized merge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerMerge:
    name: str
    delta_norm: float  # ||W' - W||, the weight change the adapter asks for
    kept_error: float  # ||(deq(Q(W')) - W) - (W' - W)|| / ||W' - W||: 0 = all of it survives

    @property
    def kept(self) -> float:
        return max(0.0, 1.0 - self.kept_error)


@dataclass
class MergeReport:
    backend: str
    method: str
    strategy: str
    output_error: float  # ||y_merged - y_ref|| / ||y_ref|| on the calibration batch
    max_abs_error: float
    layers: list[LayerMerge] = field(default_factory=list)
    policy: str = ""  # the re-quantization policy kept ("fresh", "best", "best+inputs"), where there was a choice
    candidates: dict = field(default_factory=dict)  # output error of each policy tried

    @property
    def mean_kept(self) -> float:
        return sum(layer.kept for layer in self.layers) / max(1, len(self.layers))

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mean_kept"] = self.mean_kept
        return data

    def __str__(self) -> str:
        lines = [
            f"merge {self.method!r} on {self.backend} ({self.strategy}): output error {self.output_error:.2e} "
            f"(max abs {self.max_abs_error:.2e}), {len(self.layers)} layers, mean weight change kept {self.mean_kept:.1%}"
        ]
        if self.candidates:
            tried = ", ".join(f"{name} {error:.2e}" for name, error in self.candidates.items())
            lines.append(f"  policy kept: {self.policy} (output error of each tried: {tried})")
        worst = sorted(self.layers, key=lambda layer: layer.kept_error, reverse=True)[:5]
        lines += [f"  {layer.name}: kept {layer.kept:.1%} of ||dW||={layer.delta_norm:.3e}" for layer in worst]
        return "\n".join(lines)


@dataclass
class MergeState:
    """What a merge replaced, to undo it exactly."""

    strategy: str
    adapter_name: str
    originals: dict = field(default_factory=dict)  # module path -> the module (tuner or quantized layer) it replaced
    report: MergeReport | None = None


def merged_weight(layer, method: str, adapter: str, weight):
    """``W'`` for one tuner layer: ``weight`` (float32, de-quantized) with the adapter folded in.

    Returns ``(W', bias_scale)``: ``bias_scale`` is a vector to multiply the bias with (IA3 on outputs) or None.
    """
    if method in ("lora", "vera", "adalora"):
        if method == "lora" and adapter in getattr(layer, "lora_variant", {}):  # DoRA
            return layer.lora_variant[adapter].merge_safe(layer, adapter, weight.to(_adapter_dtype(layer, adapter))).float(), None
        if method == "adalora":
            delta = _adalora_delta(layer, adapter)
        elif hasattr(layer, "get_delta_weight"):
            delta = layer.get_delta_weight(adapter).float()
        else:
            delta = _lora_delta(layer, adapter)
        return weight + delta.to(weight.device), None
    if method == "dora":
        return layer.lora_variant[adapter].merge_safe(layer, adapter, weight.to(_adapter_dtype(layer, adapter))).float(), None
    if method == "ia3":
        scale = layer.ia3_l[adapter].data.float().to(weight.device)
        if layer.is_feedforward:  # scales inputs: columns of W; shape (1, in)
            return weight * scale.view(1, -1), None
        return weight * scale.view(-1, 1), scale.view(-1)  # scales outputs: rows of W and the bias
    raise ValueError(f"unknown method {method!r}")


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


def relative_error(actual, expected) -> tuple[float, float]:
    diff = (actual.float() - expected.float())
    return (diff.norm() / expected.float().norm().clamp_min(1e-12)).item(), diff.abs().max().item()
