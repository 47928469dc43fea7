"""Finding, loading and guarding plugins.

Backends come from the ``qadapt`` entry-point group, the built-in ones exactly like third-party ones. Loading is
guarded: a plugin that fails to import, whose hook raises (even ``SystemExit``), that implements a hook qadapt does
not know, that registers something that breaks the backend contract (:func:`qadapt.backend.contract_problems`), or
that replaces torch's layer functions or another library's ``sys.modules`` entry (:mod:`qadapt.plugin_guard`) is
recorded in :func:`failures` and skipped; qadapt and the other backends carry on.

The names of the built-in backends are reserved: they are the entry points of the installed qadapt distribution
itself (found by where the running ``qadapt`` package lives, not by name alone). Another distribution's entry point
of such a name, or a backend of such a name registered by another plugin, is recorded as a failure and skipped, so
``backend="bnb"`` and ``QADAPT_LOAD_PLUGINS=bnb`` always mean the built-in one. An entry-point name that two other
distributions declare is ambiguous: both are recorded and neither loads.

``QADAPT_LOAD_PLUGINS`` chooses which entry points load: unset loads all, ``""`` loads none, ``"bnb,hqq"`` loads those.
How long each plugin took to import and register is kept (:func:`import_seconds`); ``qadapt doctor`` names the slow
ones.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging
import os
import time
import traceback
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .backend import QuantBackend, contract_problems
from .errors import BackendUnavailableError, UnknownBackendError
from .plugin_guard import Watch

GROUP = "qadapt"
ENV_SWITCH = "QADAPT_LOAD_PLUGINS"
#: the distribution qadapt itself is installed as (its own entry points are the built-in backends)
DISTRIBUTION = "qadapt-lm"
#: a plugin taking longer than this to import and register is named by ``qadapt doctor``
SLOW_IMPORT_SECONDS = 2.0
_clock = time.perf_counter


@dataclass
class PluginFailure:
    plugin: str
    stage: str  # "import" | "register" | "tamper" | "reserved" | "ambiguous"
    error: str
    traceback: str

    def to_dict(self) -> dict:
        return {"plugin": self.plugin, "stage": self.stage, "error": self.error}

    def describe(self) -> str:
        if self.stage in ("import", "register"):
            return f"plugin failed to {self.stage}: {self.error}"
        return f"plugin skipped ({self.stage}): {self.error}"


@dataclass
class Registration:
    backend: QuantBackend
    plugin: str
    plugin_version: str | None
    builtin: bool = False


def _normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _name_of(dist) -> str:
    """A distribution's normalised name; from its folder's name where importlib has it (reading every METADATA file
    costs ~10 ms a distribution, seconds with a few hundred installed), else from its metadata."""
    fast = getattr(dist, "_normalized_name", None)
    return _normalized(fast if isinstance(fast, str) and fast else (dist.metadata["Name"] or ""))


def _display(dist) -> str:
    return dist.metadata["Name"] or _name_of(dist)


def _is_own_distribution(dist) -> bool:
    """Is ``dist`` (named qadapt) the distribution the running ``qadapt`` package was installed from? By its files
    (a regular install lists ``qadapt/__init__.py``) or its ``direct_url.json`` (an editable install names the
    source folder)."""
    import json
    from urllib.parse import unquote, urlparse

    here = os.path.realpath(os.path.join(os.path.dirname(__file__), "__init__.py"))
    for file in dist.files or ():
        if str(file).replace(os.sep, "/").endswith("qadapt/__init__.py"):
            if os.path.realpath(str(dist.locate_file(file))) == here:
                return True
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return False
    url = direct.get("url", "") if isinstance(direct, dict) else ""
    if url.startswith("file://") and (direct.get("dir_info") or {}).get("editable"):
        source = unquote(urlparse(url).path)
        return os.path.realpath(os.path.join(source, "qadapt", "__init__.py")) == here
    return False


def _candidates():
    """``(entry_point, distribution, builtin)`` for every entry point of the group, the installed qadapt's first,
    then the other distributions in ``sys.path`` order (one copy of each distribution, as importlib keeps); and the
    places of other distributions named qadapt that declare plugins (never loaded)."""
    found, impostors, seen = [], [], {DISTRIBUTION}
    distributions = list(importlib.metadata.distributions())
    # Every copy of the running qadapt's metadata counts (an editable install's dist-info, the egg-info of a source
    # checkout on sys.path); each built-in name once, from the first copy that declares it.
    own = [dist for dist in distributions if _name_of(dist) == DISTRIBUTION and _is_own_distribution(dist)]
    builtin_names = set()
    for dist in own:
        for ep in dist.entry_points:
            if ep.group == GROUP and ep.name not in builtin_names:
                builtin_names.add(ep.name)
                found.append((ep, dist, True))
    for dist in distributions:
        name = _name_of(dist)
        if any(dist is mine for mine in own):
            continue
        if name == DISTRIBUTION:
            if any(ep.group == GROUP for ep in dist.entry_points):
                impostors.append(str(dist.locate_file("")))
            continue
        if name in seen:
            continue
        seen.add(name)
        found += [(ep, dist, False) for ep in dist.entry_points if ep.group == GROUP]
    return found, impostors


class _Registry:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.backends: dict[str, Registration] = {}
        self.failures: list[PluginFailure] = []
        self.import_seconds: dict[str, float] = {}
        self.reserved: set[str] = set()  # the built-in backends' names
        self.builtin_plugins: set[str] = set()
        self.loaded = False

    # -------------------------------------------------------------- loading
    def ensure_loaded(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        wanted = os.environ.get(ENV_SWITCH)
        allowed = None if wanted is None else {name.strip() for name in wanted.split(",") if name.strip()}
        candidates, impostors = _candidates()
        for place in impostors:
            self._note(f"{DISTRIBUTION}@{place}", "reserved", f"a distribution named {DISTRIBUTION!r} at {place} is not "
                       "the installed qadapt: its entry points are ignored")
        self.reserved = {ep.name for ep, _, builtin in candidates if builtin}
        by_name: dict[str, list] = {}
        for candidate in candidates:
            by_name.setdefault(candidate[0].name, []).append(candidate)
        for name, group in by_name.items():
            if allowed is not None and name not in allowed:
                continue
            chosen = self._choose(name, group)
            if chosen is not None:
                self._load(*chosen)

    def _choose(self, name: str, group: list):
        """The one entry point to load for ``name`` (None: none), recording the others as failures."""
        builtin = [c for c in group if c[2]]
        others = [c for c in group if not c[2]]
        if builtin:
            for _, dist, _ in others:
                self._note(f"{_display(dist)}:{name}", "reserved", f"distribution {_display(dist)!r} declares the entry point {name!r}, which is "
                           f"reserved for qadapt's built-in plugin: skipped (the built-in one is loaded)")
            return builtin[0]
        if len(others) > 1:
            dists = " and ".join(repr(_display(dist)) for _, dist, _ in others)
            self._note(name, "ambiguous", f"the entry point {name!r} is declared by the distributions {dists}: "
                       "ambiguous, none of them is loaded (uninstall one)")
            return None
        return others[0]

    def _load(self, entry_point, dist, builtin: bool) -> None:
        watch = Watch()
        started = _clock()
        try:
            try:
                plugin = entry_point.load()
            except BaseException as exc:  # a plugin must never take qadapt down, whatever it raises on import
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self._fail(entry_point.name, "import", exc)
                return
            version = entry_point.dist.version if entry_point.dist else None
            if builtin:
                self.builtin_plugins.add(entry_point.name)
            self.add(plugin, entry_point.name, version, watch=watch)
        finally:
            self.import_seconds[entry_point.name] = _clock() - started

    def add(self, plugin: object, name: str, version: str | None = None, watch: Watch | None = None) -> None:
        """Register ``plugin`` (a module or object with hookimpls) and collect its backends, guarded."""
        watch = watch or Watch()
        try:
            self.pm.register(plugin, name=name)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
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
        except BaseException as exc:  # SystemExit included: a hook calling sys.exit() must not end the program
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._fail(name, "register", exc)
            self.pm.unregister(name=name)
            return
        tampered = watch.changes(self._libraries(staged))
        if tampered:
            self.pm.unregister(name=name)
            self._note(name, "tamper", "; ".join(tampered) + ": the plugin is skipped")
            return
        for backend in staged:
            self.backends[backend.name] = Registration(backend, name, version, name in self.builtin_plugins)

    def _libraries(self, staged) -> set[str]:
        """Top-level modules of every backend's libraries (the one being registered included)."""
        found = set()
        for backend in [r.backend for r in self.backends.values()] + list(staged):
            found |= {module.split(".")[0] for module in backend.requires if isinstance(module, str)}
        return found

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
            shown = backend.name if isinstance(backend.name, str) and backend.name else type(backend).__name__
            raise ValueError(f"backend {shown!r} breaks the backend contract: " + "; ".join(problems))
        if backend.name in self.reserved and plugin not in self.builtin_plugins:
            raise ValueError(f"backend name '{backend.name}' is reserved for qadapt's built-in backend")
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

    def _note(self, plugin: str, stage: str, message: str) -> None:
        self.failures.append(PluginFailure(plugin, stage, message, ""))
        logging.getLogger("qadapt").warning("plugin %r was skipped (%s)", plugin, message)


_registry = _Registry()


def registry() -> _Registry:
    _registry.ensure_loaded()
    return _registry


def registrations() -> dict[str, Registration]:
    """Every registered backend's registration (backend, plugin, plugin version), by name, in name order. Imports no
    backend library."""
    return dict(sorted(registry().backends.items()))


def failures() -> list[PluginFailure]:
    """Plugins that failed to import or register, were refused or were skipped, with the reason."""
    return list(registry().failures)


def import_seconds() -> dict[str, float]:
    """How long each entry-point plugin took to import and register, in seconds."""
    return dict(registry().import_seconds)


def slow_plugins() -> dict[str, float]:
    """The plugins that took longer than :data:`SLOW_IMPORT_SECONDS` to import and register."""
    return {name: seconds for name, seconds in import_seconds().items() if seconds > SLOW_IMPORT_SECONDS}


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
    env = checked_environment(backend)
    if not env.ok:
        raise BackendUnavailableError(asked, f"backend '{name}' is installed but cannot run: {env.reason}", env.hint)
    return backend


def checked_environment(backend: QuantBackend):
    """``backend.check_environment()``, guarded: a check that raises anything (``SystemExit`` too) or returns
    something else than an :class:`qadapt.Environment` reads as a backend that cannot run, with the reason."""
    from .backend import Environment

    try:
        env = backend.check_environment()
    except BaseException as exc:  # noqa: BLE001 - the contract says it never raises; a broken plugin does anyway
        if isinstance(exc, KeyboardInterrupt):
            raise
        return Environment(ok=False, reason=f"its environment check raised {type(exc).__name__}: {exc}",
                           hint="Report it to the plugin's authors", details={"plugin_error": True})
    if not isinstance(env, Environment):
        return Environment(ok=False, reason=f"its environment check returned {type(env).__name__}, not an Environment",
                           hint="Report it to the plugin's authors", details={"plugin_error": True})
    return env


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
