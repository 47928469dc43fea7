"""The shape of the code: dependencies point one way, the core names no built-in backend, the author contract is
documented member by member. These fail on a change that breaks the layout, before anyone has to notice it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from qadapt.backend import FINAL, QuantBackend

from .conftest import builtin_backends

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "qadapt"

#: the tiers, top first: a module may import from its own tier or a lower one, never a higher one
TIERS = [
    ("command line", ["qadapt.cli", "qadapt.__main__"]),
    ("conformance kit", ["qadapt.testing"]),
    ("user API", ["qadapt", "qadapt.api", "qadapt.distributed"]),
    ("orchestration", ["qadapt.checkpoint", "qadapt.adapters", "qadapt.folders", "qadapt.loftq", "qadapt.merging",
                       "qadapt.proxy", "qadapt.memory", "qadapt.training", "qadapt.inputs", "qadapt.rollback",
                       "qadapt.scope", "qadapt.placement", "qadapt.memory_model"]),
    ("plugin system", ["qadapt.plugins", "qadapt.plugin_guard", "qadapt.hookspecs", "qadapt.backend",
                       "qadapt.unquantized", "qadapt.capabilities", "qadapt.record"]),
    ("helpers", ["qadapt.errors", "qadapt.hf", "qadapt.inventory", "qadapt.peft_layers", "qadapt.merging.requant",
                 "qadapt._version", "qadapt.quiet", "qadapt.progress"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in CORE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every qadapt module ``name`` imports, at module level or inside a function."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def tier_of(name: str) -> int:
    best, rank = None, None
    for index, (_, prefixes) in enumerate(TIERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
                best, rank = prefix, index
    assert rank is not None, f"{name} belongs to no tier: add it to TIERS in {__file__}"
    return rank


def test_every_core_module_belongs_to_a_tier():
    for name in MODULES:
        tier_of(name)


def test_dependencies_point_one_way():
    wrong = []
    for name in MODULES:
        for target in imports_of(name):
            if tier_of(target) < tier_of(name):
                wrong.append(f"{name} ({TIERS[tier_of(name)][0]}) imports {target} ({TIERS[tier_of(target)][0]})")
    assert not wrong, wrong


def test_there_is_no_import_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    assert not cycles, cycles


def test_the_core_never_imports_the_built_in_plugins():
    for name in MODULES:
        source = MODULES[name].read_text()
        assert "qadapt_plugins" not in source, f"{name} mentions qadapt_plugins"


def _code_strings(tree):
    """String constants of ``tree`` that are code, not docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_the_core_names_no_built_in_backend():
    """What a backend must say about itself lives on the backend: no dict in the core keyed by a backend's name."""
    names = set(builtin_backends())
    found = []
    for name, path in MODULES.items():
        for node in _code_strings(ast.parse(path.read_text())):
            if node.value in names:
                found.append(f"{name}:{node.lineno} {node.value!r}")
    assert not found, found


def contract_members() -> list[str]:
    return sorted(name for name, _ in inspect.getmembers(QuantBackend) if not name.startswith("_"))


def test_every_member_of_the_backend_contract_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    missing = [name for name in contract_members() if f"`{name}`" not in docs and f"`{name}(" not in docs]
    assert not missing, f"docs/plugins.md does not document {missing}"


def test_members_not_to_be_overridden_say_so():
    for name in FINAL:
        assert "Not to be overridden" in (getattr(QuantBackend, name).__doc__ or ""), name


def test_the_top_level_functions_have_their_real_signatures():
    import qadapt.api

    for name in ("load", "attach", "prepare", "merge", "unmerge", "save", "load_adapter"):
        assert getattr(qadapt, name) is getattr(qadapt.api, name)
        assert "options" not in inspect.signature(getattr(qadapt, name)).parameters or name in ("load", "attach")
    assert "max_error" in inspect.signature(qadapt.merge).parameters
    assert "calibration" in inspect.signature(qadapt.load).parameters
