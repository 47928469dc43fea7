"""Finding, loading and guarding plugins.

Backends come from the ``qadapt`` entry-point group, the built-in ones exactly like third-party ones. Loading is
guarded: a plugin that fails to import, whose hook raises, or that registers something invalid is recorded in
:func:`failures` and skipped; qadapt and the other backends carry on.

``QADAPT_LOAD_PLUGINS`` chooses which entry points load: unset loads all, ``""`` loads none, ``"bnb,hqq"`` loads those.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import traceback
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .backend import QuantBackend
from .errors import UnknownBackendError

GROUP = "qadapt"
ENV_SWITCH = "QADAPT_LOAD_PLUGINS"


@dataclass
class PluginFailure:
    plugin: str
    stage: str  # "import" | "register"
    error: str
    traceback: str

    def to_dict(self) -> dict:
        return {"plugin": self.plugin, "stage": self.stage, "error": self.error}


@dataclass
class Registration:
    backend: QuantBackend
    plugin: str
    plugin_version: str | None


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("qadapt")
        self.pm.add_hookspecs(hookspecs)
        self.backends: dict[str, Registration] = {}
        self.failures: list[PluginFailure] = []
        self.loaded = False

    # -------------------------------------------------------------- loading
    def ensure_loaded(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        wanted = os.environ.get(ENV_SWITCH)
        allowed = None if wanted is None else {name.strip() for name in wanted.split(",") if name.strip()}
        for entry_point in importlib.metadata.entry_points(group=GROUP):
            if allowed is not None and entry_point.name not in allowed:
                continue
            if self.pm.get_plugin(entry_point.name) is not None:
                continue
            try:
                plugin = entry_point.load()
            except BaseException as exc:  # a plugin must never take qadapt down, whatever it raises on import
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._fail(entry_point.name, "import", exc)
                continue
            version = entry_point.dist.version if entry_point.dist else None
            self.add(plugin, entry_point.name, version)

    def add(self, plugin: object, name: str, version: str | None = None) -> None:
        """Register ``plugin`` (a module or object with hookimpls) and collect its backends, guarded."""
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self._fail(name, "register", exc)
            return
        for impl in self.pm.hook.register_backends.get_hookimpls():
            if impl.plugin_name != name:
                continue
            staged: list[QuantBackend] = []
            try:
                impl.function(register=lambda backend: staged.append(self._checked(backend, name)))
            except Exception as exc:
                self._fail(name, "register", exc)
                self.pm.unregister(name=name)
                return
            for backend in staged:
                self.backends[backend.name] = Registration(backend, name, version)

    def remove(self, name: str) -> None:
        """Unregister plugin ``name`` and forget its backends and failures."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.backends = {k: r for k, r in self.backends.items() if r.plugin != name}
        self.failures = [f for f in self.failures if f.plugin != name]

    def _checked(self, backend: object, plugin: str) -> QuantBackend:
        if not isinstance(backend, QuantBackend):
            raise ValueError(f"register() expects a qadapt.QuantBackend instance, got {type(backend).__name__}")
        if not backend.name:
            raise ValueError(f"{type(backend).__name__} has no name")
        taken = self.backends.get(backend.name)
        if taken is not None and taken.plugin != plugin:
            raise ValueError(f"backend name '{backend.name}' is already registered by plugin '{taken.plugin}'")
        return backend

    def _fail(self, plugin: str, stage: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        self.failures.append(PluginFailure(plugin, stage, message, traceback.format_exc()))
        logging.getLogger("qadapt").warning("plugin %r failed to %s and was skipped (%s)", plugin, stage, message)


_registry = _Registry()


def registry() -> _Registry:
    _registry.ensure_loaded()
    return _registry


def backends() -> dict[str, Registration]:
    """Every registered backend, by name, in name order. Imports no backend library."""
    return dict(sorted(registry().backends.items()))


def failures() -> list[PluginFailure]:
    """Plugins that failed to import or register, with the error."""
    return list(registry().failures)


def get_backend(name: str) -> QuantBackend:
    """The backend registered as ``name``, or :class:`UnknownBackendError` naming the available ones."""
    found = registry().backends.get(name)
    if found is not None:
        return found.backend
    available = ", ".join(backends()) or "none"
    broken = failures()
    note = f" ({len(broken)} plugin{'s' if len(broken) != 1 else ''} failed to load: run `qadapt doctor`)" if broken else ""
    hint = f"Available: {available}{note}"
    if os.environ.get(ENV_SWITCH) is not None:
        hint += f". {ENV_SWITCH}={os.environ[ENV_SWITCH]!r} limits which plugins load"
    raise UnknownBackendError(f"backend '{name}'", "no plugin registers a backend of that name", hint)


def register_plugin(plugin: object, name: str) -> None:
    """Register an in-process plugin (tests, notebooks). Its failures are recorded like an entry point's."""
    registry().add(plugin, name)


def unregister_plugin(name: str) -> None:
    registry().remove(name)
