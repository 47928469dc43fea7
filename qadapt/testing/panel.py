"""The architecture panel: tiny random causal LMs of the popular architectures, built from their transformers configs.

    from qadapt.testing import panel
    model = panel.build("gpt2")                          # a tiny random GPT2LMHeadModel, eval mode, float32
    check_backend("hqq", architecture="mixtral")         # the conformance kit on one of them

Every model has 2 layers, hidden size 128 and a 512-token vocabulary, and is chosen so that each CPU backend's
constraints hold wherever the architecture allows: every linear dimension is a multiple of 64 (EETQ's int8 tile; HQQ,
INC and bnb groups of 64; AQLM's groups of 8). Hidden 128 rather than 64: Falcon's multi-query ``query_key_value`` is
hidden + 2 x head_dim, 96 at hidden 64. MoE models get 4 experts, top-2. What each one exercises is in
:data:`ARCHITECTURES`; building one takes about 0.03 s (the first build in a process, ~3 s of imports).
"""

from __future__ import annotations

COMMON = dict(vocab_size=512, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
MOE = dict(num_experts_per_tok=2)

#: name -> (transformers config class, config keywords, what the architecture exercises)
ARCHITECTURES = {
    "llama": ("LlamaConfig", dict(LLAMA_LIKE), "the reference: no biases, untied head"),
    "qwen2": ("Qwen2Config", dict(LLAMA_LIKE, tie_word_embeddings=True), "q/k/v biases, tied embeddings"),
    "gemma": ("GemmaConfig", dict(LLAMA_LIKE, head_dim=32, pad_token_id=0),
              "scaled embeddings (x sqrt(hidden)), tied head, GeGLU"),
    "gpt2": ("GPT2Config", dict(n_embd=128, n_layer=2, n_head=4, n_positions=256),
             "transformers' Conv1D (weight stored in x out), fused c_attn, biases, tied"),
    "phi3": ("Phi3Config", dict(LLAMA_LIKE, num_key_value_heads=4, pad_token_id=0,
                                original_max_position_embeddings=256), "fused qkv_proj and gate_up_proj"),
    "falcon": ("FalconConfig", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4),
               "FalconLinear (an nn.Linear subclass computing input @ weight.T), multi-query fused qkv, tied"),
    "bloom": ("BloomConfig", dict(hidden_size=128, n_layer=2, n_head=4),
              "fused query_key_value with biases, ALiBi, embedding LayerNorm, tied"),
    "opt": ("OPTConfig", dict(hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                              word_embed_proj_dim=128, max_position_embeddings=256, pad_token_id=0),
            "fc1/fc2 with biases, learned positions, tied"),
    "mixtral": ("MixtralConfig", dict(LLAMA_LIKE, num_local_experts=4, **MOE),
                "MoE: fused 3-D experts (gate_up_proj, down_proj), TopKRouter"),
    "qwen3-moe": ("Qwen3MoeConfig", dict(LLAMA_LIKE, head_dim=32, moe_intermediate_size=128, num_experts=4, **MOE),
                  "MoE: fused 3-D experts, TopKRouter, q/k norms"),
    "qwen2-moe": ("Qwen2MoeConfig", dict(LLAMA_LIKE, moe_intermediate_size=128, shared_expert_intermediate_size=256,
                                          num_experts=4, **MOE),
                  "MoE: fused experts plus a shared expert and its nn.Linear gate (128 -> 1)"),
}
NAMES = tuple(ARCHITECTURES)
MOE_NAMES = ("mixtral", "qwen3-moe", "qwen2-moe")


def config(name: str, **overrides):
    """The transformers config of panel architecture ``name`` (``overrides`` replace its keywords)."""
    import transformers

    if name not in ARCHITECTURES:
        from ..errors import InvalidOptionError

        raise InvalidOptionError(f"architecture {name!r}", "not in the panel", f"Choose one of {', '.join(NAMES)}")
    class_name, keywords, _ = ARCHITECTURES[name]
    return getattr(transformers, class_name)(**{**COMMON, **keywords, **overrides})


def build(name: str, seed: int = 0, dtype=None, **overrides):
    """A randomly initialised, eval-mode ``AutoModelForCausalLM`` of panel architecture ``name``."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..hf import quiet_transformers

    quiet_transformers()
    built = config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(built)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def factory(name: str, **overrides):
    """A zero-argument model factory for ``check_backend(model_factory=...)``."""
    config(name)  # refuse an unknown name now, not at the first build
    return lambda: build(name, **overrides)
