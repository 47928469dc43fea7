"""Small helpers shared by backends built on transformers' own quantization integrations."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def as_pretrained_dir(model):
    """Yield a folder holding ``model``: the path itself if it is one, else a temporary safetensors copy."""
    if isinstance(model, str):
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="qadapt-") as tmp:
        model.save_pretrained(tmp)
        yield tmp


def model_dtype(model):
    """The dtype of an in-memory model; for a folder, the dtype its config.json records (what transformers'
    ``dtype="auto"`` loads it in), float32 where it records none."""
    import torch

    if isinstance(model, (str, os.PathLike)):
        try:
            with open(os.path.join(model, "config.json"), encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return torch.float32
        name = config.get("dtype") or config.get("torch_dtype")
        dtype = getattr(torch, name, None) if isinstance(name, str) else None
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    return getattr(model, "dtype", torch.float32)


def clone_module(module):
    """A shallow copy of ``module`` with its own parameter, buffer and child dicts, so replacing one of its
    tensors leaves ``module`` as it was."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


def quiet_transformers() -> None:
    """Silence progress bars and info logs from transformers for the duration of the process."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def save_full_precision(model, path) -> None:
    """Save a model whose layers are all plain (no quantization config) as a standard transformers folder."""
    import os

    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(path)
    save_model(model, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def load_full_precision(path, gpu=True, **from_pretrained):
    """A full-precision folder as a transformers model, on the GPU where there is one; ``gpu=False`` leaves it where
    ``from_pretrained`` puts it (the CPU), for quantizers that read it there. Other keywords go to ``from_pretrained``."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if gpu:
        from_pretrained.setdefault("device_map", "cuda:0" if torch.cuda.is_available() else "cpu")
    return AutoModelForCausalLM.from_pretrained(path, **from_pretrained)
