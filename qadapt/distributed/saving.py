"""Saving from a sharded run: the adapter gathered and written once (rank 0), loadable by a one-process qadapt.load.

The base is not gathered: LoRA leaves it unchanged, so the checkpoint refers to the folder it was quantized from
(path and a checksum of every file, checked when it is loaded) instead of holding a copy of it. Gathering only the
trainable parameters (``ignore_frozen_params``) moves the adapter alone, never the quantized base, to rank 0.
"""

from __future__ import annotations

import os

from ..errors import CheckpointError, InvalidOptionError


def save(model, path, *, overwrite: bool = False) -> str:
    """Collective (every rank calls it). Gather the adapter of a sharded model and write, on rank 0 only, a qadapt
    checkpoint: ``adapter/`` + ``qadapt.json`` naming the base's source folder with its checksums. ``qadapt.load(path)``
    in one process quantizes that folder again (deterministic: the same codes) and puts the adapter on it. An existing
    non-empty ``path`` is refused unless ``overwrite=True``.

    A merge needs whole layers: merge after loading the saved folder in one process (``qadapt.merge``)."""
    import torch.distributed as dist

    from .._version import __version__
    from ..checkpoint import MANIFEST, PROVENANCE, FORMAT
    from ..checkpoint.files import SaveTarget, checksums, is_free, sizes, write_json
    from ..checkpoint.manifest import check_adapter_name
    from ..record import get_record
    from .launch import world

    path = os.fspath(path)
    inner = getattr(model, "module", model) if type(model).__name__ == "DeepSpeedEngine" else model
    record = get_record(inner)
    asked = f"save the sharded model to {path!r}"
    if record.sharded is None:
        raise InvalidOptionError(asked, "the model is not sharded by qadapt.distributed", "Use qadapt.save")
    if record.method is None:
        raise InvalidOptionError(asked, "the model has no adapter", "Attach and train one first")
    check_adapter_name(record.adapter_name, asked)
    # no "save" cell to consult: the base is not written (a backend whose base has no file format, torchao's NF4,
    # saves here too), and one-process loading quantizes the source folder again
    if record.source is None or not os.path.isdir(record.source):
        raise CheckpointError(asked, "the base was not loaded from a folder, and a sharded run does not gather it",
                              "Load the base with qadapt.load(folder, ...) or qadapt.distributed.load_sharded")
    if not is_free(path) and not overwrite:
        # checked on every rank before the collective gather (and again, under the claim, on rank 0)
        raise CheckpointError(asked, "the path exists and is not empty; qadapt does not overwrite files unasked",
                              "Choose a new folder, or pass overwrite=True")
    state = _gather_adapter(model, inner, record)
    rank, _ = world()
    if rank == 0:
        # claimed, staged and moved into place like qadapt.save (qadapt/checkpoint/files.py)
        with SaveTarget(path, asked) as target:
            if not is_free(target.path) and not overwrite:
                raise CheckpointError(asked, "the path exists and is not empty; qadapt does not overwrite files unasked",
                                      "Choose a new folder, or pass overwrite=True")
            staging = target.staging()
            adapter_dir = os.path.join(staging, "adapter")
            _write_adapter(inner, record, state, adapter_dir)
            write_json(os.path.join(adapter_dir, PROVENANCE), {"method": record.method, **record.describe()})
            write_json(os.path.join(staging, MANIFEST), {
                "format": FORMAT,
                "qadapt_version": __version__,
                "backend": {"name": record.backend, "library_version": record.library_version,
                            "options": record.options},
                "adapter": {"method": record.method, "name": record.adapter_name},
                "adapters": {record.adapter_name: {"method": record.method, "dir": "adapter"}},
                "merged": None,
                "base_source": {"path": record.source, "files": checksums(record.source),
                                "saved_by": f"a run sharded by {record.sharded}"},
                "files": checksums(staging),
                "sizes": sizes(staging),
            })
            target.commit(staging, overwrite)
    if dist.is_initialized():
        dist.barrier()
    return path


def _gather_adapter(model, inner, record) -> dict:
    """Collective: the adapter's full tensors on rank 0 (on the CPU), ``{}`` elsewhere."""
    from .launch import world

    rank, _ = world()
    if record.sharded == "zero3":
        import deepspeed

        full = {}
        for name, param in inner.named_parameters():
            if param.requires_grad:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if rank == 0:
                        full[name] = param.data.detach().to("cpu", copy=True)
        return full
    from torch.distributed.tensor import DTensor

    # each trainable parameter all-gathered in turn (the same order on every rank); not torch's get_model_state_dict,
    # which walks the whole state dict and fails on HQQLinear's (hqq 0.2.8 encodes meta entries it cannot getattr)
    full = {}
    for name, param in inner.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            if rank == 0:
                full[name] = whole.detach().to("cpu", copy=True)
    return full


def _write_adapter(inner, record, state, adapter_dir) -> None:
    """PEFT's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``), as ``save_pretrained``
    writes it."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(adapter_dir)
    config = inner.peft_config[record.adapter_name]
    config.save_pretrained(adapter_dir)
    adapter = get_peft_model_state_dict(inner, state_dict=state, adapter_name=record.adapter_name)
    save_file({k: v.contiguous() for k, v in adapter.items()}, os.path.join(adapter_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
