"""The switches of :func:`qadapt.prepare`: the modes, each part's choices, and their validation (before any change)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import InvalidOptionError

#: the optional kernel libraries (Liger, cut-cross-entropy: Triton, CUDA only) come with this extra
KERNELS_EXTRA = "pip install 'qadapt-lm[kernels]'"


def unusable(what: str, exc: Exception) -> str:
    """Why ``what`` (a kernel library) does not run here, with the install command when it is not installed."""
    hint = f"; {KERNELS_EXTRA}" if isinstance(exc, ModuleNotFoundError) else ""
    return f"{what} not usable ({type(exc).__name__}: {str(exc)[:200]}{hint})"


#: each part's choices; the first word of each is "nothing changed" where the part has such a choice
CHOICES = {
    "checkpoint": ("off", "recompute", "offload"),
    "input_grads": (True, False),
    "upcast": ("auto", "all", "none"),
    "lora": ("peft", "fused"),
    "mlp": ("off", "fused", "recompute"),
    "norm": ("off", "lean", "recompute"),
    "loss": ("off", "auto", "liger", "cce", "torch"),
    "compile": ("off", "auto", "regional", "graphs"),
    "dequant": ("backend", "recompute", "cache"),
}

#: "default" is PEFT's ``prepare_model_for_kbit_training`` for every backend (gradient checkpointing that recomputes
#: each decoder layer, input gradients, half-precision norms and embeddings upcast where the model is float16);
#: "fast" adds qadapt's kernels and drops the recompute; "lean" is "fast" with the layer inputs kept on the host.
#: ``checkpoint_layers`` and ``mlp_layers`` (not a mode's choice: None, every layer) apply checkpointing or
#: ``mlp="recompute"`` to that many layers, spread evenly (the others: no checkpointing, or ``mlp="fused"``).
MODES = {
    "default": dict(checkpoint="recompute", input_grads=True, upcast="auto", lora="peft", mlp="off", norm="off",
                    loss="off", compile="off", dequant="backend"),
    "fast": dict(checkpoint="off", input_grads=False, upcast="auto", lora="fused", mlp="fused", norm="lean",
                 loss="auto", compile="auto", dequant="recompute"),
}
MODES["lean"] = dict(MODES["fast"], checkpoint="offload")
#: booleans accepted for parts with an "off" choice
_ON = {"checkpoint": "recompute", "mlp": "fused", "norm": "lean", "loss": "auto", "compile": "regional"}


@dataclass(frozen=True)
class Settings:
    mode: str
    checkpoint: str
    input_grads: bool
    upcast: str
    lora: str
    mlp: str
    norm: str
    loss: str
    compile: str
    dequant: str
    loss_chunk: int | None = None
    checkpoint_layers: int | None = None
    mlp_layers: int | None = None

    def describe(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def resolve(mode: str, parts: dict, loss_chunk=None, checkpoint_layers=None, mlp_layers=None) -> Settings:
    """The settings for ``mode`` with ``parts`` (None: the mode's choice) overriding it, or InvalidOptionError."""
    if mode not in MODES:
        raise InvalidOptionError(f"prepare(mode={mode!r})", "unknown mode",
                                 f"Choose one of {', '.join(repr(m) for m in [*MODES, 'off'])}")
    chosen = dict(MODES[mode])
    for part, value in parts.items():
        if value is None:
            continue
        if isinstance(value, bool) and part in _ON:
            value = _ON[part] if value else "off"
        if value not in CHOICES[part]:
            raise InvalidOptionError(f"prepare({part}={value!r})", f"{part} must be one of "
                                     f"{', '.join(map(repr, CHOICES[part]))}", _HELP[part])
        chosen[part] = value
    if chosen["mlp"] != "off" and chosen["lora"] != "fused":
        raise InvalidOptionError(f"prepare(mlp={chosen['mlp']!r}, lora='peft')", "the fused MLP runs the fused LoRA "
                                 "layers of its three projections", "Pass lora='fused', or mlp='off'")
    if chosen["lora"] == "fused" and chosen["dequant"] == "backend":
        raise InvalidOptionError("prepare(lora='fused', dequant='backend')", "the fused LoRA layers de-quantize "
                                 "through the backend's training route; dequant='backend' leaves every layer to the "
                                 "backend's own forward", "Pass dequant='recompute' (or 'cache'), or lora='peft'")
    if chosen["compile"] == "graphs" and checkpoint_layers is not None and chosen["checkpoint"] != "off":
        raise InvalidOptionError(f"prepare(compile='graphs', checkpoint={chosen['checkpoint']!r}, "
                                 f"checkpoint_layers={checkpoint_layers})", "under checkpointing, CUDA graphs replay "
                                 "checkpointed layers only (qadapt records each one's forward and its recompute with "
                                 "backward); the layers not checkpointed would need torch.compile's graphs beside them",
                                 "Checkpoint every layer (leave checkpoint_layers out), pass compile='regional', or "
                                 "use mlp='recompute' with mlp_layers: the dial that keeps CUDA graphs")
    if chosen["compile"] in ("regional", "graphs") and chosen["norm"] == "recompute":
        raise InvalidOptionError(f"prepare(compile={chosen['compile']!r}, norm='recompute')",
                                 "the fused layers find a recomputable norm output through its grad_fn, which "
                                 "torch.compile cannot read", "Use norm='lean' (inductor fuses the norm inside the "
                                 "compiled layer), or compile='off'")
    if loss_chunk is not None and (isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 1):
        raise InvalidOptionError(f"prepare(loss_chunk={loss_chunk!r})", "expected a positive number of rows",
                                 "Leave it out: qadapt sizes the chunks from the vocabulary (256 MiB of logits)")
    _check_layer_count("checkpoint_layers", checkpoint_layers, mode, chosen, "checkpoint",
                       chosen["checkpoint"] != "off", "checkpoint='recompute' (or 'offload')")
    _check_layer_count("mlp_layers", mlp_layers, mode, chosen, "mlp", chosen["mlp"] == "recompute",
                       "mlp='recompute'")
    return Settings(mode=mode, loss_chunk=loss_chunk, checkpoint_layers=checkpoint_layers, mlp_layers=mlp_layers,
                    **chosen)


def _check_layer_count(name, count, mode, chosen, part, applies, needs):
    """``count`` (how many layers get ``part``'s choice) is None, or a positive int where the choice is made."""
    if count is None:
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidOptionError(f"prepare({name}={count!r})", "expected a positive number of layers",
                                 f"Leave it out to apply {part}={chosen[part]!r} to every layer")
    if not applies:
        raise InvalidOptionError(f"prepare(mode={mode!r}, {part}={chosen[part]!r}, {name}={count})",
                                 f"{name} says how many layers get {needs}, and {part} is {chosen[part]!r}",
                                 f"Pass {needs} with it")


_HELP = {
    "checkpoint": "'recompute': each decoder layer recomputed in the backward; 'offload': also its input kept in "
                  "host memory; 'off' (or False): no checkpointing",
    "input_grads": "True: the input embeddings' output requires grad (what reentrant checkpointing needs)",
    "upcast": "'auto': float16 models get float32 norms, embeddings and head (PEFT's kbit preparation); 'all': that "
              "for every half-precision model; 'none': dtypes unchanged",
    "lora": "'fused': qadapt's LoRA autograd Function (base + adapter in one, weight de-quantized again in the "
            "backward); 'peft': PEFT's own layers",
    "mlp": "'fused': gate/up/down + SiLU in one Function for SwiGLU MLPs (keeps x, gate and up); 'recompute': that, "
           "keeping only x (gate and up recomputed in the backward: two more matmuls a layer); 'off'",
    "norm": "'lean': RMSNorm that keeps its input in the model dtype (Liger's kernel on CUDA); 'recompute': qadapt's "
            "torch RMSNorm whose output the fused layers after it recompute instead of keeping (no checkpointing "
            "only); 'off'",
    "loss": "'auto': Liger's fused linear cross-entropy on CUDA, else cut-cross-entropy, else qadapt's chunked torch "
            "loss; or name one; 'off'",
    "compile": "'regional': torch.compile each decoder layer; 'graphs': that with CUDA graphs (mode "
               "'reduce-overhead'; under checkpointing, each checkpointed layer's forward and its recompute with "
               "backward recorded by qadapt; CUDA); 'auto': on CUDA 'graphs' ('regional' with checkpoint_layers) "
               "where the backend's route is known to compile, else 'off'; 'off'",
    "dequant": "'recompute': de-quantize again in the backward; 'cache': keep the forward's weight for the backward "
               "(faster, bf16 weight memory); 'backend': each layer's own forward",
}
