"""Tiny models and text made on the spot, for the demo, tests and benchmarks. Nothing is downloaded."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=512,
    max_position_embeddings=256,
)


def local_text(max_chars: int = 400_000) -> str:
    """Plain text to train on: the Python standard library's own sources, which every machine has (seven chosen
    modules first, then the other top-level modules in name order, up to ``max_chars``)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    first = ("textwrap.py", "argparse.py", "functools.py", "inspect.py", "pathlib.py", "typing.py", "enum.py")
    for path in [stdlib / name for name in first] + [p for p in sorted(stdlib.glob("*.py")) if p.name not in first]:
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="ignore")
            chunks.append(text)
            size += len(text)
        if size >= max_chars:
            break
    return "\n".join(chunks)[:max_chars]


def build_tokenizer(vocab_size: int = TINY_LLAMA["vocab_size"], text: str | None = None):
    """A byte-level BPE tokenizer trained on local text, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text or local_text()], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def build_model(seed: int = 0, dtype=None, **overrides):
    """A randomly initialised Llama of ``TINY_LLAMA``'s shape (or ``overrides``)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_model(model, path: str | os.PathLike, tokenizer=None) -> str:
    """Save ``model`` (and ``tokenizer``) as a Hugging Face folder with safetensors; return the path."""
    path = str(path)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def token_batches(tokenizer, text: str | None = None, *, batch_size: int = 4, seq_len: int = 64, count: int = 8, seed: int = 0):
    """``count`` batches of ``input_ids`` (``batch_size`` x ``seq_len``) cut from tokenised local text."""
    import torch

    ids = tokenizer(text or local_text(200_000), return_tensors="pt").input_ids[0]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len - 1, (count, batch_size), generator=generator)
    return [torch.stack([ids[s : s + seq_len] for s in row.tolist()]) for row in starts]
