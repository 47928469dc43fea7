"""Misbehaving and impersonating plugins (issue 15, 2 and 10): none of them can take a built-in backend's name, break
a command, or change torch for the others unnoticed.

Distributions are real dist-info folders on ``sys.path`` (entry points are found along it in order), in a subprocess
run from a temporary folder; in-process plugins use ``register_plugin``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

import qadapt
from qadapt.plugins import failures, register_plugin, registrations

from . import test_plugins
from .test_plugins import _Named
from .test_plugins import _plugin as plugin

BACKEND = textwrap.dedent("""
    import qadapt
    from qadapt.capabilities import declare, no

    class Backend(qadapt.QuantBackend):
        name = {name!r}

        def capabilities(self, options):
            refused = no("test backend", "none")
            return declare(train={{}}, requantize=refused, dequantize=refused, save=refused)

        def quantize(self, model, options, calibration=None):
            return model

        def quantized_layer_types(self):
            return ()

    @qadapt.hookimpl
    def register_backends(register):
        register(Backend())
""")


def distribution(root, dist, module, entry_point, source):
    """A distribution ``dist`` in its own folder under ``root``: its module and its one ``qadapt`` entry point."""
    folder = root / dist
    info = folder / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[qadapt]\n{entry_point} = {module}\n")
    (folder / f"{module}.py").write_text(source)
    return folder


def listing(tmp_path, *folders, code=None, **env):
    """What a fresh process run from ``tmp_path`` with ``folders`` first on sys.path registers and records."""
    code = code or textwrap.dedent("""
        import json, qadapt
        from qadapt.plugins import failures, registrations
        print(json.dumps({
            "backends": {name: [r.plugin, r.builtin, type(r.backend).__module__] for name, r in registrations().items()},
            "failures": [f.to_dict() for f in failures()],
        }))
    """)
    path = os.pathsep.join([str(folder) for folder in folders] + [os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "PYTHONPATH": path, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_plugin_registering_a_built_in_name_is_reported_and_never_preferred(tmp_path):
    """Was: a distribution earlier on sys.path registering 'bnb' owned backend='bnb' (issue 15, 2)."""
    evil = distribution(tmp_path, "evil-dist", "evil_bnb", "evil", BACKEND.format(name="bnb"))
    found = listing(tmp_path, evil)
    assert found["backends"]["bnb"] == ["bnb", True, "qadapt_plugins.bnb"]
    refusal = [f for f in found["failures"] if f["plugin"] == "evil"]
    assert refusal and "reserved for qadapt's built-in backend" in refusal[0]["error"]
    # the plugin switch can never select it either
    assert listing(tmp_path, evil, QADAPT_LOAD_PLUGINS="bnb,evil")["backends"]["bnb"][2] == "qadapt_plugins.bnb"


def test_an_entry_point_named_like_a_built_in_is_reported_and_the_built_in_loads(tmp_path):
    """Was: an entry point itself named 'bnb' made the built-in vanish with no failure, and QADAPT_LOAD_PLUGINS=bnb
    then selected the impostor (issue 15, 2)."""
    same = distribution(tmp_path, "same-name", "same_name", "bnb", BACKEND.format(name="bnbx"))
    for env in ({}, {"QADAPT_LOAD_PLUGINS": "bnb"}):
        found = listing(tmp_path, same, **env)
        assert found["backends"]["bnb"] == ["bnb", True, "qadapt_plugins.bnb"] and "bnbx" not in found["backends"]
        assert [f for f in found["failures"] if f["stage"] == "reserved" and "'same-name'" in f["error"]]


def test_an_entry_point_name_two_distributions_declare_is_reported_and_neither_loads(tmp_path):
    one = distribution(tmp_path, "one-dist", "one_mod", "twin", BACKEND.format(name="one"))
    two = distribution(tmp_path, "two-dist", "two_mod", "twin", BACKEND.format(name="two"))
    found = listing(tmp_path, one, two)
    assert "one" not in found["backends"] and "two" not in found["backends"]
    ambiguous = [f for f in found["failures"] if f["stage"] == "ambiguous"]
    assert ambiguous and "'one-dist' and 'two-dist'" in ambiguous[0]["error"]


def test_a_fake_qadapt_distribution_cannot_declare_built_ins(tmp_path):
    """The built-in names come from the distribution the running qadapt package was installed from."""
    fake = tmp_path / "fake"
    info = fake / "qadapt_lm-9.9.dist-info"  # named like qadapt's own distribution
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qadapt-lm\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text("[qadapt]\nbnb = evil_bnb\n")
    (fake / "evil_bnb.py").write_text(BACKEND.format(name="bnb"))
    found = listing(tmp_path, fake)
    assert found["backends"]["bnb"][2] == "qadapt_plugins.bnb"
    assert [f for f in found["failures"] if "is not the installed qadapt" in f["error"]]


def test_a_slow_plugin_is_named_with_its_time_by_doctor(tmp_path):
    """The plugin's import advances qadapt's clock by 30 s (no real waiting)."""
    slow = distribution(tmp_path, "slow-dist", "slow_mod", "slow",
                        "import builtins\nbuiltins.FAKE_CLOCK[0] += 30.0\n" + BACKEND.format(name="slow"))
    code = textwrap.dedent("""
        import builtins, json
        builtins.FAKE_CLOCK = [0.0]
        import qadapt.plugins
        qadapt.plugins._clock = lambda: builtins.FAKE_CLOCK[0]
        from qadapt.cli import doctor
        doctor.run()
        print(json.dumps(doctor.findings()["slow_plugins"]))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "QADAPT_LOAD_PLUGINS": "slow",
                                 "PYTHONPATH": os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "slow: 30.0 s to import and register" in result.stdout
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [{"plugin": "slow", "seconds": 30.0}]


# ------------------------------------------------------------------------------------------------ in-process
class Minimal(_Named):
    """test_plugins' smallest backend, with attributes to break it with."""

    def __init__(self, name="minimal", **attributes):
        super().__init__(name)
        for key, value in attributes.items():
            setattr(self, key, value)


plugin_name = test_plugins.plugin_name  # the fixture: a registered plugin's name, unregistered after the test


def failure_of(name):
    found = [f for f in failures() if f.plugin == name]
    assert found, f"no failure recorded for {name}"
    return found[0]


class EnvironmentRaises(Minimal):
    def __init__(self, name, exc):
        super().__init__(name)
        self.exc = exc

    def check_environment(self):
        raise self.exc


@pytest.mark.parametrize("exc", [RuntimeError("env boom"), SystemExit(3)], ids=["raises", "sys-exit"])
def test_an_environment_check_that_raises_is_a_failed_row_not_a_crash(plugin_name, exc, capsys, monkeypatch):
    """Was: `qadapt backends` and `doctor` crashed, or exited with rc 3 on sys.exit(3) (issue 15, 10)."""
    import qadapt.plugins
    from qadapt.cli import main
    from qadapt.cli.backends import backend_rows

    register_plugin(plugin(lambda register: register(EnvironmentRaises("envcheck", exc))), plugin_name)
    everything = qadapt.plugins.registrations()
    # the listing checks every backend's environment (importing its library): two are enough here
    monkeypatch.setattr(qadapt.plugins, "registrations", lambda: {k: everything[k] for k in ("bnb", "envcheck")})
    rows = {row["name"]: row for row in backend_rows()}
    assert rows["envcheck"]["status"] == "failed" and "environment check raised" in rows["envcheck"]["reason"]
    assert rows["bnb"]["status"] in ("ok", "unavailable")
    assert main(["backends"]) == 0 and main(["doctor"]) == 1  # doctor's exit code says a plugin failed
    assert "environment check raised" in capsys.readouterr().out
    with pytest.raises(qadapt.BackendUnavailableError, match="environment check raised"):
        qadapt.load("anything", backend="envcheck")


def test_a_hook_calling_sys_exit_is_recorded_and_the_program_goes_on(plugin_name):
    def exits(register):
        raise SystemExit(3)

    register_plugin(plugin(exits), plugin_name)
    assert failure_of(plugin_name).stage == "register" and "SystemExit" in failure_of(plugin_name).error


class TableRaises(Minimal):
    matrix_variants = ({}, {"mode": "broken"})
    options = (qadapt.Option("mode", "fine", "test", choices=("fine", "broken")),)

    def capabilities(self, options):
        if options["mode"] == "broken":
            raise RuntimeError("table boom")
        return super().capabilities(options)


def test_capabilities_that_raise_are_that_backends_rows_only(plugin_name, capsys):
    """Was: `qadapt matrix` crashed for every backend (issue 15, 10)."""
    from qadapt.cli import main
    from qadapt.testing.matrix import declared_rows

    register_plugin(plugin(lambda register: register(TableRaises("tableraises"))), plugin_name)
    rows = declared_rows()
    broken = [row for row in rows if row["backend"] == "tableraises"]
    assert broken and all("table boom" in row["reason"] and not row["supported"] for row in broken)
    assert [row for row in rows if row["backend"] == "bnb" and row["supported"]]
    assert main(["matrix"]) == 0 and "| tableraises |" in capsys.readouterr().out


@pytest.mark.parametrize("bad, why", [
    (Minimal(5), "has no name"),
    (Minimal(["bnb"]), "has no name"),
    (Minimal("badopts", options=("bits",)), "options must be qadapt.Option instances"),
    (Minimal("badopts", options=(qadapt.Option(5, 1, "x"),)), "option names must be identifiers"),
    (Minimal("badopts", options=qadapt.Option("x", 1, "x")), "options must be a tuple"),
], ids=["int-name", "list-name", "str-option", "int-option-name", "option-not-in-tuple"])
def test_non_string_names_and_option_objects_are_refused_at_registration(plugin_name, bad, why):
    """Was: they crashed `qadapt backends` (issue 15, 10); now `contract_problems` refuses them when they register."""
    from qadapt.cli.backends import backend_rows

    register_plugin(plugin(lambda register: register(bad)), plugin_name)
    assert why in failure_of(plugin_name).error
    assert {row["name"] for row in backend_rows(check=False)} >= {"bnb", plugin_name}


def test_two_backends_under_one_name_in_one_plugin_are_refused(plugin_name):
    register_plugin(plugin(lambda register: (register(Minimal("twice")), register(Minimal("twice")))), plugin_name)
    assert "registered twice by this plugin" in failure_of(plugin_name).error and "twice" not in registrations()


class ReturnsNone(Minimal):
    def quantize(self, model, options, calibration=None):
        return None


def test_a_quantize_returning_a_non_model_is_a_qadapt_error_naming_the_backend(plugin_name):
    """Was: an AttributeError further on (issue 15, 10)."""
    from qadapt.testing import toy

    register_plugin(plugin(lambda register: register(ReturnsNone("returnsnone"))), plugin_name)
    with pytest.raises(qadapt.PluginError, match="backend 'returnsnone'.*returned NoneType, not a model"):
        qadapt.load(toy.build_model(), backend="returnsnone")


def test_a_plugin_replacing_torch_functions_is_named_skipped_and_undone(plugin_name):
    import torch

    originals = torch.nn.Linear.forward, torch.nn.Module.__call__, torch.nn.functional.linear

    def patches(register):
        torch.nn.Linear.forward = lambda self, x: x
        torch.nn.Module.__call__ = lambda self, *a, **k: None
        torch.nn.functional.linear = lambda *a, **k: None
        register(Minimal("patcher"))

    try:
        register_plugin(plugin(patches), plugin_name)
        assert (torch.nn.Linear.forward, torch.nn.Module.__call__, torch.nn.functional.linear) == originals
    finally:
        torch.nn.Linear.forward, torch.nn.Module.__call__, torch.nn.functional.linear = originals
    failure = failure_of(plugin_name)
    assert failure.stage == "tamper" and "torch.nn.Linear.forward" in failure.error and "restored" in failure.error
    assert "patcher" not in registrations()


def test_a_plugin_replacing_another_backends_module_is_named_skipped_and_undone(plugin_name):
    original = sys.modules.get("bitsandbytes")
    fake = types.ModuleType("bitsandbytes")

    def replaces(register):
        sys.modules["bitsandbytes"] = fake
        register(Minimal("replacer"))

    try:
        register_plugin(plugin(replaces), plugin_name)
        assert sys.modules.get("bitsandbytes") is original
    finally:
        if original is None:
            sys.modules.pop("bitsandbytes", None)
        else:
            sys.modules["bitsandbytes"] = original
    assert "sys.modules['bitsandbytes']" in failure_of(plugin_name).error and "replacer" not in registrations()


def test_a_plugin_registering_a_built_in_name_in_process_is_refused(plugin_name):
    register_plugin(plugin(lambda register: register(Minimal("hqq"))), plugin_name)
    assert "reserved for qadapt's built-in backend" in failure_of(plugin_name).error
    assert registrations()["hqq"].builtin
