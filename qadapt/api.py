"""The orchestrator: load -> attach -> (train) -> merge -> save. Every request is checked against the backend's
capability table before any heavy work, and refused with one :class:`qadapt.QadaptError`."""

from __future__ import annotations

import os
from typing import Any

from . import adapters, checkpoint, merging, proxy
from .capabilities import MERGE_STRATEGIES, METHODS
from .errors import BackendUnavailableError, IncompatibleError, InvalidOptionError, MergeRefusedError, QadaptError
from .plugins import get_backend
from .record import Record, base_model, get_record, set_record
from .unquantized import UNQUANTIZED


def backend_of(record: Record):
    return UNQUANTIZED if record.backend is None else get_backend(record.backend)


def _ready_backend(name: str, asked: str):
    backend = get_backend(name)
    env = backend.check_environment()
    if not env.ok:
        raise BackendUnavailableError(asked, f"backend '{name}' is installed but cannot run: {env.reason}", env.hint)
    return backend


# ---------------------------------------------------------------------------------------------------------- load
def load(model: Any, backend: str | None = None, *, calibration: Any = None, tokenizer: Any = None, **options):
    """Load or quantize a causal LM with ``backend``; or restore a folder written by :func:`save`.

    :param model: a ``PreTrainedModel`` in full precision, a path to a transformers folder (full precision, or already
        quantized in ``backend``'s format), or a folder written by :func:`qadapt.save` (then leave ``backend`` out).
    :param backend: the backend's name (``qadapt backends`` lists them).
    :param calibration: for backends that need it: a list of texts (with ``tokenizer``) or of token-id tensors.
    :param options: the backend's options (``qadapt backends --json`` lists them), checked before any work.

    Backends built on transformers' loaders (bnb, torchao, gptq, awq) quantize a copy; backends that replace layers
    one by one (hqq, inc, aqlm, eetq) convert an in-memory model in place. Pass a path to keep the original.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if isinstance(model, str) and checkpoint.is_checkpoint(model):
        if backend is not None or options:
            raise InvalidOptionError(
                f"load {model!r} with backend={backend!r}",
                "this is a qadapt checkpoint: it records its own backend and options",
                "Call qadapt.load(path) alone",
            )
        return checkpoint.load(model)
    if backend is None:
        raise InvalidOptionError(
            "load without a backend",
            "qadapt needs to know how to quantize the model",
            "Pass backend=... (run `qadapt backends` for the list), or a folder written by qadapt.save",
        )
    quant = _ready_backend(backend, f"load with backend '{backend}'")
    resolved = quant.validate_options(options)
    if isinstance(model, str) and not os.path.isdir(model):
        raise InvalidOptionError(
            f"load {model!r}", "no such folder (qadapt never downloads models)", "Pass a local folder or a PreTrainedModel"
        )
    if isinstance(model, str) and quant.is_quantized_checkpoint(model):
        loaded = quant.load(model, resolved)
    else:
        batches = _calibration_batches(calibration, tokenizer)
        if quant.needs_calibration(resolved) and not batches:
            raise InvalidOptionError(
                f"quantize with backend '{backend}'",
                f"'{backend}' needs calibration data",
                "Pass calibration=[texts...] with tokenizer=..., or a list of token-id tensors",
            )
        loaded = quant.quantize(model, resolved, calibration=batches)
    set_record(loaded, Record(backend=backend, options=resolved, library_version=quant.library_version()))
    return loaded


def _calibration_batches(calibration, tokenizer):
    if calibration is None:
        return None
    import torch

    batches = []
    for item in calibration:
        if isinstance(item, str):
            if tokenizer is None:
                raise InvalidOptionError("calibration texts", "texts need a tokenizer", "Pass tokenizer=...")
            batches.append(tokenizer(item, return_tensors="pt").input_ids)
        else:
            tensor = torch.as_tensor(item, dtype=torch.long)
            batches.append(tensor if tensor.dim() == 2 else tensor.unsqueeze(0))
    return batches


# ---------------------------------------------------------------------------------------------------------- attach
def attach(model, method: str = "lora", *, target_modules: Any = "all-linear", adapter_name: str = "default", **options):
    """Attach a PEFT adapter; returns a standard ``peft.PeftModel`` whose only trainable weights are the adapter's.

    :param method: ``"lora"``, ``"dora"``, ``"vera"``, ``"adalora"`` or ``"ia3"``.
    :param target_modules: ``"all-linear"`` (every linear or quantized layer but the output head), or PEFT's forms.
    :param options: the PEFT config's options (``r``, ``lora_alpha``, ``total_step`` for AdaLoRA, ...).
    """
    import peft

    if method not in METHODS:
        raise InvalidOptionError(f"attach {method!r}", "unknown adapter method", f"Choose one of {', '.join(METHODS)}")
    if isinstance(model, peft.PeftModel):
        raise InvalidOptionError(
            f"attach {method!r}", "the model already has an adapter", "Attach to the base model, or use PEFT's add_adapter"
        )
    record = get_record(model)
    backend = backend_of(record)
    support = backend.peft_compatible(method, record.options)
    if not support:
        raise IncompatibleError(_on(f"attach {method!r}", record), support.reason, support.hint)
    targets = adapters.target_names(model, backend, target_modules)
    config = adapters.peft_config(method, targets, model, options)
    adapters.register_custom_layers(config, backend)
    if method in backend.proxy_methods:
        proxy.wrap(model, proxy_targets(model, targets), backend)
    with adapters.fast_dispatch(backend.name):
        peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    adapters.freeze_constants(peft_model)
    record.method, record.adapter_name = method, adapter_name
    return peft_model


def proxy_targets(model, targets) -> list[str]:
    """Full names of the modules that ``targets`` (full names, suffixes, or a regex string, as PEFT takes them) match."""
    import re

    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        return [name for name in names if re.fullmatch(targets, name)]
    return [name for name in names if any(name == t or name.endswith("." + t) for t in targets)]


def _on(action: str, record: Record) -> str:
    return f"{action} on backend '{record.backend}'" if record.backend else f"{action} on a full-precision model"


# ---------------------------------------------------------------------------------------------------------- merge
def merge(model, strategy: str = "requantize", *, max_error: float | None = None, calibration=None,
          policy: str | None = None) -> merging.MergeReport:
    """Fold the adapter into the weights, measure the result, and keep what is needed to undo it exactly.

    :param strategy: ``"requantize"`` (same backend, same options) or ``"dequantize"`` (a full-precision model).
    :param max_error: refuse (and change nothing) if the merged model's relative output error on the calibration
        batch, against the unmerged adapter model, is above this.
    :param calibration: token ids to measure on (default: a fixed random batch). Real text here also lets backends
        that support it round the merged weights with the layers' input statistics (GPTQ-style).
    :param policy: how to re-quantize, for backends that offer a choice (bnb, hqq, torchao): ``"fresh"`` (quantize the
        merged weight afresh, as PEFT does), ``"grid"`` (keep the original scales), ``"best"`` (per block, the closest
        of those). Default: qadapt tries ``"fresh"`` and ``"best"`` (with input statistics when ``calibration`` is
        given) and keeps the one with the lower output error on the calibration batch, so it is never worse there
        than PEFT's own merge.
    :return: a :class:`qadapt.merging.MergeReport`.
    """
    import inspect

    import torch

    record = get_record(model)
    if strategy not in MERGE_STRATEGIES:
        raise InvalidOptionError(f"merge strategy {strategy!r}", "unknown strategy", f"Choose one of {', '.join(MERGE_STRATEGIES)}")
    if record.method is None:
        raise InvalidOptionError("merge", "the model has no adapter attached by qadapt", "Call qadapt.attach first")
    if record.merge is not None:
        raise InvalidOptionError("merge", "the adapter is already merged", "Call qadapt.unmerge(model) first")
    backend = backend_of(record)
    support = backend.can_merge(record.method, record.options, strategy)
    if not support:
        raise IncompatibleError(_on(f"merge {record.method!r} with strategy={strategy!r}", record), support.reason, support.hint)
    takes = inspect.signature(backend.requantize).parameters
    if policy is not None and (strategy != "requantize" or "policy" not in takes):
        raise InvalidOptionError(f"merge with policy={policy!r}", f"backend '{record.backend}' offers no re-quantization policy"
                                 if strategy == "requantize" else "policies apply to strategy='requantize'",
                                 "Leave policy out")

    inner = base_model(model)
    batch = _measure_batch(inner, calibration)
    layers = _tuner_layers(inner, record.adapter_name)
    use_inputs = strategy == "requantize" and calibration is not None and "hessian" in takes and policy in (None, "best")
    with torch.no_grad():
        hessians = {}
        hooks = [layer.register_forward_pre_hook(_input_statistics(hessians, name)) for name, layer in layers] if use_inputs else []
        try:
            reference = model(input_ids=batch).logits
        finally:
            for handle in hooks:
                handle.remove()
        targets = []
        for name, layer in layers:
            base = proxy.unwrap(layer.get_base_layer())
            weight = backend.dequantize(base)
            new_weight, bias_scale = merging.merged_weight(layer, record.method, record.adapter_name, weight)
            targets.append((name, base, weight, new_weight, bias_scale))

        if strategy == "dequantize":
            candidates = {"exact": {}}
        elif "policy" not in takes:
            candidates = {"": {}}
        elif policy is not None:
            candidates = {policy: {"policy": policy}}
        else:
            candidates = {"fresh": {"policy": "fresh"}, "best": {"policy": "best"}}
            if use_inputs:
                candidates["best+inputs"] = {"policy": "best", "with_inputs": True}
        winner, errors = None, {}
        for label, how in candidates.items():
            swaps, stats = {}, []
            for name, base, weight, new_weight, bias_scale in targets:
                if strategy == "dequantize":
                    new_base = _full_precision(base, new_weight, inner)
                else:
                    kwargs = {"policy": how["policy"]} if "policy" in how else {}
                    if how.get("with_inputs"):
                        kwargs["hessian"] = hessians[name]
                    new_base = backend.requantize(base, new_weight, **kwargs)
                if bias_scale is not None and getattr(base, "bias", None) is not None:
                    new_base.bias = torch.nn.Parameter(base.bias.detach() * bias_scale.to(base.bias.dtype), requires_grad=False)
                delta = new_weight - weight
                stored = backend.dequantize(new_base) if strategy == "requantize" else new_weight
                kept_error, _ = merging.relative_error(stored - weight, delta) if delta.norm() > 0 else (0.0, 0.0)
                stats.append(merging.LayerMerge(name, delta.norm().item(), kept_error))
                # The whole tuner layer steps aside (kept, untouched, for unmerge): not every PEFT layer honours
                # its own "merged" flag (AdaLoRA's bitsandbytes layers add the adapter again).
                swaps[name] = new_base
            if strategy == "dequantize":
                for name, module in list(inner.named_modules()):
                    if backend.is_quantized_layer(module) and not any(name == n or name.startswith(n + ".") for n in swaps):
                        swaps[name] = _full_precision(module, backend.dequantize(module), inner)
            state = merging.MergeState(strategy=strategy, adapter_name=record.adapter_name)
            try:
                _apply(inner, state, swaps)
                merged = model(input_ids=batch).logits
            finally:
                _restore(inner, state)
            error, max_abs = merging.relative_error(merged, reference)
            errors[label] = error
            if winner is None or error < winner[1]:
                winner = (label, error, max_abs, swaps, stats)

    label, error, max_abs, swaps, stats = winner
    report = merging.MergeReport(record.backend or "none", record.method, strategy, error, max_abs, stats,
                                 policy=label, candidates=errors if len(errors) > 1 else {})
    if max_error is not None and error > max_error:
        raise MergeRefusedError(
            f"merge {record.method!r} with strategy={strategy!r}, max_error={max_error}",
            f"the merged model's output error is {error:.3g}, above max_error (nothing was changed)",
            "Use strategy='dequantize' for an exact merge, raise max_error, or keep the adapter separate",
        )
    state = merging.MergeState(strategy=strategy, adapter_name=record.adapter_name, report=report)
    _apply(inner, state, swaps)
    record.merge = state
    return report


def _input_statistics(sums: dict, name: str):
    """A forward pre-hook adding ``X^T X / n`` of a layer's inputs into ``sums[name]``."""

    def hook(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sums[name] = sums.get(name, 0) + x.T @ x / x.shape[0]

    return hook


def _apply(inner, state: merging.MergeState, swaps: dict) -> None:
    for name, module in swaps.items():
        state.originals[name] = inner.get_submodule(name)
        _set(inner, name, module)


def unmerge(model) -> None:
    """Undo :func:`merge`: the original quantized modules go back, bit for bit, and the adapter is active again."""
    record = get_record(model)
    if record.merge is None:
        raise InvalidOptionError("unmerge", "the adapter is not merged", "Nothing to do")
    _restore(base_model(model), record.merge)
    record.merge = None


def _restore(inner, state: merging.MergeState) -> None:
    for name, module in state.originals.items():
        _set(inner, name, module)
    state.originals = {}


def _tuner_layers(inner, adapter_name):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [
        (name, module)
        for name, module in inner.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "active_adapters", [])
    ]


def _full_precision(base, weight, inner):
    import torch

    dtype = _float_dtype(inner)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=getattr(base, "bias", None) is not None,
                             device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(base.bias.detach())
    linear.weight.requires_grad_(False)
    return linear


def _float_dtype(inner):
    import torch

    dtype = getattr(inner, "dtype", torch.float32)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _set(root, name, module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _measure_batch(inner, calibration):
    import torch

    device = next(inner.parameters()).device
    if calibration is not None:
        batch = torch.as_tensor(calibration, dtype=torch.long)
        return (batch if batch.dim() == 2 else batch.unsqueeze(0)).to(device)
    generator = torch.Generator().manual_seed(0)
    vocab = inner.config.vocab_size
    return torch.randint(0, vocab, (2, 32), generator=generator).to(device)


# ---------------------------------------------------------------------------------------------------------- save
def save(model, path, *, overwrite: bool = False) -> str:
    """Save the quantized base, the adapter (unless merged into the base) and ``qadapt.json``: backend, library
    version, options, adapter method, merge report, and a checksum of every file. Written to a temporary folder and
    renamed into place; an existing non-empty ``path`` is refused unless ``overwrite=True``."""
    return checkpoint.save(model, os.fspath(path), overwrite=overwrite)


def load_adapter(model, path, *, strict: bool = True, is_trainable: bool = False):
    """Load an adapter saved by :func:`save` onto ``model``; refuse (``strict``) or warn if ``model`` was quantized
    differently from the base the adapter was trained on."""
    return checkpoint.load_adapter(model, os.fspath(path), strict=strict, is_trainable=is_trainable)


__all__ = ["load", "attach", "merge", "unmerge", "save", "load_adapter", "QadaptError"]
