"""Bad input gets qadapt's clear error, before any work, and loses nothing."""

from __future__ import annotations

import os

import pytest
import torch

import qadapt
from qadapt.testing.conformance import _same, _snapshot

from .conftest import backend_ready


def test_unknown_backend(tiny_dir):
    with pytest.raises(qadapt.UnknownBackendError, match="Available: .*bnb"):
        qadapt.load(tiny_dir, backend="bitsandbites")


def test_invalid_option_value_is_refused_before_loading(tiny_dir):
    backend_ready("bnb")
    with pytest.raises(qadapt.InvalidOptionError) as raised:
        qadapt.load(tiny_dir, backend="bnb", bits=5)
    assert "bits must be one of 4, 8" in str(raised.value)


def test_unknown_option_lists_the_valid_ones(tiny_dir):
    backend_ready("hqq")
    with pytest.raises(qadapt.InvalidOptionError, match="Valid options: bits, group_size, compute_dtype"):
        qadapt.load(tiny_dir, backend="hqq", nbits=4)


def test_meaningless_option_combination(tiny_dir):
    backend_ready("bnb")
    with pytest.raises(qadapt.InvalidOptionError, match="4-bit weights only"):
        qadapt.load(tiny_dir, backend="bnb", bits=8, quant_type="fp4")


def test_missing_model_folder_is_not_downloaded():
    backend_ready("bnb")
    with pytest.raises(qadapt.InvalidOptionError, match="never downloads"):
        qadapt.load("meta-llama/Llama-3-8B", backend="bnb")


def test_incompatible_method_is_refused_before_any_change(tiny_dir):
    backend_ready("bnb")
    model = qadapt.load(tiny_dir, backend="bnb", bits=8)
    before = _snapshot(model)
    with pytest.raises(qadapt.IncompatibleError) as raised:
        qadapt.attach(model, "dora")
    error = raised.value
    assert error.asked == "attach 'dora' on backend 'bnb'"
    assert "MatMul8bitLt backward" in error.reason and "bits=4" in error.hint
    assert _same(before, _snapshot(model))
    assert not any("lora" in name for name, _ in model.named_modules())
    assert error.to_dict()["error"] == "IncompatibleError"


def test_unknown_adapter_method(tiny_dir):
    from qadapt.testing import toy

    with pytest.raises(qadapt.InvalidOptionError, match="Choose one of lora, dora, vera, adalora, ia3"):
        qadapt.attach(toy.build_model(), "loha")


def test_adalora_without_total_step_says_what_to_pass(tiny_dir):
    backend_ready("torchao")
    with pytest.raises(qadapt.InvalidOptionError, match="total_step"):
        qadapt.attach(qadapt.load(tiny_dir, backend="torchao"), "adalora")


def test_merge_above_max_error_is_refused_and_changes_nothing(tiny_dir, batches):
    backend_ready("bnb")
    model = qadapt.attach(qadapt.load(tiny_dir, backend="bnb"), "lora", init_lora_weights=False)
    model.eval()
    before = _snapshot(model)
    with torch.no_grad():
        outputs = model(input_ids=batches[0]).logits
    with pytest.raises(qadapt.MergeRefusedError, match="above max_error"):
        qadapt.merge(model, max_error=1e-6)
    assert _same(before, _snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=batches[0]).logits, outputs)
    qadapt.merge(model, max_error=10.0)  # and the same merge with room passes


def test_merge_twice_and_unmerge_without_merge(tiny_dir):
    backend_ready("torchao")
    model = qadapt.attach(qadapt.load(tiny_dir, backend="torchao"), "lora")
    with pytest.raises(qadapt.InvalidOptionError, match="not merged"):
        qadapt.unmerge(model)
    qadapt.merge(model)
    with pytest.raises(qadapt.InvalidOptionError, match="already merged"):
        qadapt.merge(model)


def test_save_refuses_to_overwrite_and_keeps_the_files(tiny_dir, tmp_path):
    backend_ready("torchao")
    model = qadapt.attach(qadapt.load(tiny_dir, backend="torchao"), "lora")
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(qadapt.CheckpointError, match="overwrite=True"):
        qadapt.save(model, target)
    assert (target / "notes.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no partial folder left behind
    qadapt.save(model, target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "qadapt.json").exists()


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    backend_ready("torchao")
    model = qadapt.attach(qadapt.load(tiny_dir, backend="torchao"), "lora")
    return qadapt.save(model, tmp_path_factory.mktemp("ckpt") / "saved")


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_reload_with_a_missing_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    os.remove(os.path.join(path, "adapter", "adapter_model.safetensors"))
    with pytest.raises(qadapt.CheckpointError, match="adapter/adapter_model.safetensors is missing"):
        qadapt.load(path)


def test_reload_with_a_corrupt_weight_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    weights = os.path.join(path, "base", "model.safetensors")
    with open(weights, "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00garbage\x00")
    with pytest.raises(qadapt.CheckpointError, match="base/model.safetensors is corrupt"):
        qadapt.load(path)
    assert os.path.exists(weights)  # nothing deleted


def test_reload_with_a_missing_manifest(saved, tmp_path):
    path = _copy(saved, tmp_path)
    os.remove(os.path.join(path, "qadapt.json"))
    with pytest.raises(qadapt.CheckpointError, match="qadapt.json is missing"):
        qadapt.load(path)


def test_adapter_onto_a_differently_quantized_base_is_refused_or_warned(saved, tiny_dir):
    backend_ready("bnb")
    other = qadapt.load(tiny_dir, backend="bnb", bits=8)
    adapter = os.path.join(saved, "adapter")
    with pytest.raises(qadapt.IncompatibleError, match="backend 'torchao' \\(adapter\\) vs 'bnb' \\(base\\)"):
        qadapt.load_adapter(other, adapter)
    with pytest.warns(UserWarning, match="quantized differently"):
        model = qadapt.load_adapter(other, adapter, strict=False)
    assert model.peft_config["default"].r == 8


def test_an_adapter_moves_between_bases_that_differ_only_in_how_they_run(tiny_dir, tmp_path):
    """Runtime options (a kernel, a compute dtype) are not part of what an adapter was trained on; the rest is."""
    backend_ready("hqq")
    trained = qadapt.attach(qadapt.load(tiny_dir, backend="hqq", compute_dtype="float32"), "lora")
    adapter = os.path.join(qadapt.save(trained, tmp_path / "saved"), "adapter")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        served = qadapt.load_adapter(qadapt.load(tiny_dir, backend="hqq", compute_dtype="bfloat16"), adapter)
    assert not [w for w in caught if "quantized differently" in str(w.message)]
    assert served.peft_config["default"].r == 8
    with pytest.raises(qadapt.IncompatibleError, match="group_size=64 \\(adapter\\) vs 128 \\(base\\)"):
        qadapt.load_adapter(qadapt.load(tiny_dir, backend="hqq", group_size=128), adapter)
