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
_patch_lock = threading.RLock()


def target_names(model, backend, target_modules) -> list[str]:
    """Resolve ``target_modules`` to full module names.

    ``"all-linear"`` means every ``nn.Linear``, transformers ``Conv1D`` and quantized layer of ``backend`` except the
    output head and MoE routers (kept in full precision by every backend, and left to route as trained): PEFT's own
    ``"all-linear"`` misses layer classes it does not know (HQQLinear, INC's and AQLM's layers). Fused MoE expert
    parameters are not modules: :func:`target_parameters` names them.
    """
    from .hf import is_conv1d
    from .inventory import is_router

    if target_modules != "all-linear":
        return target_modules
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        name
        for name, module in model.named_modules()
        if module is not head
        and name
        and (isinstance(module, torch.nn.Linear) or is_conv1d(module) or backend.is_quantized_layer(module))
        and not is_router(name, module)
        and not _inside_quantized(name, model, backend)
    ]
    if not names and not target_parameters(model):
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


def target_parameters(model) -> list[str]:
    """Full names of the fused 3-D expert parameters of ``model`` (transformers 5 MoE), for LoRA's
    ``target_parameters`` (``lora.ParamWrapper``). Full names, not suffixes: PEFT 0.21.2 matches a parameter that is
    already parametrized (bitsandbytes' 4-bit experts) only by its module's exact name
    (``BaseTuner._inject_parameters``), so a suffix silently adapts nothing there."""
    from .inventory import expert_parameters

    return [f"{name}.{parameter}" for name, module in model.named_modules() for parameter in expert_parameters(module)]


def proxy_targets(model, targets) -> list[str]:
    """Full names of the modules that ``targets`` (full names, suffixes, or a regex string, as PEFT takes them) match."""
    import re

    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        return [name for name in names if re.fullmatch(targets, name)]
    return [name for name in names if any(name == t or name.endswith("." + t) for t in targets)]


def peft_config(method: str, targets, model, options: dict[str, Any], parameters=()):
    """The PEFT config for ``method`` with qadapt's defaults, overridden by ``options``; ``parameters``: fused expert
    parameters to adapt too (LoRA only: PEFT's ``target_parameters``)."""
    import peft

    options = dict(options)
    if method in ("lora", "dora"):
        options.setdefault("r", 8)
        options.setdefault("lora_alpha", 2 * options["r"])
        options.setdefault("lora_dropout", 0.0)
        if parameters:
            options.setdefault("target_parameters", list(parameters))
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
        elif not isinstance(options["feedforward_modules"], str) and not isinstance(targets, str):
            # names or suffixes, as PEFT takes them; resolved to the full target names PEFT checks them against
            given = list(options["feedforward_modules"])
            options["feedforward_modules"] = [t for t in targets if any(t == f or t.endswith("." + f) for f in given)]
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
    per-architecture list of those projections, matched as PEFT matches it: a plain suffix of the full module name
    (``IA3Model._check_target_module_feedforward``), so that its dotted entries (``"mlp.c_proj"`` for GPT-2,
    ``"mlp.dense_4h_to_h"`` for Bloom) match. For an architecture PEFT has no entry for, PEFT refuses ("Please specify
    `feedforward_modules`"): so does qadapt, rather than silently scaling no layer's input."""
    import re

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as MAPPING

    model_type = getattr(model.config, "model_type", "")
    if model_type not in MAPPING:
        from .errors import ArchitectureError

        raise ArchitectureError(
            f"attach 'ia3' on model_type {model_type!r}",
            "PEFT has no default feed-forward layers for this architecture (IA3 scales their inputs, not outputs)",
            "Pass feedforward_modules=[...] (the MLP output projections, e.g. ['down_proj']), as PEFT requires",
        )
    if isinstance(targets, str):
        targets = [name for name, _ in model.named_modules() if name and re.fullmatch(targets, name)]
    return [t for t in targets if any(t.endswith(suffix) for suffix in MAPPING[model_type])]


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


@contextmanager
def explicit_targets():
    """Keep PEFT from rewriting qadapt's resolved targets, and the adapter state dict, for transformers-5 MoE models.

    PEFT 0.19+ (``peft.utils.transformers_weight_conversion``) converts a LoRA config for every model type transformers
    has a checkpoint conversion for: targets ending in ``gate_proj``/``up_proj``/``down_proj`` (Qwen-MoE family) or
    ``w1``/``w2``/``w3`` (Mixtral) leave ``target_modules`` for ``target_parameters`` ``gate_up_proj``/``down_proj``.
    On a model whose experts are split into per-expert linears (defuser, gptqmodel) those parameters do not exist: 24
    of 32 quantized layers of a gptq Qwen3-MoE got no adapter, with only a warning. On load it likewise merges
    per-expert adapter keys into fused ones the model does not have (the adapter stays at its initialisation).
    qadapt names every target itself (full names, :func:`target_names` / :func:`target_parameters`), so both
    conversions are identities while it attaches or loads an adapter."""
    import importlib

    try:
        conversion = importlib.import_module("peft.utils.transformers_weight_conversion")
    except ImportError:  # PEFT without transformers-5 weight conversion: nothing rewrites targets
        yield
        return
    patches = []
    if hasattr(conversion, "convert_peft_config_for_transformers"):
        patches.append(("convert_peft_config_for_transformers", _no_config_conversion))
    if hasattr(conversion, "convert_peft_adapter_state_dict_for_transformers"):
        patches.append(("convert_peft_adapter_state_dict_for_transformers", _no_state_dict_conversion))
    with _patch_lock, ExitStack() as stack:
        for name, value in patches:
            stack.callback(setattr, conversion, name, getattr(conversion, name))
            setattr(conversion, name, value)
        yield


def _no_config_conversion(peft_config, model, conversions=None, **kwargs):
    return None


def _no_state_dict_conversion(model, peft_config, adapter_state_dict, **kwargs):
    return adapter_state_dict


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


#: the last PEFT release with the two ParamWrapper bugs :func:`repair_parameter_wrappers` works around (seen in 0.21.2)
PARAM_WRAPPER_BUGS_UNTIL = "0.21.2"


def repair_parameter_wrappers(peft_model) -> int:
    """Work around two PEFT bugs of LoRA on fused expert parameters that are already parametrized (bitsandbytes'
    4-bit experts), with hooks on this model's instances (no PEFT code patched); returns the number of wrappers hooked.
    Applied for PEFT <= :data:`PARAM_WRAPPER_BUGS_UNTIL` only: tests/test_moe.py shows both bugs on the PEFT it runs,
    so a PEFT that fixes them fails that test and this gate is revisited.

    A. stale LoRA proxies: ``lora.ParamWrapper._activate_lora`` registers a ``_LoraFactorsProxy`` parametrization
       for the forward (one adapter on a 3-D parameter), but ``_remove_parametrizations`` only looks for a
       ``_LoraParameterProxy`` when another parametrization sits under it: every forward stacks one more proxy (the
       adapter applied twice, three times...; a forward with gradients fails: "only Tensors of floating point dtype
       can require gradients"), with the warning "Could not find any LoRA parametrization". Fix: each wrapper gets
       an instance-level ``_remove_parametrizations`` that removes either proxy class.
    B. the inner of two nested wrappers has no effect: with ``gate_up_proj`` and ``down_proj`` of one experts module
       adapted, the inner wrapper registers its proxy inside the outer one's ``parametrize.cached()``; torch's
       ``register_parametrization`` reads the parametrized tensor (without LoRA) and that cached value is what the
       experts' forward uses: the inner adapter gets no gradient. Fix: a forward pre-hook on the experts module drops
       its cache entries once every proxy is in place.
    """
    import peft
    from packaging.version import Version

    if Version(peft.__version__) > Version(PARAM_WRAPPER_BUGS_UNTIL):
        return 0
    import types

    import torch.nn.utils.parametrize as parametrize
    from peft.tuners.lora.layer import ParamWrapper, _LoraFactorsProxy, _LoraParameterProxy

    def remove_lora_proxy(wrapper):  # PEFT's _remove_parametrizations, both proxy classes recognised
        base = wrapper.get_base_layer()
        chain = base.parametrizations[wrapper.parameter_name]
        if len(chain) == 1:
            parametrize.remove_parametrizations(base, wrapper.parameter_name, leave_parametrized=False)
            return
        for index in reversed(range(len(chain))):
            if isinstance(chain[index], (_LoraParameterProxy, _LoraFactorsProxy)):
                del chain[index]
                return

    def drop_cached_values(module, args):
        for key in [key for key in parametrize._cache if key[0] == id(module)]:
            del parametrize._cache[key]

    hooked, bases = 0, {}
    for module in peft_model.modules():
        if isinstance(module, ParamWrapper) and not getattr(module, "_qadapt_repaired", False):
            base = module.get_base_layer()
            if not parametrize.is_parametrized(base):
                continue  # a plain fused parameter: PEFT's own path is right
            module._remove_parametrizations = types.MethodType(remove_lora_proxy, module)
            module._qadapt_repaired = True
            bases[id(base)] = base
            hooked += 1
    for base in bases.values():
        if not getattr(base, "_qadapt_cache_hook", False):
            base.register_forward_pre_hook(drop_cached_values)
            base._qadapt_cache_hook = True
    return hooked
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
