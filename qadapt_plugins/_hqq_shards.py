"""HQQ layers under sharding: their state, empty layers to load into, and streaming quantization.

``HQQLinear.W_q`` is an ``nn.Parameter`` (uint8): FSDP2 shards it on dim 0 like any weight, and HQQ's forward reads
the gathered one. ``meta`` (scale, zero, shape) is a plain dict: no engine sees it, so every rank keeps it whole
(0.5 bits/weight at group 64 in bfloat16). hqq 0.2.8's ``view_as_float`` (Answer.AI's FSDP1 recipe) is not needed for
FSDP2, which shards parameters of any dtype.
"""

from __future__ import annotations

from qadapt.backend import MemoryProfile
from qadapt.capabilities import yes

#: rows of codes packed in one row of ``W_q``, per bit width (hqq.core.bitpack: 8/4/2/1 bits in uint8, 3 bits: ten
#: codes in an int32)
CODES_PER_ROW = {8: 1, 4: 2, 2: 4, 1: 8, 3: 10}

SHARDED = {
    "fsdp2": yes("W_q is a parameter FSDP2 shards; meta (scales, zeros) stays whole on every rank (2 gloo processes: "
                 "payload bit for bit, losses those of one process)"),
    "zero3": yes("DeepSpeed partitions W_q and gathers it for HQQ's forward; meta stays whole on every rank "
                 "(DeepSpeed 0.19.8, 2 gloo processes: losses those of one process)"),
}


def empty_layer(linear, quant_config, compute_dtype, nbits, group_size):
    import copy

    import torch
    from hqq.core.quantize import HQQLinear

    layer = HQQLinear(None, quant_config=copy.deepcopy(quant_config), compute_dtype=compute_dtype, device="meta",
                      initialize=False)
    layer.qadapt_quant_config = quant_config  # HQQLinear consumes the dict it is given: fill_layer needs a fresh one
    layer.in_features, layer.out_features = linear.in_features, linear.out_features
    groups = linear.in_features * linear.out_features // group_size
    rows = -(-groups // CODES_PER_ROW[nbits])
    layer.W_q = torch.nn.Parameter(torch.empty(rows, group_size, dtype=torch.int32 if nbits == 3 else torch.uint8,
                                               device="meta"), requires_grad=False)
    if linear.bias is not None:  # a plain attribute in HQQLinear, filled from the checkpoint like its weight
        layer.bias = torch.empty(linear.out_features, dtype=compute_dtype, device="meta")
    return layer


def fill_layer(layer, weight) -> dict:
    """Quantize ``weight`` as ``qadapt.load`` does (an ``HQQLinear`` of a one-layer ``nn.Linear``); its ``meta`` goes
    on ``layer``, the codes are returned."""
    import copy

    import torch
    from hqq.core.quantize import HQQLinear

    quant_config = copy.deepcopy(layer.qadapt_quant_config)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    quantized = HQQLinear(linear, quant_config=quant_config, compute_dtype=layer.compute_dtype,
                          device=str(weight.device), del_orig=True)
    codes = quantized.W_q.data
    if tuple(codes.shape) != tuple(layer.W_q.shape) or codes.dtype != layer.W_q.dtype:
        raise ValueError(f"HQQ packed this weight as {codes.dtype} {list(codes.shape)}, not as the empty layer's "
                         f"{layer.W_q.dtype} {list(layer.W_q.shape)}")
    layer.meta = quantized.meta
    layer.device = quantized.device
    layer.ready = True
    return {"W_q": codes}


def state_tensors(module) -> dict:
    import torch

    meta = getattr(module, "meta", None) or {}
    return {key: value for key, value in meta.items() if isinstance(value, torch.Tensor)}


class ShardingMembers:
    """The HQQ backend's sharding and memory members (``qadapt.QuantBackend`` documents each)."""

    def sharded_parameters(self, module):
        return ("W_q",)

    def quant_state_tensors(self, module):
        return state_tensors(module)

    def empty_layer(self, linear, options, dtype):
        import torch

        compute = dtype if options["compute_dtype"] == "auto" else getattr(torch, options["compute_dtype"])
        return empty_layer(linear, self._quant_config(options), compute, options["bits"], options["group_size"])

    def fill_layer(self, layer, weight):
        return fill_layer(layer, weight)

    def memory_profile(self, options, dtype_bytes):
        bits = options["bits"] if options["bits"] != 3 else 3.2  # ten 3-bit codes in 32 bits
        compute_bytes = dtype_bytes if options["compute_dtype"] == "auto" else {"float32": 4}.get(options["compute_dtype"], 2)
        # a scale and a zero per group in the compute dtype; HQQ's default training backend keeps the inputs of its
        # matmul for the backward: measured on CPU (saved-tensor hooks) as 2 hidden + 1 intermediate vector a token
        return MemoryProfile(payload_bits=bits, state_bits=2 * 8 * compute_bytes / options["group_size"],
                             saved_inputs=(2.0, 1.0))
