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
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_patch_lock = threading.RLock()


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


def save_config(model, path) -> None:
    """Write ``model``'s config.json to ``path`` recording the dtype the model's floating-point weights are in (what
    ``save_pretrained`` does): a model built in memory and cast (``model.to(torch.bfloat16)``) keeps ``dtype=None``
    in its config, and its folder would load in float32 beside the backend's half-precision layers."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = model_dtype(model)
    config.save_pretrained(path)


def save_full_precision(model, path) -> None:
    """Save a model whose layers are all plain (no quantization config) as a standard transformers folder. Layers
    :func:`linearize` or :func:`defuse_experts` converted are written in the architecture's own layout (Conv1D
    weights transposed back, per-expert weights fused again), so that ``from_pretrained`` reads the folder as any other
    of that architecture."""
    from safetensors.torch import save_file, save_model

    save_config(model, path)
    done = conversions(model)
    if not done:
        save_model(model, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    state = unshared_state_dict(model)
    for name, original in done.get("linearized", {}).items():
        if original == "Conv1D":
            state[f"{name}.weight"] = state[f"{name}.weight"].t().contiguous()
    for name in done.get("defused", {}).get("modules", []):
        _fuse_experts_state(state, name, model.get_submodule(name))
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _fuse_experts_state(state: dict, name: str, experts) -> None:
    """Per-expert ``{name}.{i}.{gate,up,down}_proj.weight`` tensors of ``state`` back into transformers 5's fused
    ``{name}.gate_up_proj`` (experts, 2 x intermediate, hidden: gate rows first) and ``{name}.down_proj``, the layout
    defuser split them from (concatenated, not transposed, no bias)."""
    import torch

    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True) \
            or getattr(experts, "has_bias", False) or not getattr(experts, "has_gate", True):
        raise NotImplementedError(f"{name}: fusing back this experts layout (transposed, interleaved or with biases) "
                                  "is not implemented")
    count = len([key for key in experts._modules if key.isdigit()])
    take = lambda i, part: state.pop(f"{name}.{i}.{part}.weight")  # noqa: E731
    gate_up = [torch.cat([take(i, "gate_proj"), take(i, "up_proj")], dim=0) for i in range(count)]
    state[f"{name}.gate_up_proj"] = torch.stack(gate_up).contiguous()
    state[f"{name}.down_proj"] = torch.stack([take(i, "down_proj") for i in range(count)]).contiguous()


def load_full_precision(path, gpu=True, **from_pretrained):
    """A full-precision folder as a transformers model, on :func:`default_device` ; ``gpu=False`` leaves it where
    ``from_pretrained`` puts it (the CPU), for quantizers that read it there. Other keywords go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if gpu:
        from_pretrained.setdefault("device_map", default_device())
    # safetensors only: transformers otherwise falls back to unpickling pytorch_model.bin
    from_pretrained.setdefault("use_safetensors", True)
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


# ------------------------------------------------------------------------------------------ architecture conversions
#: the attribute of a model where the conversions below record what they did (kept out of state_dict and config)
CONVERSIONS = "_qadapt_conversions"
#: the file in a saved base folder that records them, so that a loader building the model from its config applies them
CONVERSIONS_FILE = "qadapt_conversions.json"
#: ``nn.Linear`` subclasses of transformers whose forward is ``x @ W.T + b`` like ``F.linear``, but that integrations
#: matching ``type(module) is nn.Linear`` skip (transformers 5.23's bitsandbytes replacement) or whose ``W.T`` a
#: tensor-subclass weight cannot run (torchao's Int8Tensor has no ``aten.permute``): ``{module: class names}``
F_LINEAR_SUBCLASSES = {"transformers.models.falcon.modeling_falcon": ("FalconLinear",)}


def conversions(model) -> dict:
    """What :func:`linearize` and :func:`defuse_experts` did to ``model`` (empty: nothing)."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return dict(inner.__dict__.get(CONVERSIONS, {}))


def _record_conversion(model, kind: str, value) -> None:
    model.__dict__.setdefault(CONVERSIONS, {})[kind] = value


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its family): a linear layer whose weight is stored (in, out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, Conv1D)


def _is_f_linear_subclass(module) -> bool:
    import torch

    cls = type(module)
    if cls is torch.nn.Linear or not isinstance(module, torch.nn.Linear):
        return False
    return cls.forward is torch.nn.Linear.forward or cls.__name__ in F_LINEAR_SUBCLASSES.get(cls.__module__, ())


def linearize(model, skip=()) -> dict:
    """Make every dense matmul layer of ``model`` a plain ``nn.Linear``, in place, so that a backend replacing
    ``nn.Linear`` layers quantizes them all; the output head and names in ``skip`` are left. Returns and records
    ``{name: original class name}`` (saved by :func:`save_conversions`, replayed by :func:`model_from_config`).

    * transformers' ``Conv1D`` stores its weight (in, out) and computes ``addmm(b, x, W)``: it becomes
      ``nn.Linear(in, out)`` with the weight transposed (a copy). No maintained library offers this conversion:
      gptqmodel and INC convert Conv1D inside their own quantizers only, PEFT transposes it itself (fan_in_fan_out).
    * ``nn.Linear`` subclasses whose forward is ``F.linear`` (:data:`F_LINEAR_SUBCLASSES`, or any that does not
      override ``forward``) become ``nn.Linear`` sharing the same parameters. Subclasses with a forward of their own
      (routers) are left alone: the load report names them.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    converted = {}
    for name, module in list(model.named_modules()):
        if not name or module is head or any(name == s or name.endswith("." + s) for s in skip):
            continue
        if is_conv1d(module):
            in_features, out_features = module.weight.shape
            linear = torch.nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
            linear.weight = torch.nn.Parameter(module.weight.detach().t().contiguous(),
                                               requires_grad=module.weight.requires_grad)
            linear.bias = module.bias
        elif _is_f_linear_subclass(module):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                     device="meta")
            linear.weight, linear.bias = module.weight, module.bias
        else:
            continue
        converted[name] = type(module).__name__
        replace_module(model, name, linear)
    if converted:
        _record_conversion(model, "linearized", {**conversions(model).get("linearized", {}), **converted})
    return converted


@contextmanager
def plain_linear_classes():
    """While active, transformers builds the :data:`F_LINEAR_SUBCLASSES` as plain ``nn.Linear`` (same weight layout,
    same forward): for backends that quantize through ``from_pretrained`` (bitsandbytes, torchao), whose replacement
    skips ``nn.Linear`` subclasses or whose tensor subclass cannot run Falcon's ``input @ weight.T``. Model code looks
    these classes up as module globals when it builds a layer, so the swap is scoped to the block (and a lock)."""
    import importlib

    import torch

    with _patch_lock:
        saved = []
        for module_name, names in F_LINEAR_SUBCLASSES.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # pragma: no cover - an older transformers without this model
                continue
            for name in names:
                if hasattr(module, name):
                    saved.append((module, name, getattr(module, name)))
                    setattr(module, name, torch.nn.Linear)
        try:
            yield
        finally:
            for module, name, value in saved:
                setattr(module, name, value)


def fused_experts_modules(model) -> list[str]:
    """Names of the modules holding fused 3-D expert parameters (transformers 5's ``*Experts`` classes)."""
    from .inventory import expert_parameters

    return [name for name, module in model.named_modules() if expert_parameters(module)]


def defuse_experts(model) -> list[str]:
    """Split every fused experts module of ``model`` into per-expert ``nn.Linear`` layers, in place, with defuser
    (``defuser.convert_model``, the library gptqmodel uses; logits are bit-identical), so that a backend replacing
    ``nn.Linear`` layers quantizes the experts. Returns and records the names of the experts modules split.

    Raises ``RuntimeError`` if a fused expert parameter is left: ``convert_model`` returns True even when it split
    nothing (defuser 0.0.28), so qadapt checks the model itself. defuser prints the modules it converts to stdout;
    that is silenced. Only the per-model conversion is used: ``defuser.replace_fused_blocks`` patches transformers'
    classes for the whole process (see :func:`restore_defuser_patches`).
    """
    import contextlib
    import io

    import defuser

    before = fused_experts_modules(model)
    if not before:
        return []
    with contextlib.redirect_stdout(io.StringIO()):
        defuser.convert_model(model)
    left = fused_experts_modules(model)
    if left:
        raise RuntimeError(f"defuser {_version('defuser')} left fused expert parameters in {left[:3]}")
    _record_conversion(model, "defused", {"library": "defuser", "version": _version("defuser"), "modules": before})
    return before


def can_defuse(model) -> str | None:
    """Why :func:`defuse_experts` cannot split ``model``'s experts, or None if it can. Imports defuser only when the
    model has fused experts."""
    if not fused_experts_modules(model):
        return None
    if not is_importable("defuser"):
        return "the defuser package is not installed (pip install defuser)"
    from defuser.model_registry import MODEL_CONFIG

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_CONFIG:
        return f"defuser {_version('defuser')} has no conversion for model_type {model_type!r}"
    return None


def prepare_linear_layers(model) -> None:
    """For backends that replace ``nn.Linear`` layers one by one: split fused MoE experts into per-expert
    ``nn.Linear`` layers (:func:`defuse_experts`, where defuser can) and make transformers' ``Conv1D`` and
    ``FalconLinear`` ``nn.Linear`` (:func:`linearize`); both recorded for :func:`save_conversions`."""
    if can_defuse(model) is None:  # otherwise full_precision() refused the experts, or the user allowed them
        defuse_experts(model)
    linearize(model)


def refuse_fused_experts(kept: dict, model) -> dict:
    """``kept`` (a :meth:`~qadapt.QuantBackend.full_precision` answer) plus a refusal of every fused expert parameter
    of ``model`` where defuser cannot split them (not installed, or an architecture it does not know): for backends
    that quantize experts after :func:`prepare_linear_layers`."""
    from .inventory import cannot, matmul_weights

    problem = can_defuse(model)
    if problem:
        for weight in matmul_weights(model):
            if weight.kind == "experts":
                kept[weight.name] = cannot(f"fused MoE expert parameter, split into per-expert layers with defuser "
                                           f"before quantizing: {problem}")
    return kept


@contextmanager
def restore_defuser_patches():
    """Undo, at the end of the block, the process-wide patches ``defuser.replace_fused_blocks`` makes (gptqmodel
    calls it on every load: transformers' MoE block classes and its checkpoint conversion mapping are replaced, so
    every model of those types built afterwards in the process, by any backend, would be defused)."""
    import importlib

    saved = []
    try:
        from defuser.model_registry import MODEL_CONFIG, PATCH
    except Exception:  # defuser not installed: nothing can patch
        yield
        return
    for config in MODEL_CONFIG.values():
        for original, _ in config.get(PATCH.REPLACE_MODULE, []):
            module_name, _, class_name = original.rpartition(".")
            try:
                module = importlib.import_module(module_name)
            except Exception:
                continue
            if hasattr(module, class_name):
                saved.append((module, class_name, getattr(module, class_name)))
    for module_name in ("transformers.conversion_mapping", "transformers.modeling_utils"):
        module = importlib.import_module(module_name)
        if hasattr(module, "get_checkpoint_conversion_mapping"):
            saved.append((module, "get_checkpoint_conversion_mapping", module.get_checkpoint_conversion_mapping))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def save_conversions(model, path) -> None:
    """Write what :func:`linearize` / :func:`defuse_experts` did into the base folder ``path`` (nothing if nothing)."""
    done = conversions(model)
    if done:
        with open(os.path.join(path, CONVERSIONS_FILE), "w", encoding="utf-8") as handle:
            json.dump(done, handle, indent=2, sort_keys=True)


def model_from_config(path, dtype=None):
    """A model built (random weights) from the ``config.json`` of folder ``path``, with the conversions recorded by
    :func:`save_conversions` applied: the module layout its saved weights were written from. For loaders that place
    their quantized layers in a freshly built model."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    config = load_config(path)  # without qadapt's "plain transformers cannot load this" mark
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    recorded = {}
    recorded_path = os.path.join(path, CONVERSIONS_FILE)
    if os.path.exists(recorded_path):
        with open(recorded_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
    if recorded.get("defused"):
        defused = defuse_experts(model)
        if sorted(defused) != sorted(recorded["defused"]["modules"]):
            raise ValueError(f"{path}: the saved model split the experts of {recorded['defused']['modules'][:3]}, "
                             f"defuser splits {defused[:3]}")
    if recorded.get("linearized"):
        done = linearize(model)
        missing = sorted(set(recorded["linearized"]) - set(done))
        if missing:
            raise ValueError(f"{path}: layers recorded as converted to nn.Linear are not convertible here: {missing[:3]}")
    return model


def checkpoint_shape(path):
    """The model of a transformers folder on the meta device (its config only, no weights read): what a backend's
    :meth:`~qadapt.QuantBackend.full_precision` is asked about before a folder is quantized."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    config = load_config(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def unmatched_weights(path) -> tuple[list, list]:
    """``(missing, unexpected)`` for a full-precision folder. ``missing`` lists the model's weights that the folder
    does not hold, or holds in another shape or as integers. ``unexpected`` lists the folder's tensors that the model
    has no place for. transformers' own loader matches them, with its key renames and expert conversions, on the meta
    device, so no weight is read. transformers would start a missing weight at random, saying so only in a log line."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    _, info = AutoModelForCausalLM.from_pretrained(path, config=load_config(path), device_map="meta",
                                                   output_loading_info=True, use_safetensors=True,
                                                   ignore_mismatched_sizes=True)
    missing = set(info.get("missing_keys") or ())
    missing |= {key for key, *_shapes in info.get("mismatched_keys") or ()}  # (name, shape held, shape expected)
    missing |= set(_integer_weights(path))
    return sorted(missing), sorted(info.get("unexpected_keys") or ())


def _integer_weights(path) -> list:
    """The ``*.weight`` tensors that a folder's safetensors headers give an integer dtype. In a full-precision folder
    these are a quantized layer's codes, which transformers would cast to floats."""
    from safetensors import safe_open

    found = []
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as handle:
                found += [key for key in handle.keys() if key.endswith(".weight")
                          and handle.get_slice(key).get_dtype() in ("I8", "U8", "I16", "I32", "I64", "BOOL")]
    return found


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def unparametrized_copy(module, weights: dict, dtype=None):
    """A copy of ``module`` (a fused-experts module) whose parameters named in ``weights`` are plain, frozen
    ``nn.Parameter``s holding those tensors (in ``dtype``, default each tensor's); ``module`` is not changed.

    Not ``copy.deepcopy``: a parametrized module's class is a subclass torch creates for that instance
    (``torch.nn.utils.parametrize``); a copy would share it, and removing a parametrization from the copy removes the
    property from the shared class, silently changing the original (measured: a 7.8e-2 logit change). The copy is of
    the original class, without the parametrizations and without the hooks registered on ``module``."""
    import collections

    import torch
    import torch.nn.utils.parametrize as parametrize

    cls = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    copy_ = cls.__new__(cls)
    copy_.__dict__ = dict(module.__dict__)
    copy_._parameters = dict(module._parameters)
    copy_._buffers = dict(module._buffers)
    copy_._modules = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                  "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                  "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_backward_hooks",
                  "_backward_pre_hooks"):
        if hasattr(module, hooks):
            setattr(copy_, hooks, collections.OrderedDict())
    for key in [k for k in copy_.__dict__ if k.startswith("_qadapt_")]:
        del copy_.__dict__[key]
    for name, tensor in weights.items():
        copy_._parameters[name] = torch.nn.Parameter(tensor.detach().to(dtype or tensor.dtype), requires_grad=False)
    return copy_
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


def quantizer_load_operations(quantizer) -> tuple:
    """The operation classes with which transformers' ``quantizer`` reads a quantized folder: its
    ``get_load_operations()`` (transformers 5.23), or the operations of the converters its
    ``get_weight_conversions()`` builds (5.17 has no ``get_load_operations``); () where it has neither."""
    load_operations = getattr(quantizer, "get_load_operations", None)
    if load_operations is not None:
        return tuple(op for op in load_operations().values() if isinstance(op, type))
    weight_conversions = getattr(quantizer, "get_weight_conversions", None)
    if weight_conversions is None:
        return ()
    return tuple({type(op) for conversion in weight_conversions() for op in getattr(conversion, "operations", ())})


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
    operation_types = quantizer_load_operations(getattr(inner, "hf_quantizer", None))
    if not conversions or not operation_types:
        yield model
        return
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
