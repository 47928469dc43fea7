"""Finding, loading and guarding plugins.

Backends come from the ``qadapt`` entry-point group, the built-in ones exactly like third-party ones. Loading is
guarded: a plugin that fails to import, whose hook raises, that implements a hook qadapt does not know, or that
registers something that breaks the backend contract (:func:`qadapt.backend.contract_problems`) is recorded in
:func:`failures` and skipped; qadapt and the other backends carry on.

``QADAPT_LOAD_PLUGINS`` chooses which entry points load: unset loads all, ``""`` loads none, ``"bnb,hqq"`` loads those.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
import traceback
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .backend import QuantBackend, contract_problems
from .errors import BackendUnavailableError, UnknownBackendError

GROUP = "qadapt"
ENV_SWITCH = "QADAPT_LOAD_PLUGINS"
#: the distribution qadapt itself is installed as (its entry points are the built-in backends)
DISTRIBUTION = "qadapt-lm"


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
        self.pm = pluggy.PluginManager(GROUP)
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
        unknown = self._unknown_hooks(name)
        if unknown:
            self.pm.unregister(name=name)
            self._fail(name, "register", ValueError(unknown))
            return
        impls = [impl for impl in self.pm.hook.register_backends.get_hookimpls() if impl.plugin_name == name]
        staged: list[QuantBackend] = []
        try:
            for impl in impls:
                impl.function(register=lambda backend: staged.append(self._checked(backend, name, staged)))
        except Exception as exc:
            self._fail(name, "register", exc)
            self.pm.unregister(name=name)
            return
        for backend in staged:
            self.backends[backend.name] = Registration(backend, name, version)

    def _unknown_hooks(self, name: str) -> str:
        """Why the plugin's hooks are not qadapt's (empty: they are): a misspelt hook would register nothing."""
        callers = self.pm.get_hookcallers(self.pm.get_plugin(name)) or []
        known = sorted(hook for hook, caller in vars(self.pm.hook).items() if getattr(caller, "spec", None) is not None)
        strays = sorted(caller.name for caller in callers if caller.spec is None)
        if strays:
            close = difflib.get_close_matches(strays[0], known, n=1)
            maybe = f" (did you mean {close[0]!r}?)" if close else ""
            return f"implements hooks qadapt does not know: {', '.join(strays)}{maybe}"
        if not callers:
            return f"implements no qadapt hook (known: {', '.join(known)})"
        return ""

    def remove(self, name: str) -> None:
        """Unregister plugin ``name`` and forget its backends and failures."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.backends = {k: r for k, r in self.backends.items() if r.plugin != name}
        self.failures = [f for f in self.failures if f.plugin != name]

    def _checked(self, backend: object, plugin: str, staged: list) -> QuantBackend:
        if not isinstance(backend, QuantBackend):
            raise ValueError(f"register() expects a qadapt.QuantBackend instance, got {type(backend).__name__}")
        problems = contract_problems(backend)
        if problems:
            raise ValueError(f"backend {backend.name or type(backend).__name__!r} breaks the backend contract: "
                             + "; ".join(problems))
        taken = self.backends.get(backend.name)
        if taken is not None and taken.plugin != plugin:
            raise ValueError(f"backend name '{backend.name}' is already registered by plugin '{taken.plugin}'")
        if any(other.name == backend.name for other in staged):
            raise ValueError(f"backend name '{backend.name}' is registered twice by this plugin")
        return backend

    def _fail(self, plugin: str, stage: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        self.failures.append(PluginFailure(plugin, stage, message, traceback.format_exc()))
        logging.getLogger("qadapt").warning("plugin %r failed to %s and was skipped (%s)", plugin, stage, message)


_registry = _Registry()


def registry() -> _Registry:
    _registry.ensure_loaded()
    return _registry


def registrations() -> dict[str, Registration]:
    """Every registered backend's registration (backend, plugin, plugin version), by name, in name order. Imports no
    backend library."""
    return dict(sorted(registry().backends.items()))


def failures() -> list[PluginFailure]:
    """Plugins that failed to import or register, with the error."""
    return list(registry().failures)


def get_backend(name: str) -> QuantBackend:
    """The backend registered as ``name``, or :class:`UnknownBackendError` naming the available ones."""
    found = registry().backends.get(name) if isinstance(name, str) else None
    if found is not None:
        return found.backend
    available = ", ".join(registrations()) or "none"
    broken = failures()
    note = f" ({len(broken)} plugin{'s' if len(broken) != 1 else ''} failed to load: run `qadapt doctor`)" if broken else ""
    hint = f"Available: {available}{note}"
    if os.environ.get(ENV_SWITCH) is not None:
        hint += f". {ENV_SWITCH}={os.environ[ENV_SWITCH]!r} limits which plugins load"
    raise UnknownBackendError(f"backend {name!r}", "no plugin registers a backend of that name", hint)


def ready_backend(name: str, asked: str) -> QuantBackend:
    """The backend ``name``, checked to run here; :class:`BackendUnavailableError` (with the fix) where it cannot."""
    backend = get_backend(name)
    env = backend.check_environment()
    if not env.ok:
        raise BackendUnavailableError(asked, f"backend '{name}' is installed but cannot run: {env.reason}", env.hint)
    return backend


def backend_of(record) -> QuantBackend:
    """The backend a :class:`qadapt.record.Record` names; the full-precision one for a model no backend loaded."""
    from .unquantized import UNQUANTIZED

    return UNQUANTIZED if record.backend is None else get_backend(record.backend)


def quiet_libraries() -> None:
    """Filter the known harmless messages of every registered backend's library (see :mod:`qadapt.quiet`)."""
    from . import quiet

    quiet.install([message for r in registrations().values() for message in r.backend.harmless_messages])


def register_plugin(plugin: object, name: str) -> None:
    """Register an in-process plugin (tests, notebooks). Its failures are recorded like an entry point's."""
    registry().add(plugin, name)


def unregister_plugin(name: str) -> None:
    registry().remove(name)
