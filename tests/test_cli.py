"""The `qadapt` command: the whole job (quantize, inspect, merge, export) and the machine (backends, matrix, doctor;
demo runs in its own nox session)."""

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


# ------------------------------------------------------------------------------------------------ the whole job
import os  # noqa: E402

import pytest  # noqa: E402

from .conftest import backend_ready  # noqa: E402


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_dir, tmp_path_factory):
    """`qadapt quantize` a tiny folder, then a LoRA adapter saved from Python, as a user would."""
    backend_ready("hqq")
    import qadapt

    root = tmp_path_factory.mktemp("cli")
    assert main(["quantize", str(tiny_dir), str(root / "q4"), "--backend", "hqq", "-o", "bits=4", "-o", "group_size=64"]) == 0
    model = qadapt.attach(qadapt.load(str(root / "q4")), "lora", init_lora_weights=False)
    return qadapt.save(model, root / "trained"), root


def test_quantize_writes_a_checkpoint_with_the_asked_options(trained_checkpoint):
    import qadapt

    _, root = trained_checkpoint
    manifest = qadapt.checkpoint.read_manifest(str(root / "q4"))
    assert manifest["backend"]["name"] == "hqq" and manifest["backend"]["options"]["group_size"] == 64


def test_inspect_says_what_a_checkpoint_holds(trained_checkpoint, capsys):
    path, _ = trained_checkpoint
    assert main(["inspect", str(path), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["kind"] == "qadapt checkpoint" and found["backend"]["name"] == "hqq"
    assert found["adapter"]["method"] == "lora" and found["quantized_layers"] == 14
    assert found["unquantized_linear_layers"] == ["lm_head"]
    # the load report: bits per weight over every matmul weight, and why each full-precision one is
    assert 4 < found["bits_per_weight"] < 16 and found["full_precision"] == {
        "lm_head": "kept by design: output head: kept in full precision, as transformers' quantizers do"}


def test_inspect_says_when_a_folder_lacks_its_models_weights(tiny_dir, tmp_path, capsys):
    """An HQQ model's save_pretrained folder: HQQ's tensors, no quantization_config. It is not loaded (the weights
    transformers would start at random are named), as qadapt.load refuses it."""
    import qadapt

    backend_ready("hqq")
    folder = tmp_path / "saved-pretrained"
    qadapt.load(str(tiny_dir), backend="hqq").save_pretrained(folder)
    assert main(["inspect", str(folder), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["loaded"] is False and found["quantization"] is None
    assert "14 of the model's weights are missing from the folder" in found["note"] and "W_q" in found["note"]


def test_merge_refused_above_max_error_writes_nothing_and_exits_2(trained_checkpoint, capsys):
    path, root = trained_checkpoint
    assert main(["merge", str(path), str(root / "refused"), "--max-error", "1e-9", "--json"]) == 2
    error = json.loads(capsys.readouterr().out)
    assert error["error"] == "MergeRefusedError" and error["report"]["layers"]
    assert not (root / "refused").exists()


def test_merge_and_export_write_what_they_say(trained_checkpoint, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    path, root = trained_checkpoint
    assert main(["merge", str(path), str(root / "merged")]) == 0
    assert (root / "merged" / "qadapt.json").exists() and not (root / "merged" / "adapter").exists()
    assert main(["export", str(path), str(root / "fp16"), "--format", "merged-16bit"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(root / "fp16")
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in plain.modules())
    assert main(["export", str(path), str(root / "adapter"), "--format", "adapter"]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(root / "adapter"))
    assert main(["export", str(path), str(root / "adapter"), "--format", "adapter"]) == 2  # no overwrite unasked
    assert isinstance(plain(input_ids=torch.tensor([[1, 2, 3]])).logits, torch.Tensor)


def test_version_and_unknown_names(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0 and capsys.readouterr().out.startswith("qadapt ")
    for argv in (["matrix", "--backend", "bitsandbytes"], ["matrix", "--verify", "--backend", "bitsandbytes"],
                 ["demo", "--backend", "bitsandbytes"], ["quantize", "x", "y", "--backend", "bitsandbytes"]):
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert "backend 'bitsandbytes'" in error and "Available:" in error and "bnb" in error, error


def test_doctor_exits_1_and_shows_where_a_plugin_failed(capsys):
    import types

    import qadapt
    from qadapt.plugins import register_plugin, unregister_plugin

    module = types.ModuleType("broken_doctor_plugin")

    @qadapt.hookimpl
    def register_backends(register):
        raise RuntimeError("the plugin's own bug")

    module.register_backends = register_backends
    register_plugin(module, "broken-doctor")
    try:
        assert main(["doctor"]) == 1
        out = capsys.readouterr().out
        assert "[FAIL] broken-doctor" in out and "the plugin's own bug" in out and "QADAPT_LOAD_PLUGINS" in out
    finally:
        unregister_plugin("broken-doctor")
