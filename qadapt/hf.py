"""Helpers for backend authors: moving models between memory and folders, and small module surgery.

Everything a plugin needs beyond :mod:`qadapt.backend` lives here, public and documented (``docs/plugins.md``), so
that a third-party backend uses exactly what the built-in ones use. Nothing here imports torch or transformers at
module import time.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from contextlib import contextmanager


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
    """Where a backend puts a model it quantized or loaded: the first CUDA GPU where there is one, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


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


# ------------------------------------------------------------------------------------------ folders on disk
#: key of the ``quantization_config`` a backend writes into a folder plain transformers must not load (see
#: :func:`mark_qadapt_only`)
QADAPT_ONLY = "qadapt_format"


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``; None where the file is missing or is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_quantization_config(path: str) -> dict | None:
    """The ``quantization_config`` of the transformers folder ``path`` (its ``config.json``), or None."""
    found = (read_json(os.path.join(path, "config.json")) or {}).get("quantization_config")
    return found if isinstance(found, dict) and found else None


def mark_qadapt_only(path: str, backend_name: str, layout: str) -> None:
    """Make plain transformers refuse the folder ``path``, whose ``config.json`` a backend wrote beside weights in its
    own layout (``layout``: what the folder holds, in words).

    Without a mark, ``AutoModelForCausalLM.from_pretrained`` loads such a folder with random linear weights and only
    "missing / unexpected keys" warnings (measured on hqq and inc bases, transformers 5.23: logits off by 0.7). It
    raises instead when ``quantization_config`` has no ``quant_method`` ("The model's quantization config from the
    arguments has no `quant_method` attribute"); an unknown ``quant_method`` would only warn. The mark says, in
    config.json and in a README.md beside it, what the folder is and how to load it; :func:`load_config` drops it
    again for the backend's loader.
    """
    config_path = os.path.join(path, "config.json")
    config = read_json(config_path)
    if config is None:
        raise FileNotFoundError(f"{config_path} is missing: write the model's config first")
    config["quantization_config"] = {
        QADAPT_ONLY: backend_name,
        "holds": layout,
        "load_with": "qadapt.load(<the folder qadapt.save wrote, the one holding qadapt.json>), or "
                     "qadapt.load(<this folder>) for the base alone; plain transformers cannot load it",
    }
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    card = os.path.join(path, "README.md")
    if not os.path.exists(card):  # for whoever finds the folder on its own (a file browser, a model hub page)
        with open(card, "w", encoding="utf-8") as handle:
            handle.write(
                f"# A {backend_name} base written by qadapt\n\nThis folder holds {layout}, which only qadapt reads. "
                "Load it with `qadapt.load(<this folder>)` (or load the whole checkpoint, the folder holding "
                "`qadapt.json`, with `qadapt.load(<that folder>)`).\n\nPlain transformers refuses it on purpose "
                "(\"The model's quantization config ... has no `quant_method` attribute\"): it would otherwise load "
                "random weights in place of these layers.\n"
            )


def qadapt_only_backend(path: str) -> str | None:
    """The backend named by :func:`mark_qadapt_only` in the folder ``path``; None for an unmarked folder."""
    found = folder_quantization_config(path) or {}
    name = found.get(QADAPT_ONLY)
    return name if isinstance(name, str) else None


def layout_options(path: str, layout_file: str, backend) -> dict | None:
    """For :meth:`QuantBackend.folder_options` of a backend that writes its own layout file beside a marked
    ``config.json`` (:func:`mark_qadapt_only`): the ``"options"`` the layout file records (those ``backend``
    declares), or None for a folder without it; a folder marked as ``backend``'s whose layout file is missing is
    refused (:class:`qadapt.CheckpointError`)."""
    layout = read_json(os.path.join(path, layout_file))
    if layout is not None:
        known = {option.name for option in backend.options}
        return {key: value for key, value in (layout.get("options") or {}).items() if key in known}
    if qadapt_only_backend(path) == backend.name:
        from .errors import CheckpointError

        raise CheckpointError(f"load {path!r}", f"config.json says it holds {backend.name} layers but {layout_file} is "
                              "missing", "Copy the whole folder qadapt.save wrote")
    return None


def load_config(path: str):
    """``AutoConfig.from_pretrained(path)`` without the mark of :func:`mark_qadapt_only` (so that PEFT, Trainer and
    ``save_pretrained`` never see a quantization config without a method)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    found = getattr(config, "quantization_config", None)
    if isinstance(found, dict) and QADAPT_ONLY in found:
        del config.quantization_config
    return config


@contextmanager
def saving_pre_quantized(model):
    """While inside, ``model`` (a transformers model loaded from an already-quantized folder, or a PeftModel around
    one) saves with ``save_pretrained``.

    transformers 5.x keeps the converters that read a quantized folder (bitsandbytes' and torchao's "deserialize"
    operations) on the model as ``_weight_conversions``, and ``save_pretrained`` asks each for its reverse, which those
    operations do not define: a bare ``NotImplementedError`` (transformers 5.23; upstream PRs #45743 and #43096 are
    not merged). Nothing needs reversing: the in-memory state dict of those layers is the serialized layout already.
    So, for the duration of the save only, the converters made of the quantizer's load operations alone whose reverse
    raises are set aside; every other converter (renamings, fused experts) stays and is reversed as usual, and one that
    cannot be is refused with its name. Where transformers keeps no such converters (4.x, models quantized in this
    process) or implements the reverse, nothing changes.
    """
    import transformers
    from packaging.version import Version

    from .errors import IncompatibleError

    if Version(transformers.__version__).major < 5:  # 4.x keeps no converters on the model
        yield model
        return
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    conversions = inner.__dict__.get("_weight_conversions")
    quantizer = getattr(inner, "hf_quantizer", None)
    load_operations = getattr(quantizer, "get_load_operations", None)
    if not conversions or load_operations is None:
        yield model
        return
    operation_types = tuple(op for op in load_operations().values() if isinstance(op, type))
    kept = []
    for conversion in conversions:
        try:
            conversion.reverse_transform()
        except NotImplementedError as exc:
            operations = list(getattr(conversion, "operations", None) or ())
            if operations and operation_types and all(isinstance(op, operation_types) for op in operations):
                continue  # a deserialization only: the tensors in memory are in the serialized layout
            raise IncompatibleError(
                "save the model", f"transformers cannot reverse its weight conversion {conversion!r} ({exc or 'no reverse'})",
                "Merge with strategy='dequantize' to save a full-precision model, or save the adapter alone",
            ) from exc
        kept.append(conversion)
    inner._weight_conversions = kept
    try:
        yield model
    finally:
        inner._weight_conversions = conversions
