"""Watching a plugin while it imports and registers: what it replaced in torch and in ``sys.modules``, put back.

A plugin runs arbitrary code at import. qadapt cannot sandbox that, but it can notice the two kinds of interference
that would silently change every other backend's results: replacing torch's layer entry points
(``nn.Module.__call__``, ``nn.Linear.forward``, ``F.linear``) and replacing another library's entry in
``sys.modules`` (``sys.modules["bitsandbytes"] = fake``). :class:`Watch` takes a snapshot before, compares after,
restores what it can and says what it saw; the plugin is then skipped (:mod:`qadapt.plugins`).

Nothing here imports torch: a plugin that imports it for the first time is checked against torch's own sources.
"""

from __future__ import annotations

import os
import sys

#: (module, attribute path) of the torch functions every backend's forward goes through
TORCH_ENTRY_POINTS = (
    ("torch.nn.modules.module", "Module.__call__"),
    ("torch.nn.modules.module", "Module._call_impl"),
    ("torch.nn.modules.linear", "Linear.forward"),
    ("torch.nn.functional", "linear"),
    ("torch", "matmul"),
)
#: libraries whose ``sys.modules`` entries are watched besides the backends' own (``QuantBackend.requires``)
CORE_LIBRARIES = ("torch", "transformers", "peft", "safetensors", "accelerate", "qadapt")


def _resolve(module_name: str, path: str):
    module = sys.modules.get(module_name)
    if module is None:
        return None, None, None
    owner = module
    *parents, attribute = path.split(".")
    for part in parents:
        owner = getattr(owner, part, None)
        if owner is None:
            return None, None, None
    return owner, attribute, getattr(owner, attribute, None)


def _torch_entry_points() -> dict:
    found = {}
    for module_name, path in TORCH_ENTRY_POINTS:
        owner, attribute, value = _resolve(module_name, path)
        if owner is not None:
            found[(module_name, path)] = (owner, attribute, value)
    return found


def _is_torchs_own(value) -> bool:
    """Is ``value`` defined by torch itself (for a plugin that imported torch first: no snapshot to compare with)?"""
    import importlib.util

    code = getattr(value, "__code__", None)
    if code is None:  # a C function: torch's are defined in torch._C
        return str(getattr(value, "__module__", "") or "").split(".")[0] == "torch"
    spec = importlib.util.find_spec("torch")
    roots = list(spec.submodule_search_locations or []) if spec else []
    filename = os.path.realpath(code.co_filename)
    return any(filename.startswith(os.path.realpath(root) + os.sep) for root in roots)


class Watch:
    """Snapshot of what a plugin could replace; :meth:`changes` compares (and restores) after it ran."""

    def __init__(self) -> None:
        self.modules = dict(sys.modules)
        self.torch = _torch_entry_points()

    def changes(self, watched_libraries) -> list[str]:
        """What was replaced since the snapshot, in words, each put back where the original is known. Entries of
        ``sys.modules`` are compared for ``watched_libraries`` (top-level names) and qadapt's core libraries."""
        seen = []
        watched = set(watched_libraries) | set(CORE_LIBRARIES)
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] not in watched:
                continue
            before = self.modules.get(name)
            if before is not None and module is not before:
                sys.modules[name] = before
                seen.append(f"replaced sys.modules[{name!r}] (restored)")
            elif before is None and "." not in name and not _is_real_import(name, module):
                # top-level entries only: torch itself registers its C submodules without specs of their own
                del sys.modules[name]
                seen.append(f"put a fake module at sys.modules[{name!r}] (removed)")
        now = _torch_entry_points()
        for key, (owner, attribute, value) in now.items():
            label = f"{key[0]}.{key[1]}".replace("torch.nn.modules.module.", "torch.nn.").replace(
                "torch.nn.modules.linear.", "torch.nn.")
            if key in self.torch:
                original = self.torch[key][2]
                if value is not original:
                    setattr(owner, attribute, original)
                    seen.append(f"replaced {label} (restored)")
            elif not _is_torchs_own(value):
                seen.append(f"replaced {label} (it imported torch first: restart without this plugin)")
        return seen


def _is_real_import(name: str, module) -> bool:
    """Was ``module`` put at ``sys.modules[name]`` by the import system (a spec of that name), not by hand?"""
    spec = getattr(module, "__spec__", None)
    if spec is None:
        return name == "__main__"
    return getattr(spec, "name", None) == name
