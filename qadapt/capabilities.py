"""What works with what: support levels, each with a human reason.

A backend declares, for every adapter method x operation, whether qadapt supports it and why (not). The table is a
promise: ``tests/test_capabilities.py`` drives every declared combination and ``qadapt matrix --verify`` re-checks it
on the machine at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Adapter methods qadapt attaches (DoRA is LoRA with ``use_dora=True``).
METHODS = ("lora", "dora", "vera", "adalora", "ia3")

#: Operations on an attached adapter.
#: ``train``: attach, forward, backward, optimizer step. ``merge``: fold the adapter into the quantized weights and
#: re-quantize in the same format. ``merge_dequantized``: fold it into de-quantized, full-precision weights.
#: ``unmerge``: restore the exact original quantized tensors after a merge. ``save``: save and reload base + adapter.
#: ``train_fsdp2`` / ``train_zero3``: train with the quantized base sharded across processes by PyTorch FSDP2
#: (``fully_shard``) / DeepSpeed ZeRO-3, the quantized state verified after sharding (:mod:`qadapt.distributed`).
OPERATIONS = ("train", "merge", "merge_dequantized", "unmerge", "save", "train_fsdp2", "train_zero3")

#: the distributed engines qadapt drives (``qadapt.distributed.shard(model, engine=...)``) and their operations
ENGINES = {"fsdp2": "train_fsdp2", "zero3": "train_zero3"}

#: per engine, the adapter methods verified under it (losses equal to one process's; tests/test_distributed.py and
#: the conformance kit). PEFT's DoRA reads the base weight outside the layer's forward, where ZeRO-3 has not gathered
#: it (AttributeError: 'Params4bit' object has no attribute 'ds_status', DeepSpeed 0.19.8).
SHARDED_METHODS = {"fsdp2": ("lora", "dora"), "zero3": ("lora",)}

#: ``qadapt.merge(strategy=...)`` values and the operation each one needs.
MERGE_STRATEGIES = {"requantize": "merge", "dequantize": "merge_dequantized"}


@dataclass(frozen=True)
class Support:
    """One cell of the capability table: ``supported`` with a ``reason``, and a ``hint`` when it is not."""

    supported: bool
    reason: str = ""
    hint: str = ""

    def __bool__(self) -> bool:
        return self.supported

    @property
    def label(self) -> str:
        return "yes" if self.supported else "no"


def yes(reason: str = "") -> Support:
    return Support(True, reason)


def no(reason: str, hint: str = "") -> Support:
    return Support(False, reason, hint)


Table = dict  # {(method, operation): Support}


def declare(
    *,
    train: dict[str, Support],
    requantize: Support,
    dequantize: Support,
    save: Support,
    merge_overrides: dict[str, Support] | None = None,
    sharded: dict[str, Support] | None = None,
) -> Table:
    """Build a full table from the few facts that decide it.

    qadapt merges with its own arithmetic (de-quantize, add the adapter's weight change, re-quantize), so a merge needs
    only that the method trains on this backend and that the backend can de-quantize (and re-quantize) its layers.
    ``unmerge`` is exact wherever a merge is: qadapt keeps the original quantized modules.

    :param train: per method, whether PEFT attaches and trains it on this backend's layers.
    :param requantize: whether a merged weight can be quantized again in the same format.
    :param dequantize: whether a layer's weight can be de-quantized to full precision.
    :param save: whether the quantized base can be saved and reloaded.
    :param merge_overrides: per method, a refusal for ``merge`` that the general rule would allow.
    :param sharded: per engine of :data:`ENGINES`, whether the quantized layers survive being sharded by it (and train
        correctly sharded); an engine left out is refused as not declared. A method trains sharded where it trains, the
        engine is declared and the method is one of the engine's :data:`SHARDED_METHODS`.
    """
    table: Table = {}
    for method in METHODS:
        trains = train.get(method, no("not declared by this backend"))
        table[(method, "train")] = trains
        if not trains:
            blocked = no(f"'{method}' cannot be trained on this backend", trains.hint)
            for op in ("merge", "merge_dequantized", "unmerge"):
                table[(method, op)] = blocked
        else:
            merge = requantize
            if merge and merge_overrides and method in merge_overrides:
                merge = merge_overrides[method]
            table[(method, "merge")] = merge
            table[(method, "merge_dequantized")] = dequantize
            unmerge_ok = merge or dequantize
            table[(method, "unmerge")] = (
                yes("the original quantized modules are kept and put back exactly")
                if unmerge_ok
                else no("there is no merge to undo", merge.hint)
            )
        table[(method, "save")] = save if trains else no(f"'{method}' cannot be trained on this backend")
        for engine, operation in ENGINES.items():
            table[(method, operation)] = _sharded_cell(method, engine, trains, (sharded or {}).get(engine))
    return table


def _sharded_cell(method: str, engine: str, trains: Support, declared: Support | None) -> Support:
    if not trains:
        return no(f"'{method}' cannot be trained on this backend", trains.hint)
    if declared is None:
        return no(f"this backend does not declare training sharded by {engine}",
                  "Train in one process, or use a backend that declares it (`qadapt matrix`)")
    if declared and method not in SHARDED_METHODS[engine]:
        return no(f"'{method}' is not verified under {engine} (qadapt checks {', '.join(SHARDED_METHODS[engine])} "
                  "there: losses equal to one process's, the quantized state intact)",
                  "Use method='lora' to train sharded")
    return declared
