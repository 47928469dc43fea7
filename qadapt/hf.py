"""Helpers for backend authors: moving models between memory and folders, and small module surgery.

Everything a plugin needs beyond :mod:`qadapt.backend` lives here, public and documented (``docs/plugins.md``), so
that a third-party backend uses exactly what the built-in ones use. Nothing here imports torch or transformers at
module import time.
"""

from __future__ import annotations

import contextvars
import copy
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


def is_installed(distribution: str) -> bool:
    """Is the pip distribution installed (whether or not it imports)? Imports nothing."""
    import importlib.metadata

    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def is_importable(module: str) -> bool:
    """Can ``module`` be found on the path? Imports nothing (not even a parent package where it can help it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def default_device() -> str:
    """Where a backend puts a model it quantized or loaded: this process's CUDA GPU where there is one, else the CPU.

    A process started by a distributed launcher (torchrun, accelerate launch, deepspeed: they set ``LOCAL_RANK``) gets
    ``cuda:LOCAL_RANK``, so that the ranks of one host do not all load onto GPU 0; where the launcher shows each
    process a single GPU, that one."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return "cuda:0"
    index, count = int(local_rank), torch.cuda.device_count()
    if index < count:
        return f"cuda:{index}"
    if count == 1:
        return "cuda:0"
    from .errors import QadaptError

    raise QadaptError(f"place the model of local rank {index}", f"this process sees {count} GPUs, none numbered {index}",
                      "Launch as many processes per host as it has GPUs, or show each process its own GPU "
                      "(CUDA_VISIBLE_DEVICES)")


@dataclass(frozen=True)
class Placement:
    """Where ``qadapt.load`` was asked to put a model: transformers' ``device_map`` / ``max_memory``, and whether
    layers it maps to the CPU may stay there (``cpu_offload``). Backends that honour these (their
    :meth:`~qadapt.QuantBackend.placement`) read them here while ``qadapt.load`` runs."""

    device_map: Any = None
    max_memory: Any = None
    cpu_offload: bool = False

    def from_pretrained(self) -> dict:
        """The keywords for transformers' ``from_pretrained``: the user's map, else the whole model on
        :func:`default_device`."""
        keywords = {"device_map": self.device_map if self.device_map is not None else default_device()}
        if self.max_memory is not None:
            keywords["max_memory"] = self.max_memory
        return keywords


_PLACEMENT: contextvars.ContextVar = contextvars.ContextVar("qadapt_placement", default=Placement())


def placement() -> Placement:
    """The placement of the ``qadapt.load`` call running now (default: everything on :func:`default_device`)."""
    return _PLACEMENT.get()


@contextmanager
def placed(where: Placement):
    """Make :func:`placement` return ``where`` inside the block (``qadapt.load`` wraps the backend's work in it)."""
    token = _PLACEMENT.set(where)
    try:
        yield where
    finally:
        _PLACEMENT.reset(token)


def to_default_device(model):
    """``model`` moved to :func:`default_device` (unchanged on a CPU-only machine)."""
    device = default_device()
    return model.to(device) if device != "cpu" else model


def replace_module(root, name: str, module) -> None:
    """Put ``module`` in place of the submodule ``name`` (a dotted path) of ``root``."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def clone_module(module):
    """A shallow copy of ``module`` with its own parameter, buffer and child dicts, so replacing one of its
    tensors leaves ``module`` as it was."""
    clone = copy.copy(module)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


@contextmanager
def as_pretrained_dir(model):
    """Yield a folder holding ``model``: the path itself if it is one, else a temporary safetensors copy."""
    if isinstance(model, (str, os.PathLike)):
        yield os.fspath(model)
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


def quiet_transformers() -> None:
    """Silence progress bars and info logs from transformers for the duration of the process."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def save_full_precision(model, path) -> None:
    """Save a model whose layers are all plain (no quantization config) as a standard transformers folder."""
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(path)
    save_model(model, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def load_full_precision(path, gpu=True, **from_pretrained):
    """A full-precision folder as a transformers model, on :func:`default_device` ; ``gpu=False`` leaves it where
    ``from_pretrained`` puts it (the CPU), for quantizers that read it there. Other keywords go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if gpu:
        from_pretrained.setdefault("device_map", default_device())
    return AutoModelForCausalLM.from_pretrained(path, **from_pretrained)


def read_safetensors_folder(path: str, default_file: str = "model.safetensors") -> dict:
    """Every tensor of a transformers folder's safetensors weights (sharded ones through their index)."""
    from safetensors.torch import load_file

    index = os.path.join(path, default_file + ".index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        files = [default_file]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def unshared_state_dict(model) -> dict:
    """``model.state_dict()`` on the CPU with every tensor owning its storage: safetensors refuses tensors that share
    memory (tied embeddings), so a second name for the same storage gets its own copy."""
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        state[key] = tensor
    return state
