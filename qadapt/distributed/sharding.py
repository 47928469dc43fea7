"""``shard``: the capability table first, then the engine, then the proof that the quantized state survived."""

from __future__ import annotations

from typing import Any

from ..capabilities import ENGINES
from ..errors import BackendUnavailableError, IncompatibleError, InvalidOptionError, ShardingError
from ..plugins import backend_of
from ..record import get_record
from . import fsdp2, zero3
from .launch import check_launch, world
from .layers import ShardReport, check_layers, snapshot

REPORT = "_qadapt_shard_report"


def shard(model, engine: str = "fsdp2", *, mixed_precision: Any = None, offload: bool = False,
          reshard_after_forward: bool = True, mesh: Any = None, deepspeed_config: dict | None = None,
          optimizer: Any = None, check_payload: bool = True):
    """Shard a model qadapt loaded (with its adapter attached) across this run's processes with ``engine``, then
    verify that every quantized layer survived (:func:`verify`); refuse to go on otherwise.

    Checked before any work: the capability table's ``train_<engine>`` cell for the backend and adapter method, the
    launch (:func:`check_launch`), the backend's limits for this model and number of processes
    (:meth:`~qadapt.QuantBackend.sharding_problems`), that every tensor is on this rank's device, and for FSDP2 that
    ``mixed_precision`` would not cast packed bytes.

    :param engine: ``"fsdp2"`` (PyTorch ``fully_shard``: one unit per decoder layer, then the root; the model is
        changed in place and returned) or ``"zero3"`` (DeepSpeed ZeRO-3; returns DeepSpeed's engine, which trains
        with ``engine.backward(loss)`` and ``engine.step()``).
    :param mixed_precision: FSDP2's ``MixedPrecisionPolicy``; its ``param_dtype`` must be that of the packed bytes.
    :param offload: FSDP2's ``CPUOffloadPolicy`` (shards in host memory between uses; CUDA only).
    :param deepspeed_config: ZeRO-3: DeepSpeed's config dict (stage 3 is filled in; another stage is refused).
    :param optimizer: ZeRO-3: the optimizer DeepSpeed wraps (default: the one the config names).
    :param check_payload: also gather every unit once and compare the payload bytes the forward will see with those
        before sharding (bit for bit); a collective, one unit at a time.
    """
    if engine not in ENGINES:
        raise InvalidOptionError(f"shard with engine={engine!r}", "unknown engine", f"Choose one of {', '.join(ENGINES)}")
    record = get_record(model)
    backend = backend_of(record)
    asked = f"shard a {record.method!r} adapter with engine={engine!r}" + (
        f" on backend '{record.backend}'" if record.backend else " on a full-precision model")
    if record.method is None:
        raise InvalidOptionError(f"shard with engine={engine!r}", "the model has no adapter attached by qadapt",
                                 "Call qadapt.attach first: the engine shards the adapter together with the base")
    if record.sharded is not None:
        raise InvalidOptionError(asked, f"the model is sharded already (by {record.sharded})", "Shard it once")
    if record.merge is not None:
        raise InvalidOptionError(asked, "the adapter is merged", "Call qadapt.unmerge(model) first")
    support = backend.capabilities(record.options)[(record.method, ENGINES[engine])]
    if not support:
        raise IncompatibleError(asked, support.reason, support.hint)
    if engine == "zero3" and zero3.available():
        raise BackendUnavailableError(asked, zero3.available(), zero3.INSTALL)
    check_launch(asked)
    problems = backend.sharding_problems(model, record.options, engine, world()[1])
    if problems:
        raise ShardingError(asked, "; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4
                                                              else ""),
                            "Nothing was changed: do what the reason says, or use a backend that shards this model at "
                            "this size (`qadapt matrix` lists the sharded cells)")
    _check_devices(model, asked, offload)
    if engine == "fsdp2":
        fsdp2.check_mixed_precision(model, backend, mixed_precision)
    before = snapshot(model, backend, with_fingerprint=check_payload)
    if engine == "fsdp2":
        wrapped = fsdp2.wrap(model, mesh=mesh, mixed_precision=mixed_precision, offload=offload,
                             reshard_after_forward=reshard_after_forward)
    else:
        wrapped = zero3.wrap(model, deepspeed_config=deepspeed_config, optimizer=optimizer)
    record.sharded = engine
    verify(wrapped, before=before, check_payload=check_payload)
    return wrapped


def _check_devices(model, asked: str, offload: bool) -> None:
    import torch

    from ..hf import default_device

    if offload and not torch.cuda.is_available():
        raise InvalidOptionError(f"{asked} with offload=True", "offloading moves shards to host memory between uses: "
                                 "without a GPU they are there already", "Leave offload out on CPU")
    here = torch.device(default_device())
    elsewhere = sorted({str(t.device) for t in list(model.parameters()) + list(model.buffers())
                        if t.device.type != "meta" and (t.device.type, t.device.index or 0) != (here.type, here.index or 0)})
    if elsewhere:
        raise ShardingError(asked, f"parts of the model are on {', '.join(elsewhere)}, not on this rank's device "
                                   f"{here}", "Load the model in each process with qadapt.load (it places it on "
                                              "cuda:LOCAL_RANK) and without a device_map")


def verify(model, *, before=None, check_payload: bool = True) -> ShardReport:
    """Check, on every rank, that a sharded model's quantized layers survived sharding; raise
    :class:`~qadapt.errors.ShardingError` on every rank if any rank found a problem. Also for models sharded
    elsewhere (``accelerator.prepare``): a model each rank holds whole (accelerate's DDP fallback) is refused.

    :param before: what :func:`qadapt.distributed.layers.snapshot` recorded before sharding (``shard`` passes it):
        then the payloads' shapes, dtypes and bytes and the quantization state must also be unchanged, and with
        ``check_payload`` the gathered payload bytes bit for bit.
    :return: the :class:`~qadapt.distributed.layers.ShardReport` of this rank (bytes it holds, layers checked).
    """
    model = _unwrap_ddp(model)
    record = get_record(model)
    backend = backend_of(record)
    ddp = getattr(model, "_qadapt_ddp_wrapped", False)
    engine = record.sharded or _detect_engine(model, backend)
    report = check_layers(model, backend, engine, before)
    if engine == "fsdp2":
        report.problems.extend(fsdp2.cast_by_policy(model, backend))
    if ddp:
        report.problems.insert(0, "the model is wrapped in DistributedDataParallel: every rank holds all of it "
                                  "(accelerate 1.15 does so on CPU even with an FSDP config)")
    if check_payload and before and not report.problems:
        _compare_payloads(model, backend, engine, before, report)
    _agree(report)
    record.sharded = engine  # a model sharded elsewhere (accelerator.prepare) is now known sharded: qd.save takes it
    model.__dict__[REPORT] = report
    return report


def last_report(model) -> ShardReport | None:
    """What the last :func:`verify` of ``model`` found on this rank."""
    return _unwrap_ddp(model).__dict__.get(REPORT)


def _unwrap_ddp(model):
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        inner = model.module
        inner.__dict__["_qadapt_ddp_wrapped"] = True
        return inner
    return model


def _detect_engine(model, backend) -> str:
    from .layers import quantized_layers

    for module in quantized_layers(model, backend).values():
        for name in backend.sharded_parameters(module):
            if hasattr(getattr(module, name), "ds_tensor"):
                return "zero3"
    return "fsdp2"


def _compare_payloads(model, backend, engine, before, report) -> None:
    gathered = (fsdp2 if engine == "fsdp2" else zero3).gathered_fingerprints(model, backend)
    for name, layer in before.items():
        for param_name, was in layer.payload.items():
            if was.fingerprint is None:
                continue
            now = gathered.get((name, param_name))
            report.payload_checked += 1
            if now is None:
                report.problems.append(f"{name}.{param_name}: no FSDP unit gathered it")
            elif now != was.fingerprint:
                report.problems.append(f"{name}.{param_name}: the payload the forward sees differs from the one "
                                       "before sharding (the engine changed the packed bytes)")


def _agree(report: ShardReport) -> None:
    """Every rank refuses if one found a problem (a rank that went on alone would wait forever in a collective)."""
    import torch
    import torch.distributed as dist

    count = len(report.problems)
    if dist.is_available() and dist.is_initialized():
        from .launch import backend_name

        device = "cuda" if backend_name() == "nccl" else "cpu"
        total = torch.tensor([count], device=device)
        dist.all_reduce(total)
        count = int(total.item())
    if count:
        rank, size = world()
        mine = report.problems[:4] or [f"{count} problem(s) on other ranks"]
        raise ShardingError(f"train sharded with {report.engine} (rank {rank} of {size})",
                            "the quantized model did not survive sharding intact: " + "; ".join(mine),
                            "Nothing was trained. qadapt chooses what survives (bitsandbytes: storage in the model's "
                            "dtype); report this with the message if the model was loaded by qadapt.load")
