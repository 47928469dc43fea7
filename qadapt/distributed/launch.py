"""Is this process part of the run it was launched into? Refuse launches that would train silently apart."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from ..errors import ShardingError


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process's ``torch.distributed`` group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_launch(asked: str = "train sharded") -> None:
    """Refuse a launch whose processes would each train alone on the whole model, before any work.

    Seen with accelerate 1.15 on a machine without a GPU: ``accelerate launch`` with an FSDP config starts N
    processes (``WORLD_SIZE=N``) whose ``Accelerator()`` reports one process and no process group (accelerate selects
    FSDP only for GPU types, ``accelerate/state.py``), and ``Accelerator(cpu=True)`` falls back to DDP: N independent
    trainings, or N whole copies of the model, without an error.
    """
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    initialised = dist.is_available() and dist.is_initialized()
    if launched > 1 and not initialised:
        raise ShardingError(
            asked,
            f"this process was launched as one of {launched} (WORLD_SIZE={launched}) but torch.distributed is not "
            "initialised in it: each process would train alone on the whole model",
            "Call qadapt.distributed.init() (or torch.distributed.init_process_group()) first. Under `accelerate "
            "launch` without a GPU, accelerate 1.15 does not set up FSDP (it selects it only for GPUs)",
        )
    if initialised and "WORLD_SIZE" in os.environ and dist.get_world_size() != launched:
        raise ShardingError(asked, f"the launcher started {launched} processes but the process group has "
                                   f"{dist.get_world_size()}", "Initialise the process group from the launcher's "
                                                               "environment (init_method='env://')")
    _check_accelerate(asked, initialised)


def _check_accelerate(asked: str, initialised: bool) -> None:
    if "accelerate" not in sys.modules:
        return
    from accelerate.state import PartialState

    if not PartialState._shared_state:  # no Accelerator / PartialState was created: accelerate is not in charge
        return
    state = PartialState()
    processes = dist_world = state.num_processes
    if initialised:
        import torch.distributed as dist

        dist_world = dist.get_world_size()
    if processes != dist_world:
        raise ShardingError(asked, f"accelerate reports {processes} process(es) where torch.distributed has "
                                   f"{dist_world}: accelerate would have each process train alone (accelerate 1.15 "
                                   "with an FSDP config on a machine without a GPU)",
                            "Launch with torchrun and shard with qadapt.distributed.shard, keeping the model out of "
                            "accelerator.prepare; or run accelerate on GPUs")
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if wants_fsdp and processes > 1 and "FSDP" not in str(state.distributed_type):
        raise ShardingError(
            asked,
            f"accelerate was asked for FSDP (ACCELERATE_USE_FSDP) but runs as {state.distributed_type}: accelerate "
            "1.15 selects FSDP only on GPUs and otherwise wraps the model in DDP, a whole copy on every rank",
            "Shard with qadapt.distributed.shard(model) and keep the model out of accelerator.prepare, or run on GPUs",
        )


def backend_name() -> str:
    """The ``torch.distributed`` backend for this machine: NCCL on CUDA GPUs, gloo on CPUs."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init() -> tuple[int, int]:
    """Join the run this process was launched into (torchrun, accelerate launch, deepspeed: ``env://``), or start a
    world of one when it was not launched by one (``python script.py``: the same code path, one process). Puts this
    process on its GPU (``cuda:LOCAL_RANK``), checks the launch (:func:`check_launch`); returns ``(rank, world)``."""
    import torch
    import torch.distributed as dist

    from ..hf import default_device

    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend_name())
        else:
            # no LOCAL_RANK set here: transformers' Trainer would take this process for a launched one
            dist.init_process_group(backend_name(), store=dist.HashStore(), rank=0, world_size=1)
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device())
    check_launch("join the distributed run")
    return world()


@contextmanager
def one_process_group():
    """A process group of one for the duration of the block, unless one exists (then that one): how the conformance
    kit and the tests run the sharded code path in a single process."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    unset = "LOCAL_RANK" not in os.environ
    if unset:
        os.environ["LOCAL_RANK"] = "0"  # what a launcher sets; DeepSpeed 0.19 reads it in every step
    dist.init_process_group(backend_name(), store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        destroy_process_group()
        if unset:
            os.environ.pop("LOCAL_RANK", None)


def destroy_process_group() -> None:
    """End the process group through DeepSpeed where it wrapped it: DeepSpeed 0.19 caches groups
    (``deepspeed.utils.groups``) that a later group in the same process would otherwise find dead ("Group ... is not
    registered")."""
    import torch.distributed as dist

    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None and getattr(comm, "cdb", None) is not None and comm.cdb.is_initialized():
        comm.destroy_process_group()
    else:
        dist.destroy_process_group()
