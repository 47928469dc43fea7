"""`qadapt demo` runs end to end (here for one backend and two steps; `nox -s demo` runs all of them)."""

from __future__ import annotations

from qadapt.cli.demo import demo as run

from .conftest import backend_ready


def test_demo_prints_progress_and_a_table(capsys):
    backend_ready("torchao")
    assert run(["torchao"], steps=2) == 0
    out = capsys.readouterr().out
    assert "[torchao] step 2/2 loss" in out
    row = [line for line in out.splitlines() if line.startswith("torchao ")][-1]
    assert row.rstrip().endswith("ok")
    assert "loss before" in out and "merge error" in out
