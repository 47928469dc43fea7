"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per decoder layer, then the root.

What the engine does to quantized layers (torch 2.13, bitsandbytes 0.50, hqq 0.2.8, 2 gloo processes): it shards every
parameter on dim 0 as a DTensor and replaces bitsandbytes' ``Params4bit`` by a plain parameter, dropping the
``quant_state`` it carried; bitsandbytes' ``Linear4bit.forward`` then takes the module's ``quant_state``
(``fix_4bit_weight_quant_state_from_module``), which is therefore what must be right. HQQ's ``meta`` dict (scales,
zeros) is not a parameter: FSDP2 leaves it whole on every rank. A ``MixedPrecisionPolicy(param_dtype=...)`` casts
every floating parameter, packed 4-bit bytes stored as float included (14 of 14 layers changed in the test, then a
size error in bitsandbytes; with a size-preserving cast the output would be garbage): refused before sharding.
"""

from __future__ import annotations

from ..errors import ShardingError


def decoder_layers(model) -> list:
    """The repeated blocks, one FSDP unit each: the classes transformers lists in ``_no_split_modules`` (what
    accelerate's transformer-based wrap policy uses)."""
    from ..record import base_model

    inner = base_model(model)
    names = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [module for module in inner.modules() if type(module).__name__ in names]
    if not layers:
        raise ShardingError("shard with FSDP2", f"{type(inner).__name__} names no repeated block in "
                                                "_no_split_modules to make one FSDP unit each",
                            "Use a transformers model class that declares its decoder layer")
    return layers


def check_mixed_precision(model, backend, mixed_precision) -> None:
    """Refuse a policy that would cast packed quantized bytes stored in a floating dtype."""
    from .layers import floating_payloads

    param_dtype = getattr(mixed_precision, "param_dtype", None)
    if param_dtype is None:
        return
    cast = {name: dtype for name, dtype in floating_payloads(model, backend).items() if dtype != param_dtype}
    if cast:
        name, dtype = next(iter(cast.items()))
        raise ShardingError(
            f"shard with MixedPrecisionPolicy(param_dtype={param_dtype})",
            f"FSDP2 would cast the packed quantized bytes of {len(cast)} layer(s) (e.g. {name}, stored as {dtype}) "
            f"to {param_dtype} like weights: the codes would no longer be the codes",
            "Leave param_dtype out (the quantized layers compute in their own compute dtype), or load the model in "
            f"{param_dtype} so that its packed bytes are stored as {param_dtype}",
        )


def wrap(model, *, mesh=None, mixed_precision=None, offload: bool = False, reshard_after_forward: bool = True):
    """``fully_shard`` each decoder layer, then the root; in place (FSDP2 changes the classes, not the object)."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from .launch import world

    if mesh is None:
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world()[1],))
    keywords = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mixed_precision is not None:
        keywords["mp_policy"] = mixed_precision
    if offload:
        keywords["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, **keywords)
    fully_shard(model, **keywords)
    return model


def cast_by_policy(model, backend) -> list[str]:
    """The payload parameters a unit's ``MixedPrecisionPolicy`` will cast in every all-gather (a model sharded
    elsewhere, e.g. by accelerate with ``mixed_precision``): found without communication, before the first step."""
    from torch.distributed.fsdp import FSDPModule

    from .layers import quantized_layers

    payloads = {id(getattr(module, name)): f"{layer}.{name}" for layer, module in quantized_layers(model, backend).items()
                for name in backend.sharded_parameters(module)}
    found = []
    for unit in model.modules():
        if not isinstance(unit, FSDPModule):
            continue
        state = unit._get_fsdp_state()
        # torch 2.13 keeps a list of parameter groups per unit; earlier versions one (private either way)
        groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
        for group in filter(None, groups):
            wanted = group.mp_policy.param_dtype
            for fsdp_param in group.fsdp_params if wanted is not None else ():
                stored = fsdp_param.sharded_param.dtype
                name = payloads.get(id(fsdp_param.sharded_param))
                if name and stored.is_floating_point and stored != wanted:
                    found.append(f"{name}: stored as {stored}, the unit's MixedPrecisionPolicy casts it to {wanted} "
                                 "in every all-gather")
    return found


def gathered_fingerprints(model, backend) -> dict[tuple[str, str], int]:
    """Collective. ``{(layer, parameter): fingerprint}`` of every quantized payload as the forward sees it: each FSDP
    unit is all-gathered in turn (peak: one unit), its layers' payloads fingerprinted, and resharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from .layers import fingerprint, quantized_layers

    layers = quantized_layers(model, backend)
    owner = {id(module): name for name, module in layers.items()}
    found = {}
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in reversed(units):  # innermost first: a decoder layer's payload is its own unit's
        unit.unshard()
        try:
            for module in unit.modules():
                name = owner.get(id(module))
                if name is None:
                    continue
                for param_name in backend.sharded_parameters(module):
                    tensor = getattr(module, param_name)
                    if (name, param_name) not in found and not isinstance(tensor, DTensor):
                        found[(name, param_name)] = fingerprint(tensor)
        finally:
            unit.reshard()
    return found
