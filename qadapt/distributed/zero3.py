"""DeepSpeed ZeRO-3: ``deepspeed.initialize`` with stage 3, the quantized layers checked after partitioning.

ZeRO-3 keeps each parameter object and partitions its data into ``param.ds_tensor`` (seen with DeepSpeed 0.19.8 on
CPU, 2 gloo processes): bitsandbytes' ``Params4bit`` stays a ``Params4bit`` with its ``quant_state``, and the
losses equal one process's. DeepSpeed is not a dependency of qadapt (the `deepspeed` extra installs it).
"""

from __future__ import annotations

import importlib
import os

from ..errors import BackendUnavailableError, ShardingError

INSTALL = "pip install 'deepspeed>=0.16'  (the `deepspeed` extra of qadapt-lm)"


def available() -> str | None:
    """None where DeepSpeed imports, else why not."""
    try:
        importlib.import_module("deepspeed")
    except Exception as exc:  # an ImportError, or what a half-built install raises
        return f"deepspeed is not importable ({type(exc).__name__}: {exc})"
    return None


def config(user: dict | None) -> dict:
    """The user's DeepSpeed config with ZeRO stage 3 (another stage is refused) and the few keys DeepSpeed requires."""
    merged = dict(user or {})
    zero = dict(merged.get("zero_optimization") or {})
    if zero.setdefault("stage", 3) != 3:
        raise ShardingError(f"shard with engine='zero3' and zero_optimization.stage={zero['stage']}",
                            "ZeRO stages 1 and 2 do not partition the (quantized) parameters", "Use stage 3")
    # DeepSpeed 0.19's memory-efficient linear replaces torch.nn.functional.linear for the whole process and keeps it
    # after the engine is gone ("This will persist unless manually reset"): torchao's int8 layers then fail in every
    # later forward (NotImplementedError: Int8Tensor ... aten.t). Off unless asked for.
    zero.setdefault("memory_efficient_linear", False)
    merged["zero_optimization"] = zero
    if "train_batch_size" not in merged:
        merged.setdefault("train_micro_batch_size_per_gpu", 1)
    merged.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW on the adapter: what qadapt trains with
    merged.setdefault("steps_per_print", 2**31 - 1)
    return merged


def wrap(model, *, deepspeed_config=None, optimizer=None):
    """``deepspeed.initialize`` on the existing process group; returns DeepSpeed's engine (``engine(batch)``,
    ``engine.backward(loss)``, ``engine.step()``; ``engine.module`` is the model)."""
    reason = available()
    if reason:
        raise BackendUnavailableError("shard with engine='zero3'", reason, INSTALL)
    import deepspeed

    from .launch import world

    if "LOCAL_RANK" not in os.environ and world()[1] == 1:
        # DeepSpeed 0.19 reads LOCAL_RANK in every step; a world of one started by qd.init() has none (left set: the
        # engine needs it as long as it lives)
        os.environ["LOCAL_RANK"] = "0"
    parameters = None if optimizer is not None else [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=parameters,
                                           config=config(deepspeed_config), dist_init_required=False)
    return engine


def gathered_fingerprints(model, backend) -> dict[tuple[str, str], int]:
    """Collective. ``{(layer, parameter): fingerprint}`` of every quantized payload, gathered one layer at a time."""
    import deepspeed

    from .layers import fingerprint, quantized_layers

    found = {}
    for name, module in quantized_layers(model, backend).items():
        names = backend.sharded_parameters(module)
        params = [getattr(module, param_name) for param_name in names]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for param_name in names:
                found[(name, param_name)] = fingerprint(getattr(module, param_name).data)
    return found
