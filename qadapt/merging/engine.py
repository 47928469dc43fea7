"""Building, measuring and applying a merge: every candidate is built for every adapted layer, the whole model is run
with it, and the candidate with the lowest output error is kept (or refused above ``max_error``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..hf import replace_module
from .arithmetic import merged_weight
from .plan import Candidate
from .report import LayerMerge, MergeState, relative_error


@dataclass
class Target:
    """One adapted layer: its name, its quantized base, the base weight ``W`` and the merged weight ``W'``.

    ``owner`` is the backend that stores ``base``: the model's backend for its quantized layers, the full-precision
    one for layers it left in full precision (by design, or allowed by the user). For fused MoE experts adapted
    through PEFT's ``target_parameters``, ``weight`` and ``merged`` are ``{parameter name: tensor}``."""

    name: str
    base: object
    weight: object
    merged: object
    bias_scale: object  # IA3 on outputs scales the bias too; None otherwise
    owner: object = None
    quantized: bool = True

    @property
    def experts(self) -> bool:
        return isinstance(self.weight, dict)


@dataclass
class Built:
    """One candidate, built and measured."""

    candidate: Candidate
    output_error: float
    max_abs_error: float
    swaps: dict  # module path -> the module that replaces it
    layers: list  # LayerMerge per adapted layer


def tuner_layers(inner, adapter_name):
    """``(name, layer)`` of every PEFT tuner layer of ``inner`` that holds ``adapter_name``, active. A layer that only
    lists it as active (PEFT sets the active adapter on every layer, holding it or not) is not one: merging it would
    read weights it does not have."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..adapters import holds

    return [
        (name, module)
        for name, module in inner.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "active_adapters", [])
        and holds(module, adapter_name)
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
    from ..unquantized import UNQUANTIZED

    found = []
    wrappers = dict(layers)
    for name, layer in layers:
        if _is_parameter_wrapper(layer):
            if name.endswith(".base_layer") and _is_parameter_wrapper(wrappers.get(name[: -len(".base_layer")])):
                continue  # an inner wrapper of a chain: merged with its outermost one
            found.append(_experts_target(name, layer, adapter_name))
            continue
        base = unwrap(layer.get_base_layer())
        quantized = backend.is_quantized_layer(base)
        owner = backend if quantized else UNQUANTIZED
        weight = owner.dequantize(base)
        merged, bias_scale = merged_weight(layer, method, adapter_name, weight)
        found.append(Target(name, base, weight, merged, bias_scale, owner, quantized))
    return found


def _finite(merged) -> bool:
    import torch

    tensors = merged.values() if isinstance(merged, dict) else (merged,)  # fused experts: {parameter: tensor}
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _is_parameter_wrapper(layer) -> bool:
    from peft.tuners.lora.layer import ParamWrapper

    return isinstance(layer, ParamWrapper)


def _experts_target(name, wrapper, adapter_name) -> Target:
    """The merge target of a chain of PEFT ``ParamWrapper`` layers over one fused-experts module: every parameter of
    the module read de-quantized (a parametrized attribute de-quantizes on access), the adapted ones merged."""
    import torch.nn.utils.parametrize as parametrize

    from ..inventory import expert_parameters
    from .arithmetic import expert_deltas

    chain, layer = [], wrapper
    while _is_parameter_wrapper(layer):
        chain.append(layer)
        layer = layer.base_layer
    deltas = expert_deltas(chain, adapter_name)
    weight = {p: getattr(layer, p).detach().float() for p in expert_parameters(layer)}
    merged = {p: w + deltas[p].to(w.device) if p in deltas else w for p, w in weight.items()}
    return Target(name, layer, weight, merged, None, None, parametrize.is_parametrized(layer))


def build(model, inner, backend, strategy, candidate: Candidate, found: list[Target], hessians, batch, reference,
          report) -> Built:
    """Every adapted layer merged the candidate's way, the model run with them in place (and put back), measured."""
    import torch

    swaps, layers = {}, []
    for target in found:
        report.advance(f"{candidate.label or strategy} {target.name}")
        if target.experts:
            new_base = _merged_experts(target, backend, strategy, inner)
            for parameter, merged in target.merged.items():
                delta = merged - target.weight[parameter]
                if delta.norm() > 0:
                    kept, _ = relative_error(getattr(new_base, parameter).float() - target.weight[parameter], delta)
                    layers.append(LayerMerge(f"{target.name}.{parameter}", delta.norm().item(), kept))
            swaps[target.name] = new_base
            continue
        if strategy == "dequantize":
            new_base = full_precision_linear(target.base, target.merged, inner)
        elif target.quantized:
            new_base = backend.requantize(target.base, target.merged, **candidate.requantize_keywords(hessians.get(target.name)))
        else:  # a layer the backend left in full precision: merged exactly
            new_base = target.owner.requantize(target.base, target.merged)
        if target.bias_scale is not None and getattr(target.base, "bias", None) is not None:
            # a de-quantized merge's nn.Linear is in the model's dtype where EETQ's bias is float16; a re-quantized layer
            # keeps the base's bias dtype (INC's forward turns its bias to float32 in place, and refuses a new one)
            dtype = new_base.bias.dtype if strategy == "dequantize" else target.base.bias.dtype
            new_base.bias = torch.nn.Parameter((target.base.bias.detach() * target.bias_scale).to(dtype),
                                               requires_grad=False)
        delta = target.merged - target.weight
        stored = target.owner.dequantize(new_base) if strategy == "requantize" else target.merged
        kept_error, _ = relative_error(stored - target.weight, delta) if delta.norm() > 0 else (0.0, 0.0)
        layers.append(LayerMerge(target.name, delta.norm().item(), kept_error))
        # The whole tuner layer steps aside (kept, untouched, for unmerge): not every PEFT layer honours its own
        # "merged" flag (AdaLoRA's bitsandbytes layers add the adapter again).
        swaps[target.name] = new_base
    if strategy == "dequantize":
        import torch.nn.utils.parametrize as parametrize

        from ..hf import unparametrized_copy
        from ..inventory import expert_parameters

        for name, module in list(inner.named_modules()):
            if any(name == n or name.startswith(n + ".") for n in swaps):
                continue
            if backend.is_quantized_layer(module):
                swaps[name] = full_precision_linear(module, backend.dequantize(module), inner)
            elif parametrize.is_parametrized(module) and expert_parameters(module):
                swaps[name] = unparametrized_copy(module, {p: getattr(module, p) for p in expert_parameters(module)},
                                                  _float_dtype(inner))
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


def _merged_experts(target, backend, strategy, inner):
    """The fused-experts module holding ``target.merged``: re-quantized the backend's way where its parameters are
    quantized and the strategy keeps them so, else plain full-precision parameters."""
    from ..hf import unparametrized_copy

    if strategy == "requantize" and target.quantized:
        return backend.requantize_parameters(target.base, target.merged)
    dtype = _float_dtype(inner) if strategy == "dequantize" else None
    if not target.quantized:
        dtype = next(iter(target.base.parameters())).dtype
    return unparametrized_copy(target.base, target.merged, dtype)


def _float_dtype(inner):
    import torch

    dtype = getattr(inner, "dtype", torch.float32)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def full_precision_linear(base, weight, inner):
    """An ``nn.Linear`` in the model's float dtype holding ``weight`` and ``base``'s bias, frozen; a transformers
    ``Conv1D`` (weight stored transposed) where ``base`` is one, so that the merged model saves in its own layout."""
    import torch

    from ..hf import is_conv1d

    dtype = _float_dtype(inner)
    if is_conv1d(base):
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(weight.shape[0], weight.shape[1]).to(device=weight.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(weight.t())
            if base.bias is not None:
                layer.bias.copy_(base.bias.detach())
        if base.bias is None:
            layer.bias = None
        return layer.requires_grad_(False)
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
    if not layers:
        from ..errors import InvalidOptionError

        raise InvalidOptionError(f"merge adapter {record.adapter_name!r}", "the active adapter has no layers in the model "
                                 "(nothing would be merged)", "Activate an adapter that has layers: model.set_adapter(name)")
    plan = candidates(backend, strategy, policy, calibration is not None)
    with torch.no_grad(), progress.step(f"merge {record.method!r} ({strategy})", total=len(plan) * len(layers)) as steps:
        reference, hessians = reference_outputs(model, layers, batch, any(c.with_inputs for c in plan))
        found = targets(layers, backend, record.method, record.adapter_name)
        not_finite = [target.name for target in found if not _finite(target.merged)]
        if not_finite:
            raise MergeRefusedError(f"merge {record.method!r} with strategy={strategy!r}",
                                    f"the merged weight of {not_finite[0]} holds NaN or infinite values (the adapter "
                                    f"does: {len(not_finite)} layer(s)); nothing was changed",
                                    "Check the training (learning rate, loss scaling), or keep the adapter separate")
        tried, seconds = [], {}
        for candidate in plan:
            started = time.perf_counter()
            tried.append(build(model, inner, backend, strategy, candidate, found, hessians, batch, reference, steps))
            seconds[candidate.label] = round(time.perf_counter() - started, 3)
    best = tried[0]
    for built in tried[1:]:
        if built.output_error < best.output_error:
            best = built
    report = MergeReport(record.backend or "none", record.method, strategy, best.output_error, best.max_abs_error,
                         best.layers, policy=best.candidate.label,
                         candidates={b.candidate.label: b.output_error for b in tried} if len(tried) > 1 else {},
                         seconds=seconds)
    if not math.isfinite(best.output_error):
        raise MergeRefusedError(
            f"merge {record.method!r} with strategy={strategy!r}",
            f"the merged model's output error is {best.output_error} (NaN or infinite outputs; nothing was changed)",
            "Check the adapter's weights, or keep the adapter separate",
        )
    if max_error is not None and not best.output_error <= max_error:  # `not <=`: a NaN error is refused too
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


def guard_training(inner, state: MergeState) -> None:
    """While merged, a forward in training mode with gradients on raises: the adapter is folded into frozen weights,
    so training would silently change nothing (unmerge first)."""
    state.guard = inner.register_forward_pre_hook(_refuse_training)


def unguard_training(state: MergeState) -> None:
    if state.guard is not None:
        state.guard.remove()
        state.guard = None


def _refuse_training(module, args):
    import torch

    if module.training and torch.is_grad_enabled():
        from ..errors import InvalidOptionError

        raise InvalidOptionError("train a merged model", "the adapter is merged into frozen weights: training would "
                                 "change nothing", "Call qadapt.unmerge(model) before training, or model.eval() to "
                                 "run it")
