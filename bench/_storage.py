"""Counting what quantized weights cost: bits per weight of the quantized layers, and their theoretical values.

``storage_bytes`` (re-exported from ``qadapt.memory``) counts every distinct storage, including what a walk of
parameters misses: bitsandbytes' nested double-quant state and LLM.int8's per-row ``SCB`` (so NF4 + double quant
reads 4.127 bits per weight, not 4.125, and LLM.int8 8 + 32 / in_features, not 8).
"""

from __future__ import annotations

from qadapt.memory import storage_bytes  # noqa: E402,F401  (re-exported for the benchmarks)


def quantized_bits_per_weight(model, is_quantized) -> tuple[float, int, int]:
    """(bits per weight, bytes, weights) over the layers ``is_quantized(module)`` accepts, biases excluded."""
    names = [name for name, module in model.named_modules() if name and is_quantized(module)]
    weights = sum(_out_in(model.get_submodule(name)) for name in names)
    prefixes = tuple(names)

    def inside(name):
        return name.startswith(prefixes) and any(name == p or name.startswith(p + ".") for p in prefixes)

    biases = 0
    for name in names:
        bias = getattr(model.get_submodule(name), "bias", None)
        if bias is not None:
            biases += bias.numel() * bias.element_size()
    stored = storage_bytes(model, include=inside) - biases
    return (8 * stored / weights if weights else float("nan")), stored, weights


def _out_in(module) -> int:
    for a, b in (("out_features", "in_features"), ("outfeatures", "infeatures")):
        if hasattr(module, a) and hasattr(module, b):
            return int(getattr(module, a)) * int(getattr(module, b))
    meta = getattr(module, "meta", None)  # HQQ
    if isinstance(meta, dict) and "shape" in meta:
        shape = meta["shape"]
        return int(shape[0]) * int(shape[1])
    weight = getattr(module, "weight", None)
    if weight is not None:
        return weight.shape[0] * weight.shape[1]
    raise ValueError(f"cannot tell the weight shape of {type(module).__name__}")


def _in_out(module) -> tuple[int, int]:
    for a, b in (("in_features", "out_features"), ("infeatures", "outfeatures")):
        if hasattr(module, a) and hasattr(module, b):
            return int(getattr(module, a)), int(getattr(module, b))
    meta = getattr(module, "meta", None)  # HQQ: shape is (out, in)
    if isinstance(meta, dict) and "shape" in meta:
        return int(meta["shape"][1]), int(meta["shape"][0])
    return int(module.weight.shape[1]), int(module.weight.shape[0])


def theory_bits(kind: str, in_features: int, out_features: int, group_size: int = 64, scale_bits: int = 16,
                bits: int = 4, codebooks: int = 2, code_bits: int = 8, in_group: int = 8) -> float:
    """Bits per weight a format's layout implies for one linear layer (code tables and other O(1) tensors left out)."""
    if kind == "nf4-dq":  # 4-bit codes; 8-bit absmax per block of 64; float32 absmax per 256 absmax
        return 4 + 8 / 64 + 32 / (64 * 256)
    if kind == "nf4":  # 4-bit codes; float32 absmax per block of 64
        return 4 + 32 / 64
    if kind == "int8-row":  # bitsandbytes LLM.int8: int8 codes + one float32 scale per output row
        return 8 + 32 / in_features
    if kind == "torchao-int8":  # int8 codes; a scale (model dtype) and an int8 zero point per output row
        return 8 + (scale_bits + 8) / in_features
    if kind == "hqq":  # 4-bit codes; scale and zero (compute dtype) per group; HQQ leaves them unquantized by default
        return 4 + 2 * scale_bits / group_size
    if kind == "gptq":  # 4-bit codes; fp16 scale and packed 4-bit zero per group; int32 g_idx per input column
        return 4 + (16 + 4) / group_size + 32 / out_features
    if kind == "awq":  # 4-bit codes; fp16 scale and packed 4-bit zero per group
        return 4 + (16 + 4) / group_size
    if kind == "eetq":  # int8 codes; one float16 scale per output row
        return 8 + 16 / in_features
    if kind == "inc-rtn":  # int codes of `bits`; a float16 scale and a packed zero point per group (kept when symmetric)
        return bits + (16 + bits) / group_size
    if kind == "aqlm":  # per group of in_group weights: `codebooks` codes of code_bits each; a scale per output row;
        # the codebooks themselves (codebooks x 2^code_bits x in_group entries) are counted: at small sizes they matter
        table = codebooks * 2**code_bits * in_group * scale_bits
        return codebooks * code_bits / in_group + scale_bits / in_features + table / (in_features * out_features)
    if kind == "none":
        return float(scale_bits)
    raise ValueError(kind)


def theory_bits_for(model, is_quantized, kind: str, **kwargs) -> float:
    """:func:`theory_bits` averaged over ``model``'s quantized layers, weighted by their weight counts."""
    total = weights = 0
    for name, module in model.named_modules():
        if name and is_quantized(module):
            i, o = _in_out(module)
            total += theory_bits(kind, i, o, **kwargs) * i * o
            weights += i * o
    return total / weights if weights else float("nan")
