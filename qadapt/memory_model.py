"""Per-rank peak memory of adapter training on a quantized causal LM, predicted from the model's config alone
(``qadapt plan``). Every term is counted, not fitted:

* **weights**: the quantized layers at the backend's bits per weight (:meth:`~qadapt.QuantBackend.memory_profile`),
  embeddings, head and norms in the model's dtype. Under FSDP2 / ZeRO-3 the payload and the plain parameters are split
  across ranks; the quantization state hung on modules (bitsandbytes' ``quant_state``, HQQ's ``meta``) is whole on
  every rank.
* **unsharded units** (FSDP2): the all-gathered copies alive at once: two decoder layers (the current one and the
  prefetched next) and the root unit (embeddings, final norm, head), which FSDP2 keeps gathered between forward and
  backward. ZeRO-3: two decoder layers.
* **adapter**: LoRA's parameters in float32 (PEFT's ``autocast_adapter_dtype``), their gradients and AdamW's two
  states: 16 bytes per parameter, split across ranks when sharded.
* **activations**, per decoder layer and token, counted on CPU with ``torch.autograd.graph.saved_tensors_hooks``
  (distinct storages, parameters excluded; LoRA r on the 7 linear layers of a Llama block): in bfloat16/float16
  ``36h + 10i + 28r + 4 kv + 4 heads + 8`` bytes (PEFT casts each LoRA layer's input to float32 and keeps it), in
  float32 ``24h + 16i + 28r + 8 kv + 4 heads + 8``; plus what the backend's layers keep (HQQ's default backend: its
  inputs; torchao int8: each layer's de-quantized weight). Gradient checkpointing keeps one hidden state per layer and
  token, and recomputes one layer at a time.
* **logits**: ``(dtype + 4 + 4)`` bytes per token and vocabulary entry (the logits, cross-entropy's float32
  log-softmax, its gradient).
* **``prepare="fast"``** (:func:`qadapt.prepare`): the fused layers keep ``dtype x (6h + 2i + 4r + 2kv) + 4 heads + 8``
  bytes per layer and token whatever the backend (counted the same way, on full precision, bnb nf4 and HQQ: the fused
  LoRA layers de-quantize again in the backward and keep no weight), ``2i`` fewer per MLP with ``mlp="recompute"``;
  the loss keeps no logits, only one chunk's transients (12 bytes per vocabulary entry, 256 MiB a chunk).
  **``"lean"``**: that, each layer recomputed from its input kept in host memory (one hidden state per layer and
  token on the host).

Peak = the end of the forward (everything above), or a checkpointed layer's recompute, whichever is larger. CPU
offload (FSDP2's ``CPUOffloadPolicy``) moves the sharded weights, the adapter and its optimizer to host memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from .errors import IncompatibleError, InvalidOptionError

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: sharded engines (qadapt.distributed) and one process
ENGINES = ("none", "fsdp2", "zero3")


@dataclass(frozen=True)
class Shape:
    """What the model model needs of a config: a Llama-like decoder (attention with grouped KV heads, a gated MLP)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    tied: bool = False
    dtype_bytes: int = 2

    @classmethod
    def from_config(cls, config) -> "Shape":
        get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
        needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [key for key in needed if not isinstance(get(key), int)]
        if missing:
            raise InvalidOptionError("plan memory for this config", f"it has no {', '.join(missing)} (the memory "
                                     "model covers Llama-like decoders)", "Pass the config.json of a decoder model")
        heads = get("num_attention_heads")
        dtype = get("dtype") or get("torch_dtype") or "float32"
        return cls(hidden=get("hidden_size"), intermediate=get("intermediate_size"), layers=get("num_hidden_layers"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads, vocab=get("vocab_size"),
                   head_dim=get("head_dim") or get("hidden_size") // heads,
                   tied=bool(get("tie_word_embeddings", False)), dtype_bytes=DTYPE_BYTES.get(str(dtype), 4))

    @classmethod
    def from_folder(cls, path) -> "Shape":
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
                return cls.from_config(json.load(handle))
        except (OSError, ValueError) as exc:
            raise InvalidOptionError(f"plan memory for {path!r}", f"no readable config.json ({exc})",
                                     "Pass a transformers model folder") from exc

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linear layers of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


@dataclass
class MemoryPlan:
    """Predicted bytes per rank (``qadapt plan`` prints it). ``peak`` is on the device, ``host`` what offload keeps
    in host memory."""

    weights_sharded: float
    weights_replicated: float
    unsharded_units: float
    adapter_and_optimizer: float
    activations: float
    recompute: float
    logits: float
    peak: float
    host: float
    lora_parameters: int
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def gib(self) -> dict:
        """The byte figures in GiB (rounded to MiB)."""
        return {k: round(v / GiB, 3) for k, v in asdict(self).items() if k not in ("lora_parameters", "settings")}


def predict(config, backend=None, options: dict | None = None, *, method: str = "lora", batch: int = 4,
            seq: int = 512, world_size: int = 1, engine: str = "none", checkpointing: bool = False,
            offload: bool = False, lora_r: int = 16, dtype_bytes: int | None = None, prepare: str | None = None,
            mlp_recompute_layers: int = 0) -> MemoryPlan:
    """Predict the per-rank peak memory of training a LoRA adapter on ``config`` (a config dict or object, a
    :class:`Shape`, or a model folder) quantized by ``backend`` (a name, an instance, or None for full precision).

    :param batch: the micro-batch of one rank; ``seq``: tokens per sequence.
    :param engine: ``"none"`` (one process), ``"fsdp2"`` or ``"zero3"``; ``world_size``: ranks sharing the model.
    :param prepare: ``"fast"`` or ``"lean"``: :func:`qadapt.prepare`'s mode (None: PEFT's layers, as attached);
        ``mlp_recompute_layers``: with it, how many MLPs recompute gate and up (``mlp="recompute"``, ``mlp_layers``).
    """
    shape = _shape(config)
    p = dtype_bytes or shape.dtype_bytes
    if engine not in ENGINES:
        raise InvalidOptionError(f"plan with engine={engine!r}", "unknown engine", f"Choose one of {', '.join(ENGINES)}")
    if method != "lora":
        raise IncompatibleError(f"plan memory for a {method!r} adapter", "the memory model is counted for LoRA "
                                "(the activations each method keeps differ)", "Plan with method='lora'")
    if engine == "none" and (world_size != 1 or offload):
        raise InvalidOptionError("plan without an engine", "several ranks and offload need a sharding engine",
                                 "Pass engine='fsdp2' (or 'zero3')")
    if prepare not in (None, "fast", "lean"):
        raise InvalidOptionError(f"plan with prepare={prepare!r}", "the memory model counts prepare's 'fast' and "
                                 "'lean' modes", "Pass prepare='fast' or 'lean', or leave it out (PEFT's layers)")
    if prepare and checkpointing:
        raise InvalidOptionError(f"plan with prepare={prepare!r} and checkpointing", "the mode says whether layers "
                                 "are checkpointed ('lean': offloaded; 'fast': not)", "Leave checkpointing out")
    if mlp_recompute_layers and not prepare:
        raise InvalidOptionError("plan with mlp_recompute_layers", "it counts prepare's mlp='recompute'",
                                 "Pass prepare='fast' (or 'lean') with it")
    profile, name = _profile(backend, options, p)
    world = world_size if engine != "none" else 1
    tokens = batch * seq
    weights_per_layer = sum(a * b for a, b in shape.linears())
    rows_per_layer = sum(b for _, b in shape.linears())

    payload = weights_per_layer * profile.payload_bits / 8
    state = weights_per_layer * profile.state_bits / 8 + rows_per_layer * profile.row_bytes
    norms = 2 * shape.hidden * p
    embed = shape.vocab * shape.hidden * p
    head = 0 if shape.tied else embed
    sharded = (shape.layers * (payload + norms) + embed + head + shape.hidden * p) / world
    replicated = shape.layers * state

    unsharded = 0.0
    if engine == "fsdp2":
        unsharded = 2 * (payload + norms) + embed + head + shape.hidden * p
    elif engine == "zero3":
        unsharded = 2 * (payload + norms)

    lora = shape.layers * sum(lora_r * (a + b) for a, b in shape.linears())
    adapter = lora * 16 / world

    hidden_per_layer = tokens * shape.hidden * p
    host = 0.0
    if prepare:
        layer_activations = _fused_activations(shape, tokens, lora_r, p)
        recomputing = min(mlp_recompute_layers, shape.layers)
        if prepare == "lean":
            saved, recompute, host = 0.0, layer_activations, shape.layers * hidden_per_layer
        else:
            saved, recompute = shape.layers * layer_activations - recomputing * tokens * 2 * shape.intermediate * p, 0.0
        from .training.loss import auto_chunk  # (imports torch: only when a prepare mode is planned)

        logits = 12 * shape.vocab * min(tokens, auto_chunk(shape.vocab))  # one chunk of the loss
    else:
        layer_activations = _activations(shape, tokens, lora_r, p, profile)
        if checkpointing:
            saved, recompute = shape.layers * hidden_per_layer, layer_activations
        else:
            saved, recompute = shape.layers * layer_activations, 0.0
        logits = (p + 4 + 4) * tokens * shape.vocab

    device_static = sharded + replicated + adapter
    if offload:
        host, device_static = host + sharded + adapter, replicated
    at_forward_end = device_static + unsharded + saved + logits
    at_recompute = device_static + unsharded + saved + recompute + 2 * tokens * shape.hidden * 4
    settings = {"backend": name, "options": dict(options or {}), "method": method, "batch": batch, "seq": seq,
                "world_size": world, "engine": engine, "checkpointing": checkpointing, "offload": offload,
                "lora_r": lora_r, "dtype_bytes": p, "prepare": prepare, "mlp_recompute_layers": mlp_recompute_layers}
    return MemoryPlan(weights_sharded=0.0 if offload else sharded, weights_replicated=replicated,
                      unsharded_units=unsharded, adapter_and_optimizer=0.0 if offload else adapter,
                      activations=saved, recompute=recompute, logits=logits, peak=max(at_forward_end, at_recompute),
                      host=host, lora_parameters=lora, settings=settings)


def _shape(config) -> Shape:
    if isinstance(config, Shape):
        return config
    if isinstance(config, (str, os.PathLike)):
        return Shape.from_folder(os.fspath(config))
    return Shape.from_config(config)


def _profile(backend, options, dtype_bytes):
    from .backend import MemoryProfile

    if backend is None:
        return MemoryProfile(payload_bits=8 * dtype_bytes), "none"
    if isinstance(backend, str):
        from .plugins import get_backend

        backend = get_backend(backend)
    resolved = backend.validate_options(dict(options or {}))
    profile = backend.memory_profile(resolved, dtype_bytes)
    if profile is None:
        raise IncompatibleError(f"plan memory for backend '{backend.name}'", "the backend declares no memory profile",
                                "Plan with another backend, or measure")
    return profile, backend.name


def _fused_activations(shape: Shape, tokens: int, r: int, p: int) -> float:
    """Bytes one decoder layer keeps for the backward under ``qadapt.prepare("fast")`` (counted as
    :func:`_activations`' terms: fused LoRA layers keep their input and the r-wide ``x A^T``, the fused MLP its
    input, gate and up, the lean norms their input and one float32 per row, attention what SDPA keeps)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    return (p * (6 * h + 2 * i + 4 * r + 2 * kv) + 4 * shape.heads + 8) * tokens


def _activations(shape: Shape, tokens: int, r: int, p: int, profile) -> float:
    """Bytes one decoder layer keeps for the backward (see the module's docstring for how they were counted)."""
    h, i = shape.hidden, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    if p == 2:
        per_token = 36 * h + 10 * i + 28 * r + 4 * kv + 4 * shape.heads + 8
    else:
        per_token = 24 * h + 16 * i + 28 * r + 8 * kv + 4 * shape.heads + 8
    hidden_copies, intermediate_copies = profile.saved_inputs
    per_token += (hidden_copies * h + intermediate_copies * i) * p
    total = per_token * tokens
    if profile.saves_dequantized_weight:
        total += sum(a * b for a, b in shape.linears()) * p
    return total
