"""Checkpoint folders: ``base/`` + ``adapter/`` + ``qadapt.json``, written atomically with checksums and provenance.

:mod:`.save` writes them (through :mod:`.files`), :mod:`.manifest` reads and verifies ``qadapt.json``, :mod:`.load`
restores a model, :mod:`.adapter` loads an adapter onto a base.
"""

from .adapter import load_adapter
from .load import load
from .manifest import FORMAT, MANIFEST, PROVENANCE, is_checkpoint, read_manifest
from .save import save

__all__ = ["save", "load", "load_adapter", "read_manifest", "is_checkpoint", "MANIFEST", "PROVENANCE", "FORMAT"]
