"""Checking what a user hands the API before anything is done with it: models, folders, calibration data, adapter
options, ``max_error``. Every check raises an :class:`InvalidOptionError` (an :class:`IncompatibleError` for a model
that cannot be converted) saying what is wrong, instead of the ``TypeError`` or ``IndexError`` that would come from
deep inside torch, PEFT or transformers after part of the work was done."""

from __future__ import annotations

import json
import math
import numbers
import os
import re

from .errors import IncompatibleError, InvalidOptionError

#: weight files transformers would unpickle; qadapt reads weights with safetensors only
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


# ---------------------------------------------------------------------------------------------------- models
def check_model_argument(model) -> None:
    """A ``PreTrainedModel`` (any ``torch.nn.Module``) or a path; anything else is refused."""
    if isinstance(model, str):
        return
    import torch

    if not isinstance(model, torch.nn.Module):
        raise InvalidOptionError(f"load {type(model).__name__} {_short(model)}",
                                 "expected a PreTrainedModel or a path to a local folder", "Pass a model or a folder")


def check_model_folder(path: str) -> None:
    """A transformers folder: ``config.json`` holding a JSON object with a ``model_type``, and safetensors weights."""
    asked = f"load {path!r}"
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except FileNotFoundError:
        raise InvalidOptionError(asked, "the folder has no config.json: it is not a transformers model folder",
                                 "Pass a folder saved with save_pretrained, or one written by qadapt.save") from None
    except (OSError, ValueError) as exc:
        raise InvalidOptionError(asked, f"its config.json is unreadable ({exc})", "Save the model again") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise InvalidOptionError(asked, "its config.json is not a transformers config (no model_type)",
                                 "Save the model again with save_pretrained")
    names = os.listdir(path)
    if any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in names):
        _check_safetensors(asked, path, names)
        return
    if any(name.lower().endswith(PICKLE_WEIGHTS) for name in names):
        raise InvalidOptionError(asked, "its weights are pickle files (.bin/.pt), which can run code when loaded; "
                                 "qadapt loads weights with safetensors only",
                                 "Convert them: model.save_pretrained(folder, safe_serialization=True)")
    raise InvalidOptionError(asked, "the folder holds no safetensors weights", "Save the model with save_pretrained")


def _check_safetensors(asked: str, path: str, names: list) -> None:
    """Every shard an index names is in the folder, and every weight file's header reads and covers the file: a
    missing or truncated file is refused here, before any work, not as an error from the middle of the load."""
    from safetensors import safe_open

    again = "Copy the model folder again, or save it again with save_pretrained"
    for index in sorted(name for name in names if name.endswith(".safetensors.index.json")):
        try:
            with open(os.path.join(path, index), encoding="utf-8") as handle:
                shards = {str(shard) for shard in json.load(handle)["weight_map"].values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidOptionError(asked, f"its {index} is unreadable ({type(exc).__name__}: {exc})", again) from exc
        missing = sorted(shards - set(names))
        if missing:
            raise InvalidOptionError(asked, f"{index} names weight files the folder does not hold: {_few(missing)}",
                                     again)
    for name in sorted(name for name in names if name.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(path, name), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
            raise InvalidOptionError(asked, f"its weight file {name} is damaged (truncated, or not safetensors: "
                                     f"{type(exc).__name__}: {str(exc)[:200]})", again) from exc


def check_folder_weights(path: str) -> None:
    """Every weight of the model that a full-precision folder describes is in its files. A missing one would be
    started at random by transformers and then quantized, which looks like any other load. One way to get such a
    folder: ``save_pretrained`` of a model whose backend replaces layers (hqq, eetq, inc) writes their
    quantized tensors without a ``quantization_config``."""
    from .hf import unmatched_weights

    missing, unexpected = unmatched_weights(path)
    if not missing:
        return
    why = (f"{len(missing)} of the model's weights are missing from the folder, or held there in another shape or as "
           f"integers ({_few(missing)}); transformers would start them at random")
    if unexpected:
        why += (f". The folder holds {len(unexpected)} tensors that the model has no place for ({_few(unexpected)}), "
                "as a quantized model saved with save_pretrained but without its quantization_config would")
    raise InvalidOptionError(f"load {path!r}", why, "Pass the full-precision folder the model came from, or save a "
                             "quantized model with qadapt.save(model, path) and load that folder")


def _few(names: list, shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")


def refuse_converted(model, backend) -> None:
    """An in-memory model that is already quantized (by qadapt, by transformers or by any registered backend's
    layers) or carries a PEFT adapter cannot be converted again: refused before anything changes."""
    from .plugins import registrations
    from .record import ATTRIBUTE

    asked = f"quantize a model with backend '{backend.name}'"
    hint = "Pass the full-precision model or its folder (qadapt.load(path, backend=...))"
    from peft.tuners.tuners_utils import BaseTunerLayer

    if hasattr(model, "peft_config") or any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise IncompatibleError(asked, "the model carries a PEFT adapter", hint)
    record = model.__dict__.get(ATTRIBUTE)
    if record is not None and record.backend is not None:
        raise IncompatibleError(asked, f"the model is already quantized with '{record.backend}'", hint)
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        raise IncompatibleError(asked, "the model is already quantized (transformers' quantizer is set)", hint)
    for name, registration in registrations().items():
        other = registration.backend
        if not _library_imported(other):
            continue  # a model can hold a backend's layers only once its library was imported
        for module_name, module in model.named_modules():
            if module_name and _is_layer_of(other, module):
                raise IncompatibleError(asked, f"its layer {module_name!r} is already quantized ('{name}')", hint)


def _library_imported(backend) -> bool:
    import sys

    requires = [module for module in backend.requires if isinstance(module, str)]
    return bool(requires) and all(module.split(".")[0] in sys.modules for module in requires)


def _is_layer_of(backend, module) -> bool:
    try:
        return bool(backend.is_quantized_layer(module))
    except Exception:  # noqa: BLE001 - another plugin's broken check must not decide this load
        return False


def check_loaded(loaded, backend) -> None:
    import torch

    from .errors import PluginError

    if not isinstance(loaded, torch.nn.Module):
        raise PluginError(f"load with backend '{backend.name}'",
                          f"the backend returned {type(loaded).__name__}, not a model (a bug in its plugin)",
                          "Report it to the plugin's authors")


# ---------------------------------------------------------------------------------------------------- token ids
def vocab_size_of(model) -> int | None:
    if isinstance(model, str):
        try:
            with open(os.path.join(model, "config.json"), encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return None
        size = config.get("vocab_size") if isinstance(config, dict) else None
    else:
        size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def token_ids(value, vocab_size: int | None, asked: str):
    """``value`` (a tensor or nested list of token ids, one sequence or a batch) as a 2-D ``long`` tensor, checked:
    integers, not empty, each id in ``[0, vocab_size)``."""
    import torch

    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, (list, tuple)):
        try:
            tensor = torch.tensor(value)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise InvalidOptionError(asked, f"token ids must be a tensor or a list of integers ({exc})",
                                     "Pass tokenizer(text, return_tensors='pt').input_ids") from exc
    else:
        raise InvalidOptionError(asked, f"token ids must be a tensor or a list of integers, not {type(value).__name__}",
                                 "Pass tokenizer(text, return_tensors='pt').input_ids")
    if tensor.dim() not in (1, 2) or tensor.numel() == 0:
        raise InvalidOptionError(asked, f"token ids must be one sequence or a batch (1-D or 2-D, not empty), got shape "
                                 f"{tuple(tensor.shape)}", "Pass tokenizer(text, return_tensors='pt').input_ids")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise InvalidOptionError(asked, f"token ids must be integers, not {tensor.dtype}", "Pass a long tensor")
    tensor = tensor.long()
    low, high = int(tensor.min()), int(tensor.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise InvalidOptionError(asked, f"token ids range over [{low}, {high}], outside the vocabulary [0, "
                                 f"{vocab_size if vocab_size is not None else '...'})",
                                 "Tokenize with the model's own tokenizer")
    return tensor if tensor.dim() == 2 else tensor.unsqueeze(0)


def calibration_batches(calibration, tokenizer, vocab_size: int | None):
    """The calibration data of ``qadapt.load`` as a list of 2-D token-id tensors (None for None)."""
    if calibration is None:
        return None
    import torch

    asked = "load with calibration=..."
    if isinstance(calibration, torch.Tensor):
        calibration = list(calibration) if calibration.dim() == 2 else [calibration]
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, (list, tuple)):
        raise InvalidOptionError(asked, f"calibration must be a list of texts or of token-id tensors, not "
                                 f"{type(calibration).__name__}", "Pass calibration=[text, ...] with tokenizer=...")
    batches = []
    for item in calibration:
        if isinstance(item, str):
            if tokenizer is None:
                raise InvalidOptionError("calibration texts", "texts need a tokenizer", "Pass tokenizer=...")
            if not callable(tokenizer):
                raise InvalidOptionError(asked, f"tokenizer must be a tokenizer, not {type(tokenizer).__name__}",
                                         "Pass the model's tokenizer")
            item = tokenizer(item, return_tensors="pt").input_ids
        batches.append(token_ids(item, vocab_size, asked))
    return batches


# ---------------------------------------------------------------------------------------------------- merge
def check_max_error(max_error) -> None:
    if max_error is None:
        return
    if isinstance(max_error, bool) or not isinstance(max_error, numbers.Real) or not math.isfinite(max_error) \
            or max_error < 0:
        raise InvalidOptionError(f"merge with max_error={max_error!r}", "max_error is a finite number >= 0 (a relative "
                                 "output error: 0.05 is 5%)", "Pass max_error=0.05, or leave it out")


def check_choice(value, choices, asked: str, what: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise InvalidOptionError(asked, f"unknown {what}", f"Choose one of {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------------- attach
#: PEFT options qadapt checks itself, per method: (option, kind); PEFT raises for them only after injecting layers,
#: or not at all (r=2.5 fails in torch.empty, lora_alpha="16" in a division)
_RANKS = {"lora": ("r",), "dora": ("r",), "vera": ("r",), "adalora": ("init_r", "target_r", "total_step"), "ia3": ()}
_ALPHAS = {"lora": ("lora_alpha",), "dora": ("lora_alpha",), "adalora": ("lora_alpha",)}
_DROPOUTS = {"lora": ("lora_dropout",), "dora": ("lora_dropout",), "vera": ("vera_dropout",),
             "adalora": ("lora_dropout",)}
_BIASES = {"lora": ("none", "all", "lora_only"), "dora": ("none", "all", "lora_only"),
           "adalora": ("none", "all", "lora_only"), "vera": ("none", "all", "vera_only")}


def check_adapter_options(method: str, options: dict, widest: int | None) -> None:
    """Refuse PEFT options PEFT would accept and then fail on, or misread: ranks (positive integers, LoRA's no wider
    than the widest targeted layer), alphas (numbers), dropouts (in [0, 1)), biases (PEFT's choices)."""
    asked = f"attach {method!r}"
    if method == "adalora" and "r" in options:
        # PEFT 0.21 ignores it with a warning ("r is not used in AdaLora"): an option not honoured is refused
        raise InvalidOptionError(f"{asked} with r={options['r']!r}", "AdaLoRA's ranks are init_r (at the start) and "
                                 "target_r (after pruning); PEFT ignores r", "Pass init_r=... and target_r=...")
    for name in _RANKS.get(method, ()):
        if name in options:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidOptionError(f"{asked} with {name}={value!r}", f"{name} must be a positive integer",
                                         f"Pass e.g. {name}=8")
            if name in ("r", "init_r", "target_r") and method != "vera" and widest is not None and value > widest:
                raise InvalidOptionError(f"{asked} with {name}={value!r}", f"{name} is above the width of every "
                                         f"targeted layer (widest: {widest}); the adapter would only cost memory",
                                         f"Pass {name} <= {widest}")
    for name in _ALPHAS.get(method, ()):
        if name in options:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InvalidOptionError(f"{asked} with {name}={value!r}", f"{name} must be a finite number",
                                         f"Pass e.g. {name}=16")
    for name in _DROPOUTS.get(method, ()):
        if name in options:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
                raise InvalidOptionError(f"{asked} with {name}={value!r}", f"{name} is a probability in [0, 1)",
                                         f"Pass e.g. {name}=0.05")
    if "bias" in options and method in _BIASES:
        check_choice(options["bias"], _BIASES[method], f"{asked} with bias={options['bias']!r}", "bias")


def check_target_modules(model, target_modules, method: str) -> list[str]:
    """The module names ``target_modules`` (PEFT's forms: a list of names or suffixes, or a regex string) match;
    refused when it is of another type, empty, an invalid regex, or matches nothing."""
    asked = f"attach {method!r} with target_modules={_short(target_modules)}"
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise InvalidOptionError(asked, f"it is not a valid regular expression ({exc})",
                                     "Pass a list of module names, or 'all-linear'") from exc
        matched = [name for name in names if pattern.fullmatch(name)]
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules \
            and all(isinstance(t, str) and t for t in target_modules):
        matched = [name for name in names if any(name == t or name.endswith("." + t) for t in target_modules)]
    else:
        raise InvalidOptionError(asked, "target_modules is 'all-linear', a regular expression, or a non-empty list of "
                                 "module names", "Pass e.g. target_modules=['q_proj', 'v_proj']")
    if not matched:
        raise InvalidOptionError(asked, "it matches no module of the model", "Pass names of the model's linear layers")
    return matched


def widest_layer(model, names) -> int | None:
    widths = []
    for name in names:
        module = model.get_submodule(name)
        for attribute in ("in_features", "out_features"):
            value = getattr(module, attribute, None)
            if isinstance(value, int):
                widths.append(value)
    return max(widths) if widths else None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
