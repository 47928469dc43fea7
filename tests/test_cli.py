"""The `qadapt` command: backends, matrix, doctor (demo runs in its own nox session)."""

from __future__ import annotations

import json

from qadapt.cli import main
from qadapt.capabilities import METHODS, OPERATIONS


def test_backends_json_lists_name_plugin_version_and_status(capsys):
    assert main(["backends", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"bnb", "hqq", "torchao"} <= set(rows)
    for row in rows.values():
        assert row["status"] in ("ok", "unavailable", "failed")
        if row["status"] != "ok":
            assert row["reason"], row
    assert rows["bnb"]["plugin"] == "bnb" and rows["bnb"]["options"]["bits"]["choices"] == [4, 8]


def test_backends_table_without_checks(capsys):
    assert main(["backends", "--no-check"]) == 0
    assert "bnb" in capsys.readouterr().out


def test_matrix_lists_every_cell(capsys):
    assert main(["matrix", "--backend", "bnb", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    eight_bit = [r for r in rows if r["options"] == {"bits": 8}]
    assert {(r["method"], r["operation"]) for r in eight_bit} == {(m, o) for m in METHODS for o in OPERATIONS}
    dora = [r for r in eight_bit if r["method"] == "dora" and r["operation"] == "train"][0]
    assert dora["supported"] is False and "MatMul8bitLt" in dora["reason"] and dora["hint"]


def test_matrix_markdown(capsys):
    assert main(["matrix", "--backend", "bnb"]) == 0
    out = capsys.readouterr().out
    assert "| bnb | bits=8 | dora | no |" in out and "| bnb | bits=4 | lora | yes | yes | yes | yes | yes |" in out


def test_matrix_verify_runs_and_records(tmp_path, capsys):
    out = tmp_path / "torchao.json"
    assert main(["matrix", "--verify", "--backend", "torchao", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["versions"]["torch"] and data["versions"]["torchao"]
    outcomes = {r["outcome"] for r in data["results"]}
    assert "passed" in outcomes and not any(o.startswith("failed") for o in outcomes)


def test_doctor_reports_versions_and_each_backend(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "peft " in out
    assert "[ok  ] bnb" in out
