"""qadapt: quantize a causal LM with any backend, train PEFT adapters on it, merge and ship, through one API.

``import qadapt`` imports no backend library and no torch: the user API (:mod:`qadapt.api`) is imported on first use
of one of its functions, which then import what they need.

For plugin authors: :class:`QuantBackend`, :class:`Option`, :class:`Environment`, :func:`hookimpl`, the capability
helpers (:mod:`qadapt.capabilities`), :mod:`qadapt.hf`, :mod:`qadapt.peft_layers`, :mod:`qadapt.merging.requant`
and the conformance kit (:mod:`qadapt.testing`). ``docs/plugins.md`` is the guide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .backend import Environment, Option, QuantBackend
from .capabilities import METHODS, OPERATIONS, Support
from .errors import (
    ArchitectureError,
    BackendUnavailableError,
    CheckpointError,
    IncompatibleError,
    InvalidOptionError,
    MergeRefusedError,
    PluginError,
    QadaptError,
    UnknownBackendError,
)
from .hookspecs import hookimpl

if TYPE_CHECKING:  # pragma: no cover - for IDEs and type checkers: the real functions, with their signatures
    from .api import attach, load, load_adapter, load_report, merge, prepare, save, unmerge

#: the user API, imported from :mod:`qadapt.api` on first use (``help(qadapt.load)`` shows the real signature)
_API = ("load", "attach", "prepare", "merge", "unmerge", "save", "load_adapter", "load_report")


def __getattr__(name: str):
    if name in _API:
        from . import api

        function = getattr(api, name)
        globals()[name] = function
        return function
    raise AttributeError(f"module 'qadapt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


def backends() -> dict[str, QuantBackend]:
    """Registered backends by name, in name order (imports no backend library)."""
    from .plugins import registrations

    return {name: registration.backend for name, registration in registrations().items()}


def get_backend(name: str) -> QuantBackend:
    """The backend registered as ``name``, or :class:`UnknownBackendError` naming the available ones."""
    from .plugins import get_backend as _get_backend

    return _get_backend(name)


__all__ = [
    "load", "attach", "prepare", "merge", "unmerge", "save", "load_adapter", "load_report", "backends", "get_backend",
    "hookimpl", "QuantBackend", "Option", "Environment", "Support", "METHODS", "OPERATIONS",
    "QadaptError", "UnknownBackendError", "BackendUnavailableError", "InvalidOptionError", "IncompatibleError",
    "ArchitectureError", "MergeRefusedError", "CheckpointError", "PluginError", "__version__",
]
