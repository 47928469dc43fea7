"""qadapt: quantize a causal LM with any backend, train PEFT adapters on it, merge and ship, through one API.

``import qadapt`` imports no backend library and no torch: the functions below import what they need when called.
"""

from __future__ import annotations

from .backend import Environment, Option, QuantBackend
from .capabilities import METHODS, OPERATIONS, Support
from .errors import (
    BackendUnavailableError,
    CheckpointError,
    IncompatibleError,
    InvalidOptionError,
    MergeRefusedError,
    QadaptError,
    UnknownBackendError,
)
from .hookspecs import hookimpl

__version__ = "0.1.0"


def load(model, backend=None, **options):
    """Load or quantize a model; see :func:`qadapt.api.load`."""
    from .api import load as _load

    return _load(model, backend, **options)


def attach(model, method="lora", **options):
    """Attach a PEFT adapter; see :func:`qadapt.api.attach`."""
    from .api import attach as _attach

    return _attach(model, method, **options)


def merge(model, strategy="requantize", **options):
    """Merge the adapter, measured and reversible; see :func:`qadapt.api.merge`."""
    from .api import merge as _merge

    return _merge(model, strategy, **options)


def unmerge(model):
    """Restore the exact original quantized weights; see :func:`qadapt.api.unmerge`."""
    from .api import unmerge as _unmerge

    return _unmerge(model)


def save(model, path, **options):
    """Save base + adapter + provenance atomically; see :func:`qadapt.api.save`."""
    from .api import save as _save

    return _save(model, path, **options)


def load_adapter(model, path, **options):
    """Load a saved adapter onto a base, checking provenance; see :func:`qadapt.api.load_adapter`."""
    from .api import load_adapter as _load_adapter

    return _load_adapter(model, path, **options)


def backends():
    """Registered backends by name (imports no backend library)."""
    from .plugins import backends as _backends

    return {name: registration.backend for name, registration in _backends().items()}


def get_backend(name):
    from .plugins import get_backend as _get_backend

    return _get_backend(name)


__all__ = [
    "load", "attach", "merge", "unmerge", "save", "load_adapter", "backends", "get_backend", "hookimpl",
    "QuantBackend", "Option", "Environment", "Support", "METHODS", "OPERATIONS",
    "QadaptError", "UnknownBackendError", "BackendUnavailableError", "InvalidOptionError", "IncompatibleError",
    "MergeRefusedError", "CheckpointError",
]
