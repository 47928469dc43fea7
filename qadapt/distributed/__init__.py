"""Training with the quantized base sharded across processes by an existing engine: PyTorch FSDP2
(``torch.distributed.fsdp.fully_shard``) or DeepSpeed ZeRO-3, launched by ``torchrun``, ``accelerate launch`` or
``deepspeed``. qadapt does no distributed work of its own: it checks the capability table and the launch before any
work, chooses what lets the quantized layers survive (bitsandbytes: packed bytes stored in the model's dtype), proves
after sharding that they did (:func:`verify`), loads a model too large for one process straight into its shards
(:func:`load_sharded`), and writes the adapter once (:func:`save`). ``docs/distributed.md`` is the guide.

Importing this package imports no torch.
"""

from .launch import check_launch, init, one_process_group, world
from .loading import deterministic_lora_init, load_sharded
from .saving import save
from .sharding import last_report, shard, verify

__all__ = ["init", "check_launch", "world", "one_process_group", "shard", "verify", "last_report", "load_sharded",
           "deterministic_lora_init", "save"]
