"""What a saved base needs to be used elsewhere: its tokenizer and its generation settings.

Without a tokenizer, ``pipeline("text-generation", model=out/base)`` fails (Llama: "Couldn't instantiate the
backend tokenizer") or runs with an empty one, and ``GPTQModel.load`` refuses the folder; hqq, inc and eetq bases had
no ``generation_config.json`` (their backends write the model config only).
"""

from __future__ import annotations

import os
import shutil

#: the files ``PreTrainedTokenizer(Fast).save_pretrained`` writes, whichever the tokenizer uses
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
)


def write_tokenizer(base_dir: str, tokenizer, sources) -> str | None:
    """Write ``tokenizer`` into ``base_dir``, or else copy the tokenizer files of the first folder of ``sources``
    that has them. Returns what was done, for ``qadapt.json``: ``"passed"``, ``"copied from <folder>"``, or None."""
    if tokenizer is not None:
        tokenizer.save_pretrained(base_dir)
        return "passed"
    for folder in sources:
        found = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))]
        if "tokenizer_config.json" in found or "tokenizer.json" in found:
            for name in found:
                if not os.path.exists(os.path.join(base_dir, name)):
                    shutil.copy2(os.path.join(folder, name), os.path.join(base_dir, name))
            return f"copied from {folder}"
    return None


def write_generation_config(model, base_dir: str) -> None:
    """``generation_config.json`` from the model's generation config, where the backend's save wrote none."""
    if os.path.exists(os.path.join(base_dir, "generation_config.json")):
        return
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return
    try:
        generation.save_pretrained(base_dir)
    except ValueError as exc:  # transformers refuses to save an invalid generation config; the model is saved anyway
        import warnings

        warnings.warn(f"generation_config.json not written: transformers refused the model's generation config ({exc})",
                      stacklevel=4)
