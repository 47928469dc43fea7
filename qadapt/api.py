"""The orchestrator: load -> attach -> (train) -> merge -> save. Every request is checked against the backend's
capability table before any heavy work, and refused with one :class:`qadapt.QadaptError`."""

from __future__ import annotations

import os
from typing import Any

from . import adapters, checkpoint, folders, inputs, loftq as loftq_init, placement, progress, proxy, quiet, scope
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
         allow_unquantized=(), trainable: bool = False, device_map: Any = None, max_memory: Any = None,
         cpu_offload: bool = False, **options):
    """Load or quantize a causal LM with ``backend``; or restore a folder written by :func:`save`.

    :param model: a ``PreTrainedModel`` in full precision, a path to a transformers folder (full precision, or already
        quantized: then qadapt reads the backend and its options from the folder), or a folder written by
        :func:`qadapt.save` (then leave ``backend`` out).
    :param backend: the backend's name (``qadapt backends`` lists them). For an already-quantized folder it may be
        left out; one that differs from the folder's is refused.
    :param calibration: for backends that need it: a list of texts (with ``tokenizer``) or of token-id tensors.
    :param allow_unquantized: matmul weights (full names, name suffixes or ``fnmatch`` patterns) that may stay in full
        precision although the backend's scope includes them. Without it, a load that would leave such a weight
        unquantized (a layer kind or shape the backend cannot take) is refused before any work, naming the layers.
    :param trainable: for a folder written by :func:`save`: its adapters come back with the active one trainable, to
        train further (see README, "Resume training").
    :param device_map: transformers' ``device_map`` (``"auto"``, ``"cuda:1"``, or module -> device), for backends
        that honour it (:meth:`~qadapt.QuantBackend.placement`); refused with the reason by the others. Default: the
        whole model on this process's GPU (``cuda:LOCAL_RANK`` under a launcher), else the CPU.
    :param max_memory: transformers' ``max_memory`` per device (implies ``device_map="auto"``).
    :param cpu_offload: let the map put modules on the CPU, where they stay in full precision (bitsandbytes'
        ``llm_int8_enable_fp32_cpu_offload``); :func:`qadapt.placement.placement_of` lists them.
    :param options: the backend's options (``qadapt backends --json`` lists them), checked before any work. For an
        already-quantized folder or a checkpoint written by :func:`save`, the options it holds are read from it; only
        runtime options (a kernel, a compute dtype) may be chosen, and one that contradicts the folder is refused.
        So a trained checkpoint is served on a faster kernel with ``qadapt.load(path, kernel=...)``.

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
        if device_map is not None or max_memory is not None or cpu_offload:
            raise InvalidOptionError(
                f"load {model!r} with a placement (device_map, max_memory or cpu_offload)",
                "a qadapt checkpoint is loaded whole onto this process's device",
                "Call qadapt.load(path) without them, or load its base/ folder with them and then "
                "qadapt.load_adapter(model, path)",
            )
        with progress.step(f"load checkpoint {model!r}", heartbeat=True):
            return checkpoint.load(model, trainable=trainable, backend=backend, options=options)
    if trainable:
        raise InvalidOptionError("load with trainable=True", "trainable applies to a folder written by qadapt.save "
                                 "(it makes its adapter trainable)", "Attach an adapter with qadapt.attach")
    if backend is not None and not isinstance(backend, str):
        raise InvalidOptionError(f"load with backend={backend!r}", "a backend is named by a string",
                                 "Pass backend='name' (run `qadapt backends` for the list)")
    allow = _patterns(allow_unquantized)
    # a named backend that cannot run here is said first
    quant = ready_backend(backend, f"load with backend '{backend}'") if backend is not None else None
    if isinstance(model, str) and backend is None and checkpoint.looks_like_checkpoint(model):
        raise CheckpointError(f"load {model!r}", f"{checkpoint.MANIFEST} is missing",
                              "Point at a folder written by qadapt.save")
    if isinstance(model, str) and not os.path.isdir(model):
        raise InvalidOptionError(
            f"load {model!r}", "no such folder (qadapt never downloads models)", "Pass a local folder or a PreTrainedModel"
        )
    if isinstance(model, str):
        inputs.check_model_folder(model)
    claim = folders.detect(model, backend) if isinstance(model, str) else None
    kept = None
    if claim is not None:
        resolved = folders.resolve(model, claim, backend, options)
        backend = claim.backend.name
        quant = ready_backend(backend, f"load {model!r} with backend '{backend}'")
    else:
        if isinstance(model, str):
            inputs.check_folder_weights(model)
        if backend is None:
            raise InvalidOptionError(
                "load without a backend",
                "qadapt needs to know how to quantize the model" + (" (no backend reads this folder's weights as "
                                                                      "quantized: they are full precision)"
                                                                      if isinstance(model, str) else ""),
                "Pass backend=... (run `qadapt backends` for the list), or a folder written by qadapt.save",
            )
        resolved = quant.validate_options(options)
        if not isinstance(model, str):
            inputs.refuse_converted(model, quant)
        kept = scope.check_before(model if not isinstance(model, str) else checkpoint_shape(model), quant, resolved,
                                  allow, f"load with backend '{backend}'")
    asked = f"load with backend '{backend}'"
    where = placement.check(quant, resolved, asked, device_map=device_map, max_memory=max_memory,
                            cpu_offload=cpu_offload)
    with placement.applied(where, asked):
        if claim is not None:
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
    placed = placement.verify(loaded, quant, where, asked)
    if placed and placed["on_cpu"] and kept is not None:  # asked for with cpu_offload=True (verify refuses it otherwise)
        from .inventory import by_design

        offloaded = by_design("mapped to the CPU with cpu_offload=True, where the backend keeps it in full precision")
        kept = {**kept, **{name: offloaded for name in placed["not_quantized"]
                           if any(name == cpu or name.startswith(cpu + ".") for cpu in placed["on_cpu"])}}
    report = scope.report(loaded, quant, resolved, kept=kept, allow=allow, from_checkpoint=claim is not None,
                          asked=asked)
    set_record(loaded, Record(backend=backend, options=resolved, library_version=quant.library_version(),
                              allow_unquantized=allow, placement=placed,
                              source=os.path.abspath(model) if isinstance(model, str) else None))
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
        ``init_lora_weights="loftq"`` on a quantized base starts LoRA at the best rank-r approximation of each layer's
        quantization error (where the backend offers it: bitsandbytes 4-bit NF4, on CUDA, quantized from a
        full-precision folder; refused elsewhere, before any change).
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
    loftq = record.backend is not None and options.get("init_lora_weights") == "loftq"
    if loftq:
        source = loftq_init.check(_on(f"attach {method!r} with init_lora_weights='loftq'", record), method, record,
                                  backend, options)
        options = {key: value for key, value in options.items() if key != "init_lora_weights"}
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
    rewrites_weights = loftq or (isinstance(getattr(config, "init_lora_weights", None), str)
                                 and config.init_lora_weights != "gaussian")
    try:
        with restored_on_failure(model, copy_tensors=rewrites_weights):
            if method in backend.proxy_methods:
                proxy.wrap(model, adapters.proxy_targets(model, targets), backend)
            with adapters.fast_dispatch(backend), adapters.explicit_targets(), quiet.known_warnings():
                peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
            adapters.repair_parameter_wrappers(peft_model)
            adapters.freeze_constants(peft_model)
            if loftq:
                loftq_init.initialise(peft_model, source, adapter_name)
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
    if record.merge is not None:
        raise InvalidOptionError("merge", "the adapter is already merged", "Call qadapt.unmerge(model) first")
    on_model = adapters.attached(model)
    if not on_model:
        raise InvalidOptionError("merge", "the model carries no adapter", "Attach one with qadapt.attach first")
    # the active adapter, whoever attached it (qadapt, PEFT, TRL) and whatever set_adapter chose since
    record.adapter_name = adapters.active_name(model)
    record.method = on_model[record.adapter_name]
    others = sorted(set(on_model) - {record.adapter_name})
    if others:
        raise InvalidOptionError(
            f"merge adapter {record.adapter_name!r}", f"adapters {', '.join(map(repr, others))} are attached too: the "
            "merged layers would drop them from the model, and they were trained on the unmerged base",
            "Save the model first (qadapt.save keeps every adapter), then model.delete_adapter(name) for each other one",
        )
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
def save(model, path, *, overwrite: bool = False, tokenizer: Any = None) -> str:
    """Save the quantized base, every adapter (unless merged into the base) and ``qadapt.json``: backend, library
    version, options, adapters and which is active, merge report, and a checksum of every file. Adapters PEFT or TRL
    attached are saved like qadapt's own. ``base/`` also gets the ``tokenizer`` (or, where none is passed, the
    tokenizer files of the folder the model was loaded from) and ``generation_config.json``. Written to a temporary
    folder and renamed into place; an existing non-empty ``path`` is refused unless ``overwrite=True``."""
    with progress.step(f"save to {os.fspath(path)!r}", heartbeat=True):
        return checkpoint.save(model, os.fspath(path), overwrite=overwrite, tokenizer=tokenizer)


def load_adapter(model, path, *, strict: bool = True, is_trainable: bool = False, adapter_name: str | None = None):
    """Load an adapter onto ``model`` (a quantized base, or a ``PeftModel`` to add an adapter to).

    ``path``: an adapter saved by :func:`save` (``out/adapter``), the folder :func:`save` wrote (every adapter it
    holds, the active one active), a plain PEFT adapter folder (``save_pretrained``), or a Trainer/TRL
    ``checkpoint-N`` folder (its adapter only: optimizer and scheduler state are Trainer's, see README "Resume
    training"). Adapter weights are read from safetensors only. Where qadapt's provenance is present, an adapter
    trained on a base quantized differently is refused (``strict``) or warned about; without it, qadapt warns that it
    cannot check, and records that note with the adapter.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise InvalidOptionError(f"load adapter {path!r} onto {type(model).__name__}", "expected a model",
                                 "Pass the model qadapt.load returned, or a PeftModel to add the adapter to")
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        raise CheckpointError(f"load adapter {path!r}", "no such folder",
                              "Pass the adapter/ folder of a checkpoint, a PEFT adapter folder or a checkpoint-N folder")
    if adapter_name is not None:
        checkpoint.check_adapter_name(adapter_name, f"load adapter {path!r}")
    return checkpoint.load_adapter(model, os.fspath(path), strict=strict, is_trainable=is_trainable,
                                   adapter_name=adapter_name)


__all__ = ["load", "attach", "prepare", "merge", "unmerge", "save", "load_adapter", "load_report", "QadaptError"]
