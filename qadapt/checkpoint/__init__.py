"""Checkpoint folders: ``base/`` + ``adapter/`` + ``qadapt.json``, written atomically with checksums and provenance.

:mod:`.save` writes them (through :mod:`.files`), :mod:`.manifest` reads and verifies ``qadapt.json``, :mod:`.load`
restores a model, :mod:`.adapter` loads an adapter onto a base.
"""

from .adapter import load_adapter
from .files import recover_for_load
from .load import load
from .manifest import FORMAT, MANIFEST, PROVENANCE, check_adapter_name, is_checkpoint, looks_like_checkpoint, read_manifest
from .save import save

__all__ = ["save", "load", "load_adapter", "read_manifest", "is_checkpoint", "looks_like_checkpoint",
           "check_adapter_name", "recover_for_load", "MANIFEST", "PROVENANCE", "FORMAT"]
