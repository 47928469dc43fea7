"""Building, measuring and applying a merge: every candidate is built for every adapted layer, the whole model is run
with it, and the candidate with the lowest output error is kept (or refused above ``max_error``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..hf import replace_module
from .arithmetic import merged_weight
from .plan import Candidate
from .report import LayerMerge, MergeState, relative_error


@dataclass
class Target:
    """One adapted layer: its name, its quantized base, the base weight ``W`` and the merged weight ``W'``."""

    name: str
    base: object
    weight: object
    merged: object
    bias_scale: object  # IA3 on outputs scales the bias too; None otherwise


@dataclass
class Built:
    """One candidate, built and measured."""

    candidate: Candidate
    output_error: float
    max_abs_error: float
    swaps: dict  # module path -> the module that replaces it
    layers: list  # LayerMerge per adapted layer


def tuner_layers(inner, adapter_name):
    """``(name, layer)`` of every PEFT tuner layer of ``inner`` on which ``adapter_name`` is active."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        (name, module)
        for name, module in inner.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "active_adapters", [])
    ]


def measure_batch(inner, calibration):
    """The token ids a merge is measured on: the calibration batch, else a fixed random one."""
    import torch

    device = next(inner.parameters()).device
    if calibration is not None:
        batch = torch.as_tensor(calibration, dtype=torch.long)
        return (batch if batch.dim() == 2 else batch.unsqueeze(0)).to(device)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, inner.config.vocab_size, (2, 32), generator=generator).to(device)


def reference_outputs(model, layers, batch, collect_inputs: bool):
    """The unmerged adapter model's logits on ``batch``; with ``collect_inputs``, also ``X^T X / n`` of every adapted
    layer's inputs (for backends that round with input statistics)."""
    sums: dict = {}

    def statistics(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x / x.shape[0]

        return hook

    hooks = [layer.register_forward_pre_hook(statistics(name)) for name, layer in layers] if collect_inputs else []
    try:
        return model(input_ids=batch).logits, sums
    finally:
        for handle in hooks:
            handle.remove()


def targets(layers, backend, method, adapter_name) -> list[Target]:
    from ..proxy import unwrap

    found = []
    for name, layer in layers:
        base = unwrap(layer.get_base_layer())
        weight = backend.dequantize(base)
        merged, bias_scale = merged_weight(layer, method, adapter_name, weight)
        found.append(Target(name, base, weight, merged, bias_scale))
    return found


def build(model, inner, backend, strategy, candidate: Candidate, found: list[Target], hessians, batch, reference,
          report) -> Built:
    """Every adapted layer merged the candidate's way, the model run with them in place (and put back), measured."""
    import torch

    swaps, layers = {}, []
    for target in found:
        report.advance(f"{candidate.label or strategy} {target.name}")
        if strategy == "dequantize":
            new_base = full_precision_linear(target.base, target.merged, inner)
        else:
            new_base = backend.requantize(target.base, target.merged, **candidate.requantize_keywords(hessians.get(target.name)))
        if target.bias_scale is not None and getattr(target.base, "bias", None) is not None:
            new_base.bias = torch.nn.Parameter(target.base.bias.detach() * target.bias_scale.to(target.base.bias.dtype),
                                               requires_grad=False)
        delta = target.merged - target.weight
        stored = backend.dequantize(new_base) if strategy == "requantize" else target.merged
        kept_error, _ = relative_error(stored - target.weight, delta) if delta.norm() > 0 else (0.0, 0.0)
        layers.append(LayerMerge(target.name, delta.norm().item(), kept_error))
        # The whole tuner layer steps aside (kept, untouched, for unmerge): not every PEFT layer honours its own
        # "merged" flag (AdaLoRA's bitsandbytes layers add the adapter again).
        swaps[target.name] = new_base
    if strategy == "dequantize":
        for name, module in list(inner.named_modules()):
            if backend.is_quantized_layer(module) and not any(name == n or name.startswith(n + ".") for n in swaps):
                swaps[name] = full_precision_linear(module, backend.dequantize(module), inner)
    trial = MergeState(strategy=strategy, adapter_name="")
    try:
        apply(inner, trial, swaps)
        merged = model(input_ids=batch).logits
    finally:
        restore(inner, trial)
    error, max_abs = relative_error(merged, reference)
    return Built(candidate, error, max_abs, swaps, layers)


def apply(inner, state: MergeState, swaps: dict) -> None:
    """Put every module of ``swaps`` in place, keeping the ones they replace in ``state`` (for :func:`restore`)."""
    for name, module in swaps.items():
        state.originals[name] = inner.get_submodule(name)
        replace_module(inner, name, module)


def restore(inner, state: MergeState) -> None:
    """Put back every module :func:`apply` replaced, exactly."""
    for name, module in state.originals.items():
        replace_module(inner, name, module)
    state.originals = {}


def full_precision_linear(base, weight, inner):
    """An ``nn.Linear`` in the model's float dtype holding ``weight`` and ``base``'s bias, frozen."""
    import torch

    dtype = getattr(inner, "dtype", torch.float32)
    dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=getattr(base, "bias", None) is not None,
                             device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(base.bias.detach())
    linear.weight.requires_grad_(False)
    return linear


def merge(model, record, backend, strategy: str, *, max_error=None, calibration=None, policy=None):
    """Merge the active adapter of ``model`` (checked by the caller against the capability table), keep the best
    candidate, refuse above ``max_error`` with nothing changed; return the :class:`MergeReport`."""
    import torch

    from ..errors import MergeRefusedError
    from ..record import base_model
    from .plan import candidates
    from .report import MergeReport

    from .. import progress

    if record.sharded is not None:
        from ..errors import IncompatibleError

        raise IncompatibleError(f"merge a model sharded by {record.sharded}", "each rank holds a share of every "
                                "quantized layer, and a merge needs whole layers",
                                "Save with qadapt.distributed.save, then qadapt.load the folder in one process and "
                                "merge there")

    inner = base_model(model)
    batch = measure_batch(inner, calibration)
    layers = tuner_layers(inner, record.adapter_name)
    plan = candidates(backend, strategy, policy, calibration is not None)
    with torch.no_grad(), progress.step(f"merge {record.method!r} ({strategy})", total=len(plan) * len(layers)) as steps:
        reference, hessians = reference_outputs(model, layers, batch, any(c.with_inputs for c in plan))
        found = targets(layers, backend, record.method, record.adapter_name)
        tried = [build(model, inner, backend, strategy, candidate, found, hessians, batch, reference, steps)
                 for candidate in plan]
    best = tried[0]
    for built in tried[1:]:
        if built.output_error < best.output_error:
            best = built
    report = MergeReport(record.backend or "none", record.method, strategy, best.output_error, best.max_abs_error,
                         best.layers, policy=best.candidate.label,
                         candidates={b.candidate.label: b.output_error for b in tried} if len(tried) > 1 else {})
    if max_error is not None and best.output_error > max_error:
        raise MergeRefusedError(
            f"merge {record.method!r} with strategy={strategy!r}, max_error={max_error}",
            f"the merged model's output error is {best.output_error:.3g}, above max_error (nothing was changed)",
            "Look at the refusal's .report for the layers that lost most; pass calibration= text like the training "
            "data (a random batch overstates the error); use strategy='dequantize' for an exact merge, raise "
            "max_error, or keep the adapter separate",
            report=report,
        )
    state = MergeState(strategy=strategy, adapter_name=record.adapter_name, report=report)
    apply(inner, state, best.swaps)
    record.merge = state
    return report
