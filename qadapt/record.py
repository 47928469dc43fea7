"""What qadapt remembers about a model it loaded: backend, options, library version, adapter, merge state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ATTRIBUTE = "_qadapt_record"


@dataclass
class Record:
    backend: str | None  # None: full precision
    options: dict[str, Any] = field(default_factory=dict)
    library_version: str | None = None
    method: str | None = None
    adapter_name: str = "default"
    merge: Any = None  # a qadapt.merging.MergeState while merged
    merged_when_saved: Any = None  # for a model loaded from a merged checkpoint: its manifest's "merged" entry
    allow_unquantized: tuple = ()  # qadapt.load(allow_unquantized=...): in-scope weights kept in full precision
    load_report: Any = None  # a qadapt.inventory.LoadReport
    # the folder the model was quantized or loaded from (its tokenizer; LoftQ's full-precision weights; a sharded run
    # saves a reference to it)
    source: str | None = None
    adapter_notes: dict = field(default_factory=dict)  # adapter name -> why its provenance is not qadapt's own
    sharded: str | None = None  # the engine that shards the model (qadapt.distributed), None in one piece
    placement: Any = None  # what qadapt.load(device_map=...) placed where (qadapt.placement.placement_of)

    def describe(self) -> dict:
        return {"backend": self.backend, "options": self.options, "library_version": self.library_version}


def base_model(model):
    """The transformers model inside a ``PeftModel`` (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def get_record(model) -> Record:
    """The record qadapt keeps on ``model``; a full-precision record for a model qadapt did not load."""
    inner = base_model(model)
    record = inner.__dict__.get(ATTRIBUTE)
    if record is None:
        record = Record(backend=None)
        set_record(inner, record)
    return record


def set_record(model, record: Record) -> None:
    # Stored in __dict__, not as a module attribute: nn.Module's __setattr__ would be fine too, but this keeps it out
    # of state_dict and deepcopy-safe.
    base_model(model).__dict__[ATTRIBUTE] = record
