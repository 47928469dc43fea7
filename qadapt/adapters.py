"""Attaching PEFT adapters to a quantized model: the config for each method, target selection, fast dispatch."""

from __future__ import annotations

import threading
from contextlib import ExitStack, contextmanager
from typing import Any

from .capabilities import METHODS
from .errors import InvalidOptionError

#: PEFT's LoRA dispatchers for backend libraries (``peft.tuners.lora.model``), which fast dispatch can stub out.
_SKIPPABLE = (
    "dispatch_eetq",
    "dispatch_aqlm",
    "dispatch_awq",
    "dispatch_gptq",
    "dispatch_hqq",
    "dispatch_inc",
    "dispatch_torchao",
    "dispatch_megatron",
    "dispatch_transformer_engine",
)
#: dispatchers whose layers are gptqmodel's: PEFT asks gptqmodel whether a layer is one of them
_GPTQMODEL = ("dispatch_gptq", "dispatch_awq")
#: bitsandbytes' LoRA dispatchers, which PEFT adds behind its ``is_bnb_available`` flags
_BNB = ("dispatch_bnb_8bit", "dispatch_bnb_4bit")
_patch_lock = threading.Lock()


def target_names(model, backend, target_modules) -> list[str]:
    """Resolve ``target_modules`` to full module names.

    ``"all-linear"`` means every ``nn.Linear`` and every quantized layer of ``backend`` except the output head: PEFT's
    own ``"all-linear"`` misses layer classes it does not know (HQQLinear, INC's and AQLM's layers).
    """
    import torch

    if target_modules != "all-linear":
        return target_modules
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        name
        for name, module in model.named_modules()
        if module is not head
        and name
        and (isinstance(module, torch.nn.Linear) or backend.is_quantized_layer(module))
        and not _inside_quantized(name, model, backend)
    ]
    if not names:
        raise InvalidOptionError(
            "target_modules='all-linear'", "the model has no linear or quantized layers to adapt", "Name target_modules"
        )
    return names


def _inside_quantized(name, model, backend) -> bool:
    # A quantized layer may hold an nn.Linear child of its own; target the quantized layer, not its parts.
    parts = name.split(".")
    for i in range(1, len(parts)):
        if backend.is_quantized_layer(model.get_submodule(".".join(parts[:i]))):
            return True
    return False


def proxy_targets(model, targets) -> list[str]:
    """Full names of the modules that ``targets`` (full names, suffixes, or a regex string, as PEFT takes them) match."""
    import re

    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        return [name for name in names if re.fullmatch(targets, name)]
    return [name for name in names if any(name == t or name.endswith("." + t) for t in targets)]


def peft_config(method: str, targets, model, options: dict[str, Any]):
    """The PEFT config for ``method`` with qadapt's defaults, overridden by ``options``."""
    import peft

    options = dict(options)
    if method in ("lora", "dora"):
        options.setdefault("r", 8)
        options.setdefault("lora_alpha", 2 * options["r"])
        options.setdefault("lora_dropout", 0.0)
        return _build(peft.LoraConfig, method, targets, options, use_dora=method == "dora")
    if method == "vera":
        options.setdefault("r", 64)
        return _build(peft.VeraConfig, method, targets, options)
    if method == "adalora":
        options.setdefault("init_r", 12)
        options.setdefault("target_r", 8)
        if "total_step" not in options:
            raise InvalidOptionError(
                "attach 'adalora'",
                "AdaLoRA's rank schedule needs the number of training steps",
                "Pass total_step=<optimizer steps> (and call model.base_model.update_and_allocate(step) after each step)",
            )
        return _build(peft.AdaLoraConfig, method, targets, options)
    if method == "ia3":
        if "feedforward_modules" not in options:
            options["feedforward_modules"] = _feedforward(model, targets)
        return _build(peft.IA3Config, method, targets, options)
    raise InvalidOptionError(f"attach {method!r}", "unknown adapter method", f"Choose one of {', '.join(METHODS)}")


def _build(config_cls, method, targets, options, **fixed):
    import dataclasses

    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise InvalidOptionError(
            f"attach {method!r} with {unknown[0]}={options[unknown[0]]!r}",
            f"{config_cls.__name__} has no option '{unknown[0]}'",
            "See the PEFT documentation of " + config_cls.__name__,
        )
    try:
        return config_cls(task_type="CAUSAL_LM", target_modules=targets, **fixed, **options)
    except (ValueError, TypeError) as exc:
        raise InvalidOptionError(f"attach {method!r}", str(exc), "Fix the adapter options") from exc


def _feedforward(model, targets) -> list[str]:
    """IA3 scales the *input* of feed-forward output projections and the output of everything else; use PEFT's own
    per-architecture list of those projections."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as MAPPING

    suffixes = MAPPING.get(getattr(model.config, "model_type", ""), [])
    if isinstance(targets, str):
        return []
    return [t for t in targets if t.rsplit(".", 1)[-1] in suffixes]


@contextmanager
def fast_dispatch(backend):
    """Skip PEFT's dispatchers for other backends' layers while attaching to ``backend``'s.

    PEFT tries every backend it knows for every layer, importing each installed backend library (about 2,000 modules
    with all of them installed). The model's layers can only match the dispatchers its own backend names in
    ``peft_dispatchers``, so the others are stubbed for the duration of the call. A backend that names none
    (``None``) gets PEFT's full dispatch.
    """
    needed = backend.peft_dispatchers
    if needed is None:
        yield
        return
    import importlib

    patches = []
    lora = importlib.import_module("peft.tuners.lora.model")
    for name in _SKIPPABLE:
        if name not in needed and hasattr(lora, name):
            patches.append((lora, name, _no_dispatch))
    if not set(_GPTQMODEL) & set(needed):
        # PEFT asks "is this a gptqmodel layer?" of every layer that is not nn.Linear, importing gptqmodel to know.
        utils = importlib.import_module("peft.tuners.tuners_utils")
        if hasattr(utils, "is_gptqmodel_quant_linear"):
            patches.append((utils, "is_gptqmodel_quant_linear", _false))
    if not set(_BNB) & set(needed):
        for module_name in ("peft.tuners.lora.model", "peft.tuners.ia3.model", "peft.tuners.adalora.model", "peft.tuners.vera.model"):
            module = importlib.import_module(module_name)
            for flag in ("is_bnb_available", "is_bnb_4bit_available"):
                if hasattr(module, flag):
                    patches.append((module, flag, _false))
    with _patch_lock, ExitStack() as stack:
        for module, name, value in patches:
            original = getattr(module, name)
            setattr(module, name, value)
            stack.callback(setattr, module, name, original)
        yield


def _no_dispatch(target, adapter_name, config=None, **kwargs):
    return None


def _false(*args, **kwargs):
    return False


def register_custom_layers(config, backend) -> None:
    """Give a LoRA config the backend's own LoRA layer classes for layer types PEFT does not know."""
    custom = backend.peft_layer_types()
    if custom and hasattr(config, "_register_custom_module"):
        config._register_custom_module(custom)


def freeze_constants(peft_model) -> None:
    """Freeze the adapter tensors PEFT means to be constants.

    AdaLoRA keeps its rank count ``ranknum`` as an ``nn.Parameter`` created with ``requires_grad=False``; when PEFT
    moves the adapter to its base layer's device or dtype (a GPU, a bfloat16 model) it wraps the moved tensor in a new,
    trainable Parameter (PEFT 0.21). The optimizer then changes it, and since it is not saved with the adapter, a
    reloaded model differs from the trained one (4e-4 relative on the toy Llama, found by ``qadapt matrix --verify``
    on an H100).
    """
    for name, parameter in peft_model.named_parameters():
        if ".ranknum." in name:
            parameter.requires_grad_(False)


# ------------------------------------------------------------------------------- adapters already on a model
def method_of(config) -> str:
    """qadapt's method name for a PEFT adapter config, or :class:`InvalidOptionError` naming a PEFT type qadapt does
    not handle."""
    import peft

    if isinstance(config, peft.AdaLoraConfig):  # first: AdaLoraConfig subclasses LoraConfig
        return "adalora"
    if isinstance(config, peft.LoraConfig):
        return "dora" if config.use_dora else "lora"
    if isinstance(config, peft.VeraConfig):
        return "vera"
    if isinstance(config, peft.IA3Config):
        return "ia3"
    raise InvalidOptionError(
        f"a {type(config).__name__} adapter", f"qadapt handles {', '.join(METHODS)} adapters; this one is PEFT type "
        f"{getattr(config, 'peft_type', '?')}", "Save, load and merge it with PEFT's own functions",
    )


def attached(model) -> dict[str, str]:
    """``{adapter name: method}`` for every adapter on ``model``, however it got there (qadapt.attach,
    ``peft.get_peft_model``, ``PeftModel.from_pretrained``, TRL's ``SFTTrainer(peft_config=...)``); ``{}`` for a
    model without one. A model holding PEFT layers outside a ``PeftModel`` (transformers' ``model.add_adapter``,
    ``peft.inject_adapter_in_model``) is refused: qadapt could neither save nor merge those adapters."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, peft.PeftModel):
        return {name: method_of(config) for name, config in model.peft_config.items()}
    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise InvalidOptionError(
            "a model with PEFT adapter layers but no PeftModel around it (transformers' add_adapter or PEFT's "
            "inject_adapter_in_model)", "qadapt saves, merges and restores adapters of a peft.PeftModel",
            "Attach with qadapt.attach (or peft.get_peft_model), or load the adapter with qadapt.load_adapter",
        )
    return {}


def active_name(model) -> str:
    """The name of the active adapter of a ``PeftModel`` (PEFT activates one at a time)."""
    active = model.active_adapter
    return active[0] if isinstance(active, (list, tuple)) else active


def holds(layer, adapter_name: str) -> bool:
    """Does the PEFT tuner layer hold weights of ``adapter_name``? (PEFT's ``layer.active_adapters`` is the model-wide
    setting: a layer left by another adapter lists it too.)"""
    return any(adapter_name in (getattr(layer, part, None) or {}) for part in layer.adapter_layer_names)


def parameters_of(peft_model, adapter_name: str):
    """The parameters of one adapter (PEFT names them ``...<part>.<adapter name>[.weight]``)."""
    return [p for n, p in peft_model.named_parameters() if f".{adapter_name}." in n or n.endswith(f".{adapter_name}")]
