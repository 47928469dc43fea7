"""The orchestrator: load -> attach -> (train) -> merge -> save. Every request is checked against the backend's
capability table before any heavy work, and refused with one :class:`qadapt.QadaptError`."""

from __future__ import annotations

import os
from typing import Any

from . import adapters, checkpoint, inputs, progress, proxy, quiet, scope
from .capabilities import MERGE_STRATEGIES, METHODS
from .errors import ArchitectureError, CheckpointError, IncompatibleError, InvalidOptionError, QadaptError
from .merging import MergeReport, engine
from .hf import checkpoint_shape
from .plugins import backend_of, quiet_libraries, ready_backend
from .record import Record, base_model, get_record, set_record
from .rollback import restored_on_failure
from .training import prepare  # noqa: F401  (qadapt.prepare: the training switch, documented there)

quiet_libraries()  # the known harmless messages of the backend libraries (QADAPT_VERBOSE=1 shows them)


# ---------------------------------------------------------------------------------------------------------- load
def load(model: Any, backend: str | None = None, *, calibration: Any = None, tokenizer: Any = None,
         allow_unquantized=(), **options):
    """Load or quantize a causal LM with ``backend``; or restore a folder written by :func:`save`.

    :param model: a ``PreTrainedModel`` in full precision, a path to a transformers folder (full precision, or already
        quantized in ``backend``'s format), or a folder written by :func:`qadapt.save` (then leave ``backend`` out).
    :param backend: the backend's name (``qadapt backends`` lists them).
    :param calibration: for backends that need it: a list of texts (with ``tokenizer``) or of token-id tensors.
    :param allow_unquantized: matmul weights (full names, name suffixes or ``fnmatch`` patterns) that may stay in full
        precision although the backend's scope includes them. Without it, a load that would leave such a weight
        unquantized (a layer kind or shape the backend cannot take) is refused before any work, naming the layers.
    :param options: the backend's options (``qadapt backends --json`` lists them), checked before any work.

    What the load did (every matmul weight, quantized or kept in full precision and why, bits per weight) is logged
    once at INFO on the ``qadapt`` logger and returned by :func:`load_report`.

    Backends built on transformers' loaders (bnb, torchao, gptq, awq) quantize a copy; backends that replace layers
    one by one (hqq, inc, aqlm, eetq) convert an in-memory model in place. Pass a path to keep the original.
    """
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    inputs.check_model_argument(model)
    if isinstance(model, str):
        checkpoint.recover_for_load(model)  # a killed overwrite may have left the old checkpoint as its backup
    if isinstance(model, str) and checkpoint.is_checkpoint(model):
        if backend is not None or options:
            raise InvalidOptionError(
                f"load {model!r} with backend={backend!r}",
                "this is a qadapt checkpoint: it records its own backend and options",
                "Call qadapt.load(path) alone",
            )
        with progress.step(f"load checkpoint {model!r}", heartbeat=True):
            return checkpoint.load(model)
    if backend is None:
        if isinstance(model, str) and checkpoint.looks_like_checkpoint(model):
            raise CheckpointError(f"load {model!r}", f"{checkpoint.MANIFEST} is missing",
                                  "Point at a folder written by qadapt.save")
        raise InvalidOptionError(
            "load without a backend",
            "qadapt needs to know how to quantize the model",
            "Pass backend=... (run `qadapt backends` for the list), or a folder written by qadapt.save",
        )
    if not isinstance(backend, str):
        raise InvalidOptionError(f"load with backend={backend!r}", "a backend is named by a string",
                                 "Pass backend='name' (run `qadapt backends` for the list)")
    quant = ready_backend(backend, f"load with backend '{backend}'")
    resolved = quant.validate_options(options)
    allow = _patterns(allow_unquantized)
    if isinstance(model, str) and not os.path.isdir(model):
        raise InvalidOptionError(
            f"load {model!r}", "no such folder (qadapt never downloads models)", "Pass a local folder or a PreTrainedModel"
        )
    if isinstance(model, str):
        inputs.check_model_folder(model)
    else:
        inputs.refuse_converted(model, quant)
    prequantized = isinstance(model, str) and quant.is_quantized_checkpoint(model)
    kept = None
    if not prequantized:
        kept = scope.check_before(model if not isinstance(model, str) else checkpoint_shape(model), quant, resolved,
                                  allow, f"load with backend '{backend}'")
    if prequantized:
        with progress.step(f"load {model!r} with {backend}", heartbeat=True):
            loaded = quant.load(model, resolved)
    else:
        batches = inputs.calibration_batches(calibration, tokenizer, inputs.vocab_size_of(model))
        if quant.needs_calibration(resolved) and not batches:
            raise InvalidOptionError(
                f"quantize with backend '{backend}'",
                f"'{backend}' needs calibration data",
                "Pass calibration=[texts...] with tokenizer=..., or a list of token-id tensors",
            )
        with progress.step(f"quantize with {backend}" + (" (calibrating)" if batches else ""), heartbeat=True):
            loaded = quant.quantize(model, resolved, calibration=batches)
    inputs.check_loaded(loaded, quant)
    report = scope.report(loaded, quant, resolved, kept=kept, allow=allow, from_checkpoint=prequantized,
                          asked=f"load with backend '{backend}'")
    set_record(loaded, Record(backend=backend, options=resolved, library_version=quant.library_version(),
                              allow_unquantized=allow))
    scope.record_report(loaded, report)
    return loaded


def load_report(model):
    """What :func:`load` did with ``model``'s matmul weights: a :class:`qadapt.inventory.LoadReport` (``print`` it;
    ``.weights`` lists every one, ``.bits_per_weight``), or None for a model qadapt did not load."""
    return get_record(model).load_report


def _patterns(allow) -> tuple:
    if isinstance(allow, str):
        allow = (allow,)
    if not isinstance(allow, (list, tuple, set, frozenset)) or not all(isinstance(item, str) for item in allow):
        raise InvalidOptionError(f"allow_unquantized={allow!r}", "expected a list of names or patterns",
                                 "Pass e.g. allow_unquantized=['shared_expert_gate', '*.c_attn']")
    return tuple(allow)


# ---------------------------------------------------------------------------------------------------------- attach
def attach(model, method: str = "lora", *, target_modules: Any = "all-linear", adapter_name: str = "default", **options):
    """Attach a PEFT adapter; returns a standard ``peft.PeftModel`` whose only trainable weights are the adapter's.

    :param method: ``"lora"``, ``"dora"``, ``"vera"``, ``"adalora"`` or ``"ia3"``.
    :param target_modules: ``"all-linear"`` (every linear, Conv1D or quantized layer but the output head and MoE
        routers, and with LoRA the fused 3-D expert parameters of MoE models too), or PEFT's forms.
    :param options: the PEFT config's options (``r``, ``lora_alpha``, ``total_step`` for AdaLoRA, ...).
    """
    import peft
    import torch

    if not isinstance(method, str) or method not in METHODS:
        raise InvalidOptionError(f"attach {method!r}", "unknown adapter method", f"Choose one of {', '.join(METHODS)}")
    if isinstance(model, peft.PeftModel):
        raise InvalidOptionError(
            f"attach {method!r}", "the model already has an adapter", "Attach to the base model, or use PEFT's add_adapter"
        )
    if not isinstance(model, torch.nn.Module):
        raise InvalidOptionError(f"attach {method!r} to {type(model).__name__}", "expected a model",
                                 "Pass a model from qadapt.load, or any transformers model")
    checkpoint.check_adapter_name(adapter_name, f"attach {method!r}")
    record = get_record(model)
    if record.merge is not None or record.method is not None:
        raise InvalidOptionError(f"attach {method!r}", "the model already has a qadapt adapter",
                                 "Attach to the base model")
    backend = backend_of(record)
    support = backend.peft_compatible(method, record.options)
    if not support:
        raise IncompatibleError(_on(f"attach {method!r}", record), support.reason, support.hint)
    targets = adapters.target_names(model, backend, target_modules)
    matched = inputs.check_target_modules(model, targets, method)
    inputs.check_adapter_options(method, options, inputs.widest_layer(model, matched))
    parameters = adapters.target_parameters(model) if target_modules == "all-linear" else ()
    if parameters and method != "lora":
        raise ArchitectureError(
            _on(f"attach {method!r} with target_modules='all-linear'", record),
            f"this model's MoE experts are fused 3-D parameters ({parameters[0]}, ...), which PEFT adapts with LoRA "
            "only (lora.ParamWrapper)",
            "Use method='lora', or name target_modules=[...] to adapt the other layers only",
        )
    config = adapters.peft_config(method, targets, model, options, parameters=parameters)
    adapters.register_custom_layers(config, backend)
    rewrites_weights = isinstance(getattr(config, "init_lora_weights", None), str) \
        and config.init_lora_weights != "gaussian"
    try:
        with restored_on_failure(model, copy_tensors=rewrites_weights):
            if method in backend.proxy_methods:
                proxy.wrap(model, adapters.proxy_targets(model, targets), backend)
            with adapters.fast_dispatch(backend), adapters.explicit_targets(), quiet.known_warnings():
                peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
            adapters.repair_parameter_wrappers(peft_model)
            adapters.freeze_constants(peft_model)
    except QadaptError:
        raise
    except Exception as exc:
        raise InvalidOptionError(f"attach {method!r}", f"PEFT refused it ({type(exc).__name__}: {exc}); the model is "
                                 "unchanged", "Fix the adapter options") from exc
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
    inputs.check_choice(strategy, MERGE_STRATEGIES, f"merge strategy {strategy!r}", "strategy")
    inputs.check_max_error(max_error)
    if record.method is None:
        raise InvalidOptionError("merge", "the model has no adapter attached by qadapt", "Call qadapt.attach first")
    if record.merge is not None:
        raise InvalidOptionError("merge", "the adapter is already merged", "Call qadapt.unmerge(model) first")
    backend = backend_of(record)
    support = backend.can_merge(record.method, record.options, strategy)
    if not support:
        raise IncompatibleError(_on(f"merge {record.method!r} with strategy={strategy!r}", record), support.reason, support.hint)
    if policy is not None and (strategy != "requantize" or not isinstance(policy, str)
                               or policy not in backend.requantize_policies):
        where = f"backend '{record.backend}'" if record.backend else "a full-precision model"
        if strategy != "requantize":
            reason = "policies apply to strategy='requantize'"
        elif backend.requantize_policies:
            reason = f"{where} offers the policies {', '.join(backend.requantize_policies)}"
        else:
            reason = f"{where} offers no re-quantization policy"
        raise InvalidOptionError(f"merge with policy={policy!r}", reason, "Leave policy out")
    if calibration is not None:
        calibration = inputs.token_ids(calibration, inputs.vocab_size_of(base_model(model)), "merge with calibration=...")
    report = engine.merge(model, record, backend, strategy, max_error=max_error, calibration=calibration, policy=policy)
    engine.guard_training(base_model(model), record.merge)
    return report


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
    engine.unguard_training(record.merge)
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
    import peft
    import torch

    if not isinstance(model, torch.nn.Module) or isinstance(model, peft.PeftModel):
        raise InvalidOptionError(f"load adapter {path!r} onto {type(model).__name__}", "expected a base model without "
                                 "an adapter", "Pass the model qadapt.load returned")
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise CheckpointError(f"load adapter {path!r}", "no such folder", "Pass the adapter/ folder of a checkpoint")
    return checkpoint.load_adapter(model, os.fspath(path), strict=strict, is_trainable=is_trainable)


__all__ = ["load", "attach", "prepare", "merge", "unmerge", "save", "load_adapter", "load_report", "QadaptError"]
