"""Plugins: found through the ``qadapt`` entry-point group, guarded, switchable, and never heavy at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest

import qadapt
from qadapt.plugins import failures, get_backend, register_plugin, registrations, unregister_plugin

from .conftest import builtin_backends

#: the libraries the built-in backends drive: the modules they check for, and two they import without requiring
#: them (EETQ's kernels where they run, and AutoAWQ, which PEFT's AWQ dispatch imports)
BACKEND_LIBRARIES = tuple(sorted(
    {module.split(".")[0] for name in builtin_backends() for module in get_backend(name).requires} | {"EETQ", "awq"}
))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def _imported_after_listing(prefixes, **env) -> list[str]:
    code = (
        "import sys, json, qadapt\n"
        "qadapt.backends()\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {tuple(prefixes)!r})))"
    )
    result = run_python(code, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_and_listing_import_no_backend_library():
    assert _imported_after_listing(BACKEND_LIBRARIES) == []


def test_builtin_plugins_do_not_even_import_torch():
    builtin = ",".join(builtin_backends())
    assert _imported_after_listing(("torch", "transformers", "peft") + BACKEND_LIBRARIES, QADAPT_LOAD_PLUGINS=builtin) == []


def test_builtin_backends_are_entry_points_like_any_plugin():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="qadapt")}
    assert set(builtin_backends()) <= names and len(builtin_backends()) >= 8
    assert {"bnb", "hqq", "torchao"} <= set(registrations())
    assert registrations()["bnb"].plugin == "bnb"


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(qadapt.UnknownBackendError) as raised:
        get_backend("gptqq")
    message = str(raised.value)
    assert "backend 'gptqq'" in message and "Available:" in message and "bnb" in message


def test_env_switch_chooses_which_plugins_load():
    code = "import qadapt, json; print(json.dumps(sorted(qadapt.backends())))"
    assert json.loads(run_python(code, QADAPT_LOAD_PLUGINS="").stdout.strip().splitlines()[-1]) == []
    assert json.loads(run_python(code, QADAPT_LOAD_PLUGINS="hqq,bnb").stdout.strip().splitlines()[-1]) == ["bnb", "hqq"]


class _Named(qadapt.QuantBackend):
    """The smallest backend the contract accepts: it declares nothing it cannot do."""

    def __init__(self, name):
        self.name = name

    def capabilities(self, options):
        from qadapt.capabilities import declare, no

        refused = no("test backend", "none")
        return declare(train={}, requantize=refused, dequantize=refused, save=refused)

    def quantize(self, model, options, calibration=None):
        return model

    def quantized_layer_types(self):
        return ()


def _plugin(register_body):
    module = types.ModuleType("fake_plugin")

    @qadapt.hookimpl
    def register_backends(register):
        register_body(register)

    module.register_backends = register_backends
    return module


@pytest.fixture
def plugin_name():
    name = "test-plugin"
    yield name
    unregister_plugin(name)


def test_a_registered_plugin_is_found_and_usable(plugin_name):
    register_plugin(_plugin(lambda register: register(_Named("fake"))), plugin_name)
    assert get_backend("fake").name == "fake"
    assert registrations()["fake"].plugin == plugin_name


def test_a_plugin_whose_hook_raises_is_recorded_and_harms_nothing(plugin_name):
    def explode(register):
        register(_Named("half-registered"))
        raise RuntimeError("boom")

    register_plugin(_plugin(explode), plugin_name)
    assert "half-registered" not in registrations()
    failure = [f for f in failures() if f.plugin == plugin_name]
    assert failure and "boom" in failure[0].error and failure[0].stage == "register"
    assert get_backend("bnb").name == "bnb"


@pytest.mark.parametrize("bad", [object(), _Named(""), _Named("bnb")], ids=["not-a-backend", "no-name", "taken-name"])
def test_invalid_registrations_are_refused(plugin_name, bad):
    register_plugin(_plugin(lambda register: register(bad)), plugin_name)
    assert [f for f in failures() if f.plugin == plugin_name]
    assert registrations()["bnb"].plugin == "bnb"


def test_a_plugin_that_fails_to_import_is_reported_and_harms_nothing(tmp_path):
    # A real distribution on sys.path whose entry point raises on import.
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[qadapt]\nbroken = broken_plugin\n")
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('missing dependency: frobnicate')\n")
    code = (
        "import json, qadapt\nfrom qadapt.plugins import failures\n"
        "b = qadapt.backends()\n"
        "print(json.dumps({'backends': sorted(b), 'failures': [f.to_dict() for f in failures()]}))"
    )
    import os

    result = run_python(code, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"bnb", "hqq", "torchao"} <= set(data["backends"])
    broken = [f for f in data["failures"] if f["plugin"] == "broken"]
    assert broken and "frobnicate" in broken[0]["error"] and broken[0]["stage"] == "import"
    assert "plugin 'broken' failed to import" in result.stderr


def test_the_example_third_party_plugin_is_found_listed_and_usable(tiny_dir, tmp_path):
    """examples/qadapt-rowwise-int8 is its own distribution; nox installs it. Here: found via its entry point,
    listed, it passes the conformance kit, and its folders are its own (detected by it, refused by transformers)."""
    from importlib.metadata import entry_points

    if "rowwise-int8" not in {ep.name for ep in entry_points(group="qadapt")}:
        pytest.skip("examples/qadapt-rowwise-int8 is not installed (nox's tests session installs it)")
    from qadapt.cli.backends import backend_rows
    from qadapt.testing.conformance import check_backend

    rows = {row["name"]: row for row in backend_rows()}
    assert rows["rowwise-int8"]["status"] == "ok" and rows["rowwise-int8"]["plugin"] == "rowwise-int8"
    results = check_backend("rowwise-int8", methods=["lora", "ia3"])
    assert all(r.ok for r in results), [str(r) for r in results if not r.ok]
    model = qadapt.load(tiny_dir, backend="rowwise-int8")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "RowwiseInt8Linear"
    from transformers import AutoModelForCausalLM

    from qadapt.record import get_record

    base = os.path.join(qadapt.save(model, tmp_path / "out"), "base")
    assert get_record(qadapt.load(base)).backend == "rowwise-int8"  # its own folder_options claimed the folder
    with pytest.raises(ValueError, match="quant_method"):
        AutoModelForCausalLM.from_pretrained(base)


def test_every_hook_is_documented_under_its_signature():
    import inspect
    from pathlib import Path

    from qadapt import hookspecs

    docs = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()
    hooks = [name for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "qadapt_spec")]
    assert hooks == ["register_backends"]
    for name in hooks:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"### `{name}({params})`" in docs
