"""What a quantized layer is made of, read through its backend, and the checks that it survived sharding.

A backend says which parameters hold a layer's payload (:meth:`~qadapt.QuantBackend.sharded_parameters`: what the
engine shards) and which tensors hold its quantization state (:meth:`~qadapt.QuantBackend.quant_state_tensors`: kept
whole on every rank). Before sharding qadapt records both (shape, dtype, bytes, a fingerprint of the bytes); after, it
checks every layer is still one of the backend's quantized layers, its payload is sharded (this rank holds its share,
same global shape, dtype and bytes: nothing was de-quantized or replicated), its state is there and unchanged, and,
gathering one unit at a time, that the payload the forward will see is bit for bit the one before sharding.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorFacts:
    shape: tuple
    dtype: str
    nbytes: int
    fingerprint: int | None  # None: not taken (meta tensors, or the payload check is off)


@dataclass
class LayerFacts:
    payload: dict[str, TensorFacts]
    state: dict[str, TensorFacts]


@dataclass
class ShardReport:
    """What :func:`qadapt.distributed.verify` found, for this rank."""

    engine: str
    world_size: int
    layers: int = 0
    #: bytes of quantized payload this rank holds (its shards) and of quantization state (whole on every rank)
    payload_bytes: int = 0
    state_bytes: int = 0
    #: the whole model's payload bytes (every rank's shares together)
    global_payload_bytes: int = 0
    payload_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bytes_per_rank(self) -> int:
        return self.payload_bytes + self.state_bytes

    def to_dict(self) -> dict:
        return {"engine": self.engine, "world_size": self.world_size, "layers": self.layers,
                "payload_bytes": self.payload_bytes, "state_bytes": self.state_bytes,
                "global_payload_bytes": self.global_payload_bytes, "payload_checked": self.payload_checked,
                "problems": list(self.problems)}


def quantized_layers(model, backend) -> dict:
    """``{name: module}`` of ``backend``'s quantized layers in ``model`` (PEFT's wrappers looked through)."""
    from ..record import base_model

    return {name: module for name, module in base_model(model).named_modules() if backend.is_quantized_layer(module)}


def local(tensor):
    """This rank's part of ``tensor``: a DTensor's local shard, a ZeRO-3 parameter's partition, else itself."""
    from torch.distributed.tensor import DTensor

    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def global_shape(tensor) -> tuple:
    if hasattr(tensor, "ds_shape"):
        return tuple(tensor.ds_shape)
    return tuple(tensor.shape)


def _is_subclass(tensor) -> bool:
    """A tensor subclass made of inner tensors (torchao's NF4Tensor, Int8Tensor)."""
    import torch

    return type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__")


def tensor_bytes(tensor) -> int:
    """Bytes of ``tensor``'s storage as it is (a tensor subclass: its inner tensors); 0 on the meta device."""
    if _is_subclass(tensor):
        return sum(tensor_bytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return 0 if tensor.device.type == "meta" else tensor.numel() * tensor.element_size()


def fingerprint(tensor) -> int | None:
    """A position-weighted checksum of ``tensor``'s bytes, computed where it lies (a GPU sums 35 GB in well under a
    second; hashing on the host would copy it). Any changed element changes it, barring a 1-in-2^63 collision."""
    import torch

    if _is_subclass(tensor):
        inner = [fingerprint(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0]]
        return None if None in inner else hash(tuple(inner)) & (2**63 - 1)
    if tensor.device.type == "meta":
        return None
    # a contiguous copy: ``contiguous()`` keeps a one-element view's stride, which ``view(torch.uint8)`` refuses
    data = tensor.detach().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)
    if data.numel() % 4:
        data = torch.cat([data, data.new_zeros(4 - data.numel() % 4)])
    words = data.view(torch.int32).long()
    weights = torch.arange(words.numel(), device=words.device, dtype=torch.long) % 65521 + 1
    return int((words * weights).sum().item()) ^ words.numel()


def facts(tensor, with_fingerprint: bool = True) -> TensorFacts:
    return TensorFacts(global_shape(tensor), str(tensor.dtype), _global_bytes(tensor),
                       fingerprint(tensor) if with_fingerprint else None)


def _global_bytes(tensor) -> int:
    """Bytes of the whole tensor, every rank's share together. A tensor subclass (torchao's NF4Tensor) reports its
    unquantized dtype: its own inner tensors count, scaled from this rank's share (engines split it evenly)."""
    import math

    share = local(tensor)
    if _is_subclass(share):
        return tensor_bytes(share) * math.prod(global_shape(tensor)) // max(1, math.prod(share.shape))
    return math.prod(global_shape(tensor)) * tensor.element_size()



def snapshot(model, backend, with_fingerprint: bool = True) -> dict[str, LayerFacts]:
    """Every quantized layer's payload and state, before sharding."""
    found = {}
    for name, module in quantized_layers(model, backend).items():
        payload = {p: facts(getattr(module, p), with_fingerprint) for p in backend.sharded_parameters(module)}
        state = {k: facts(v, with_fingerprint) for k, v in backend.quant_state_tensors(module).items()}
        found[name] = LayerFacts(payload, state)
    return found


def check_layers(model, backend, engine: str, before: dict[str, LayerFacts] | None) -> ShardReport:
    """The structural checks after sharding (no communication): see the module's docstring."""
    from .launch import world

    _, world_size = world()
    report = ShardReport(engine=engine, world_size=world_size)
    now = quantized_layers(model, backend)
    for name in sorted(set(before or ()) - set(now)):
        report.problems.append(f"{name}: was a quantized layer before sharding, is not one now")
    for name, module in now.items():
        report.layers += 1
        was = (before or {}).get(name)
        for param_name in backend.sharded_parameters(module):
            tensor = getattr(module, param_name, None)
            if tensor is None:
                report.problems.append(f"{name}.{param_name}: the payload is gone")
                continue
            _check_payload_tensor(report, f"{name}.{param_name}", tensor, engine, world_size,
                                  was.payload.get(param_name) if was else None)
        state = backend.quant_state_tensors(module)
        if was is not None and set(was.state) - set(state):
            report.problems.append(f"{name}: lost its quantization state ({', '.join(sorted(set(was.state) - set(state)))})")
        for key, tensor in state.items():
            report.state_bytes += tensor_bytes(tensor)
            old = was.state.get(key) if was else None
            if old is not None and old.fingerprint is not None and fingerprint(tensor) != old.fingerprint:
                report.problems.append(f"{name}: its quantization state {key} differs from the one its weight had "
                                       "before sharding (the forward would read other scales than the codes were "
                                       "made with)")
    return report


def _check_payload_tensor(report, where, tensor, engine, world_size, was) -> None:
    import math

    shape = global_shape(tensor)
    share = local(tensor)
    is_sharded = _is_sharded(tensor, engine)
    if not is_sharded:
        report.problems.append(f"{where}: not sharded by {engine} ({type(tensor).__name__}): every rank holds it whole")
    elif share.dim() and shape and share.shape[0] > -(-shape[0] // world_size) and engine == "fsdp2":
        report.problems.append(f"{where}: this rank holds {share.shape[0]} of {shape[0]} rows, more than its share")
    elif engine == "zero3" and share.numel() > -(-math.prod(shape) // world_size):
        report.problems.append(f"{where}: this rank holds {share.numel()} of {math.prod(shape)} elements")
    if was is not None:
        if shape != was.shape or str(tensor.dtype) != was.dtype:
            report.problems.append(f"{where}: was {was.dtype} {list(was.shape)}, is {tensor.dtype} {list(shape)} "
                                   "(converted by the engine: no longer the packed quantized bytes)")
    report.payload_bytes += tensor_bytes(share)
    report.global_payload_bytes += _global_bytes(tensor)


def _is_sharded(tensor, engine: str) -> bool:
    from torch.distributed.tensor import DTensor

    return hasattr(tensor, "ds_tensor") if engine == "zero3" else isinstance(tensor, DTensor)


def floating_payloads(model, backend) -> dict[str, str]:
    """``{parameter: dtype}`` of the payload parameters stored in a floating dtype (a mixed-precision policy would
    cast them like weights). A tensor subclass with FSDP2's all-gather extension (``fsdp_pre_all_gather``: torchao's
    NF4Tensor) is gathered by its own code, which FSDP2 does not cast."""
    found = {}
    for name, module in quantized_layers(model, backend).items():
        for param_name in backend.sharded_parameters(module):
            tensor = getattr(module, param_name)
            if hasattr(local(tensor), "fsdp_pre_all_gather"):
                continue
            if tensor.dtype.is_floating_point:
                found[f"{name}.{param_name}"] = tensor.dtype
    return found
