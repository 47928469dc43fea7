"""docs/compatibility.md rendering: from synthetic records, contradictions must stand out."""

from __future__ import annotations

import json

from tools import compat_docs
from qadapt.capabilities import METHODS, OPERATIONS


def _record(declared_no=("dora",), outcomes=None, gpu=False):
    """A record as `qadapt matrix --verify --output` writes it, for a fake backend 'fake' with options bits=4."""
    outcomes = outcomes or {}
    options = {"bits": 4}
    declared, results = [], []
    for method in METHODS:
        for operation in OPERATIONS:
            supported = method not in declared_no
            declared.append({"backend": "fake", "options": options, "method": method, "operation": operation,
                             "supported": supported, "reason": f"{method} {operation} reason",
                             "hint": "" if supported else "use lora"})
            if supported:
                outcome = outcomes.get((method, operation), "passed")
            else:
                outcome = "refused as declared" if operation == "train" else "skipped"
            results.append({"backend": "fake", "method": method, "operation": operation, "declared": supported,
                            "outcome": outcome, "detail": "", "options": options})
    return {"date": "2026-11-23T10:00:00+00:00", "seconds": 12.5, "command": "qadapt matrix --verify --backend fake",
            "machine": {"python": "3.11.9", "cpus": 2, "cuda": gpu, "gpu": "NVIDIA H100 80GB HBM3" if gpu else None},
            "versions": {"torch": "2.13.0", "transformers": "5.23.0", "peft": "0.21.2", "fakelib": "1.0"},
            "environments": {"fake": {"ok": True, "reason": ""}}, "declared": declared, "results": results}


def _write(tmp_path, name, record):
    (tmp_path / name).write_text(json.dumps(record))


def _row(text, method, operation):
    rows = [line for line in text.splitlines()
            if line.startswith("|") and line.replace("*", "").split("|")[1:3] == [f" {method} ", f" {operation} "]]
    assert len(rows) == 1, rows
    return rows[0]


def test_clean_cpu_run_renders_every_cell_and_no_gpu_yet(tmp_path):
    _write(tmp_path, "fake-cpu.json", _record())
    text = compat_docs.render(compat_docs.load_records(str(tmp_path)))
    assert "No declaration is contradicted by a recorded run." in text and "**CONTRADICTED**:" not in text
    assert "### fake: bits=4" in text
    for method in METHODS:
        for operation in OPERATIONS:
            _row(text, method, operation)
    lora = _row(text, "lora", "merge")
    assert "| yes | lora merge reason | passed | not yet run on GPU |" in lora
    dora = _row(text, "dora", "train")
    assert "| no | dora train reason. Instead: use lora | refused as declared |" in dora
    assert "skipped" in _row(text, "dora", "save")
    # versions, machine, command and date of the run
    assert "peft 0.21.2" in text and "CPU only (2 cores)" in text
    assert "`qadapt matrix --verify --backend fake` on 2026-11-23T10:00:00+00:00" in text
    n = len(OPERATIONS)  # 4 methods pass every operation; dora's train is refused and its other operations skipped
    assert f"| fake | {4 * n} passed, 1 refused, {n - 1} skipped (2026-11-23) | not yet run on GPU |" in text


def test_contradictions_stand_out(tmp_path):
    cpu = _record(outcomes={("vera", "merge"): "failed"})
    for result in cpu["results"]:
        if (result["method"], result["operation"]) == ("vera", "merge"):
            result["detail"] = "output error 0.9 < 0.8 x the adapter's own effect (0.5)"
        if (result["method"], result["operation"]) == ("dora", "train"):
            result["outcome"] = "failed: declared unsupported, but it worked"
    _write(tmp_path, "fake-cpu.json", cpu)
    _write(tmp_path, "fake-gpu.json", _record(gpu=True))
    text = compat_docs.render(compat_docs.load_records(str(tmp_path)))

    assert "## Declarations contradicted by a run" in text
    assert "No declaration is contradicted" not in text
    vera = _row(text, "vera", "merge")
    assert vera.startswith("| **vera** | **merge** | yes |")
    assert "**CONTRADICTED**: failed: output error 0.9" in vera and vera.endswith("| passed |")
    dora = _row(text, "dora", "train")
    assert "**CONTRADICTED**: failed: declared unsupported, but it worked" in dora
    summary = text.split("## Declarations contradicted by a run")[1].split("##")[0]
    assert "fake (bits=4) vera merge on CPU: declared yes" in summary
    assert "fake (bits=4) dora train on CPU: declared no" in summary
    assert "GPU" not in summary  # the GPU run agreed everywhere
    assert "NVIDIA H100 80GB HBM3" in text
    n = len(OPERATIONS)
    assert f"| fake | {4 * n - 1} passed, {n - 1} skipped, 2 **contradicted** (2026-11-23) | {4 * n} passed, 1 refused" in text


def test_unavailable_backend_and_stale_declaration(tmp_path):
    record = _record()
    record["environments"] = {"fake": {"ok": False, "reason": "fakelib needs CUDA"}}
    record["results"] = [{"backend": "fake", "options": {"bits": 4}, "outcome": "unavailable", "detail": "fakelib needs CUDA"}]
    _write(tmp_path, "fake-cpu.json", record)
    text = compat_docs.render(compat_docs.load_records(str(tmp_path)))
    assert "| unavailable (see above) | not yet run on GPU |" in _row(text, "lora", "train")
    assert "- CPU: unavailable: fakelib needs CUDA" in text
    assert "Backend unavailable there: fakelib needs CUDA" in text
    assert "**CONTRADICTED**:" not in text

    # the plugin now declares dora trainable, but the recorded run refused it: the row says to re-run
    _write(tmp_path, "fake-cpu.json", _record())
    live = {("fake", json.dumps({"bits": 4}), m, o): {"options": {"bits": 4}, "method": m, "operation": o,
                                                       "supported": True, "reason": "now works", "hint": ""}
            for m in METHODS for o in OPERATIONS}
    text = compat_docs.render(compat_docs.load_records(str(tmp_path)), live=live)
    dora = _row(text, "dora", "train")
    assert "| yes | now works |" in dora and "**STALE**" in dora
    assert "## Stale records" in text


def test_pairs_recorded_from_junit_and_rendered(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_workflow" name="test_a"/>'
        '<testcase classname="tests.test_workflow" name="test_b"><failure message="AttributeError: no foo">x</failure></testcase>'
        '<testcase classname="tests.test_workflow" name="test_c"><skipped message="gpu"/></testcase>'
        "</testsuite></testsuites>")
    record = compat_docs.record_pair(str(junit), str(tmp_path / "compat-x.json"), "nox -s compat")
    assert record["counts"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1} and not record["passed"]
    assert record["versions"]["peft"] and record["versions"]["transformers"]
    text = compat_docs.render({}, compat_docs.load_pairs(str(tmp_path)))
    assert "| **failed** | 1 passed, 1 failed, 0 errors, 1 skipped |" in text
    assert "`tests.test_workflow::test_b`: AttributeError: no foo" in text


def test_cli_writes_the_page(tmp_path):
    _write(tmp_path, "fake-cpu.json", _record())
    out = tmp_path / "compatibility.md"
    assert compat_docs.main([str(tmp_path), str(out), "--no-live"]) == 0
    assert out.read_text().startswith("# Compatibility")


def test_cells_checked_on_a_stored_checkpoint_say_so(tmp_path):
    record = _record()
    for result in record["results"]:
        result["source"] = "the stored checkpoint tests/data/fake-tiny (quantizing is unavailable here: needs CUDA)"
    _write(tmp_path, "fake-cpu.json", record)
    text = compat_docs.render(compat_docs.load_records(str(tmp_path)))
    assert "- CPU: the cells were checked on the stored checkpoint tests/data/fake-tiny" in text
    assert text.count("the cells were checked on") == 1


def test_failure_paths_are_shortened():
    message = "ImportError: cannot import name 'X' from 'torchao.quantization' (/tmp/env/lib/python3.11/site-packages/torchao/quantization/__init__.py)"
    assert compat_docs._short_path(message).endswith("(torchao/quantization/__init__.py)")
