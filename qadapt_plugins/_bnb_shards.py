"""bitsandbytes 4-bit layers under sharding: their state, empty layers to load into, and streaming quantization.

FSDP2 replaces ``Params4bit`` by a plain sharded parameter and drops the ``quant_state`` it carried; bitsandbytes'
``Linear4bit.forward`` then takes the module's (``fix_4bit_weight_quant_state_from_module``, bitsandbytes 0.50), so
the state a layer runs with is its weight's while the weight is a ``Params4bit`` and its module's after. Both must be
the same object: every path here that builds a ``Params4bit`` sets the module's too.
"""

from __future__ import annotations

from qadapt.backend import PLACEMENTS, MemoryProfile
from qadapt.capabilities import no, yes


def quant_state_of(module):
    """The ``QuantState`` the layer's forward uses now (the weight's, else the module's)."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def state_tensors(module) -> dict:
    import torch

    state = quant_state_of(module)
    if state is None:
        return {}
    found = {"absmax": state.absmax, "code": state.code}
    if state.nested:
        found.update({"nested_absmax": state.state2.absmax, "nested_code": state.state2.code,
                      "offset": torch.as_tensor(state.offset)})
    return {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}


def storage_rows(numel: int, storage) -> int:
    """Rows of the packed ``(rows, 1)`` payload: two 4-bit codes a byte, stored as ``storage`` elements."""
    import torch

    return numel // 2 // torch.empty(0, dtype=storage).element_size()


def empty_layer(linear, options, dtype):
    """A ``Linear4bit`` whose packed weight is on the meta device, its bytes stored as ``dtype``."""
    import bitsandbytes as bnb
    import torch

    compute = dtype if options["compute_dtype"] == "auto" else getattr(torch, options["compute_dtype"])
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute, compress_statistics=options["double_quant"],
                              quant_type=options["quant_type"], quant_storage=dtype, device="meta")
    rows = storage_rows(linear.in_features * linear.out_features, dtype)
    layer.weight = bnb.nn.Params4bit(torch.empty(rows, 1, dtype=dtype, device="meta"), requires_grad=False,
                                     blocksize=options["blocksize"], compress_statistics=options["double_quant"],
                                     quant_type=options["quant_type"], quant_storage=dtype, module=layer,
                                     bnb_quantized=True)
    if layer.bias is not None:
        layer.bias = torch.nn.Parameter(torch.empty(linear.out_features, dtype=dtype, device="meta"), requires_grad=False)
    layer.support_avx512bf16_for_cpu = False  # see bnb._keep_cpu_layout
    # kept on the module: once sharded, the weight is a plain parameter without Params4bit's attributes
    layer.qadapt_quantize = {"blocksize": options["blocksize"], "compress_statistics": options["double_quant"],
                             "quant_type": options["quant_type"], "quant_storage": dtype}
    return layer


def fill_layer(layer, weight) -> dict:
    """Quantize ``weight`` with the call ``Params4bit._quantize`` makes when transformers loads the model, so the
    bytes and state are ``qadapt.load``'s; the state goes on the module (FSDP2 drops the weight's)."""
    import bitsandbytes.functional as F

    payload, state = F.quantize_4bit(weight.contiguous(), **layer.qadapt_quantize)
    layer.quant_state = state
    if hasattr(layer.weight, "quant_state"):  # not sharded (yet): a Params4bit
        layer.weight.quant_state = state
    return {"weight": payload}


SHARDED_4BIT = {
    "fsdp2": yes("the packed bytes are stored in the model's dtype and sharded like weights; the module keeps the "
                 "quant_state whole on every rank, bitsandbytes' forward re-attaches it (2 gloo processes: payload "
                 "bit for bit, losses those of one process)"),
    "zero3": yes("DeepSpeed partitions the Params4bit and keeps its quant_state (DeepSpeed 0.19.8, 2 gloo "
                 "processes: losses those of one process)"),
}
_INT8_NO = ("LLM.int8 keeps its row scales (SCB) and codes (CB) as attributes of Int8Params, which an engine neither "
            "shards nor re-attaches (bitsandbytes issue 1709 for FSDP)")
SHARDED_8BIT = {engine: no(_INT8_NO, "Use bits=4 to train sharded") for engine in ("fsdp2", "zero3")}


class ShardingMembers:
    """The bnb backend's placement, sharding and memory members (``qadapt.QuantBackend`` documents each)."""

    def placement(self, options):
        return {name: yes("transformers' from_pretrained places the layers (bitsandbytes' "
                          "llm_int8_enable_fp32_cpu_offload keeps CPU-mapped layers in full precision there)")
                for name in PLACEMENTS}

    def quant_state_tensors(self, module):
        import bitsandbytes as bnb

        if isinstance(module, bnb.nn.Linear4bit):
            return state_tensors(module)
        scb = getattr(module.weight, "SCB", None)
        return {"SCB": scb} if scb is not None else {}

    def empty_layer(self, linear, options, dtype):
        return empty_layer(linear, options, dtype)

    def fill_layer(self, layer, weight):
        return fill_layer(layer, weight)

    def memory_profile(self, options, dtype_bytes):
        if options["bits"] == 8:  # int8 codes + a float32 scale per row (SCB)
            return MemoryProfile(payload_bits=8, row_bytes=4)
        blocksize = options["blocksize"]
        # absmax: one float32 per block, or with double quantization one uint8 per block plus a float32 per 256 blocks
        state = 8 / blocksize + 32 / (blocksize * 256) if options["double_quant"] else 32 / blocksize
        return MemoryProfile(payload_bits=4, state_bits=state)
