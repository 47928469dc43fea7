"""The orchestrator: load -> attach -> (train) -> merge -> save. Every request is checked against the backend's
capability table before any heavy work, and refused with one :class:`qadapt.QadaptError`."""

from __future__ import annotations

import os
from typing import Any

from . import adapters, checkpoint, placement, progress, proxy, quiet
from .capabilities import MERGE_STRATEGIES, METHODS
from .errors import IncompatibleError, InvalidOptionError, QadaptError
from .merging import MergeReport, engine
from .plugins import backend_of, quiet_libraries, ready_backend
from .record import Record, base_model, get_record, set_record

quiet_libraries()  # the known harmless messages of the backend libraries (QADAPT_VERBOSE=1 shows them)


# ---------------------------------------------------------------------------------------------------------- load
def load(model: Any, backend: str | None = None, *, calibration: Any = None, tokenizer: Any = None,
         device_map: Any = None, max_memory: Any = None, cpu_offload: bool = False, **options):
    """Load or quantize a causal LM with ``backend``; or restore a folder written by :func:`save`.

    :param model: a ``PreTrainedModel`` in full precision, a path to a transformers folder (full precision, or already
        quantized in ``backend``'s format), or a folder written by :func:`qadapt.save` (then leave ``backend`` out).
    :param backend: the backend's name (``qadapt backends`` lists them).
    :param calibration: for backends that need it: a list of texts (with ``tokenizer``) or of token-id tensors.
    :param options: the backend's options (``qadapt backends --json`` lists them), checked before any work.
    :param device_map: transformers' ``device_map`` (``"auto"``, ``"cuda:1"``, or module -> device), for backends
        that honour it (:meth:`~qadapt.QuantBackend.placement`); refused with the reason by the others. Default: the
        whole model on this process's GPU (``cuda:LOCAL_RANK`` under a launcher), else the CPU.
    :param max_memory: transformers' ``max_memory`` per device (implies ``device_map="auto"``).
    :param cpu_offload: let the map put modules on the CPU, where they stay in full precision (bitsandbytes'
        ``llm_int8_enable_fp32_cpu_offload``); :func:`qadapt.placement.placement_of` lists them.

    Backends built on transformers' loaders (bnb, torchao, gptq, awq) quantize a copy; backends that replace layers
    one by one (hqq, inc, aqlm, eetq) convert an in-memory model in place. Pass a path to keep the original.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if isinstance(model, str) and checkpoint.is_checkpoint(model):
        if backend is not None or options or device_map is not None or max_memory is not None or cpu_offload:
            raise InvalidOptionError(
                f"load {model!r} with backend={backend!r}",
                "this is a qadapt checkpoint: it records its own backend and options",
                "Call qadapt.load(path) alone",
            )
        with progress.step(f"load checkpoint {model!r}", heartbeat=True):
            return checkpoint.load(model)
    if backend is None:
        raise InvalidOptionError(
            "load without a backend",
            "qadapt needs to know how to quantize the model",
            "Pass backend=... (run `qadapt backends` for the list), or a folder written by qadapt.save",
        )
    quant = ready_backend(backend, f"load with backend '{backend}'")
    resolved = quant.validate_options(options)
    asked = f"load with backend '{backend}'"
    where = placement.check(quant, resolved, asked, device_map=device_map, max_memory=max_memory,
                            cpu_offload=cpu_offload)
    if isinstance(model, str) and not os.path.isdir(model):
        raise InvalidOptionError(
            f"load {model!r}", "no such folder (qadapt never downloads models)", "Pass a local folder or a PreTrainedModel"
        )
    with placement.applied(where, asked):
        if isinstance(model, str) and quant.is_quantized_checkpoint(model):
            with progress.step(f"load {model!r} with {backend}", heartbeat=True):
                loaded = quant.load(model, resolved)
        else:
            batches = _calibration_batches(calibration, tokenizer)
            if quant.needs_calibration(resolved) and not batches:
                raise InvalidOptionError(
                    f"quantize with backend '{backend}'",
                    f"'{backend}' needs calibration data",
                    "Pass calibration=[texts...] with tokenizer=..., or a list of token-id tensors",
                )
            with progress.step(f"quantize with {backend}" + (" (calibrating)" if batches else ""), heartbeat=True):
                loaded = quant.quantize(model, resolved, calibration=batches)
    placed = placement.verify(loaded, quant, where, asked)
    set_record(loaded, Record(backend=backend, options=resolved, library_version=quant.library_version(),
                              source=os.path.abspath(model) if isinstance(model, str) else None, placement=placed))
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
        proxy.wrap(model, adapters.proxy_targets(model, targets), backend)
    with adapters.fast_dispatch(backend), quiet.known_warnings():
        peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    adapters.freeze_constants(peft_model)
    record.method, record.adapter_name = method, adapter_name
    return peft_model


def _on(action: str, record: Record) -> str:
    return f"{action} on backend '{record.backend}'" if record.backend else f"{action} on a full-precision model"


# ---------------------------------------------------------------------------------------------------------- merge
def merge(model, strategy: str = "requantize", *, max_error: float | None = None, calibration=None,
          policy: str | None = None) -> MergeReport:
    """Fold the adapter into the weights, measure the result, and keep what is needed to undo it exactly.

    :param strategy: ``"requantize"`` (same backend, same options) or ``"dequantize"`` (a full-precision model).
    :param max_error: refuse (and change nothing) if the merged model's relative output error on the calibration
        batch, against the unmerged adapter model, is above this.
    :param calibration: token ids to measure on (default: a fixed random batch). Real text here also lets backends
        that support it round the merged weights with the layers' input statistics (GPTQ-style).
    :param policy: how to re-quantize, for backends that offer a choice (bnb, hqq, torchao): ``"fresh"`` (quantize the
        merged weight afresh, as PEFT does), ``"grid"`` (keep the original scales), ``"best"`` (per block, the closest
        of those). Default: qadapt tries ``"fresh"`` and ``"best"`` (``"best"`` with input statistics when
        ``calibration`` is given) and keeps the one with the lower output error on the calibration batch, so it is
        never worse there than PEFT's own merge.
    :return: a :class:`qadapt.merging.MergeReport`.
    """
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
    if policy is not None and (strategy != "requantize" or policy not in backend.requantize_policies):
        if strategy != "requantize":
            reason = "policies apply to strategy='requantize'"
        elif backend.requantize_policies:
            reason = f"backend '{record.backend}' offers the policies {', '.join(backend.requantize_policies)}"
        else:
            reason = f"backend '{record.backend}' offers no re-quantization policy"
        raise InvalidOptionError(f"merge with policy={policy!r}", reason, "Leave policy out")
    return engine.merge(model, record, backend, strategy, max_error=max_error, calibration=calibration, policy=policy)


def unmerge(model) -> None:
    """Undo :func:`merge`: the original quantized modules go back, bit for bit, and the adapter is active again."""
    record = get_record(model)
    if record.merge is None and record.merged_when_saved:
        merged = record.merged_when_saved
        raise InvalidOptionError(
            "unmerge", f"this model was loaded from a checkpoint saved after a {merged.get('strategy')!r} merge of its "
            f"{merged.get('method')!r} adapter: the adapter is part of its weights and the original quantized weights "
            "are not in the checkpoint", "Load the checkpoint saved before the merge (with its adapter) to unmerge")
    if record.merge is None:
        raise InvalidOptionError("unmerge", "the adapter is not merged", "Nothing to do")
    engine.restore(base_model(model), record.merge)
    record.merge = None


# ---------------------------------------------------------------------------------------------------------- save
def save(model, path, *, overwrite: bool = False) -> str:
    """Save the quantized base, the adapter (unless merged into the base) and ``qadapt.json``: backend, library
    version, options, adapter method, merge report, and a checksum of every file. Written to a temporary folder and
    renamed into place; an existing non-empty ``path`` is refused unless ``overwrite=True``."""
    with progress.step(f"save to {os.fspath(path)!r}", heartbeat=True):
        return checkpoint.save(model, os.fspath(path), overwrite=overwrite)


def load_adapter(model, path, *, strict: bool = True, is_trainable: bool = False):
    """Load an adapter saved by :func:`save` onto ``model``; refuse (``strict``) or warn if ``model`` was quantized
    differently from the base the adapter was trained on."""
    return checkpoint.load_adapter(model, os.fspath(path), strict=strict, is_trainable=is_trainable)


__all__ = ["load", "attach", "merge", "unmerge", "save", "load_adapter", "QadaptError"]
