"""Careless and hostile arguments to the API (issue 15, 4, 5, 8, 11, 12): each is a QadaptError raised before any
change, and a model that PEFT fails on half-way is put back exactly as it was."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qadapt
from qadapt.testing import toy

from .conftest import backend_ready
from .hostile_support import model_state, same_state, tree

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=128)


def small(seed=0, **overrides):
    return toy.build_model(seed=seed, **{**SMALL, **overrides})


def unchanged_after(model, action, error=qadapt.QadaptError, match=None):
    before = model_state(model)
    with pytest.raises(error, match=match):
        action()
    assert same_state(before, model_state(model))


# ------------------------------------------------------------------------------------------------ attach
@pytest.mark.parametrize("options, match", [
    ({"r": 0}, "positive integer"), ({"r": -1}, "positive integer"), ({"r": 2.5}, "positive integer"),
    ({"r": "8"}, "positive integer"), ({"r": True}, "positive integer"), ({"r": 10**7}, "above the width"),
    ({"lora_alpha": "16"}, "finite number"), ({"lora_alpha": math.nan}, "finite number"),
    ({"lora_dropout": 2}, r"\[0, 1\)"), ({"lora_dropout": -0.1}, r"\[0, 1\)"), ({"bias": "x"}, "unknown bias"),
    ({"target_modules": ["nothing"]}, "matches no module"), ({"target_modules": []}, "non-empty list"),
    ({"target_modules": "("}, "not a valid regular expression"), ({"target_modules": 5}, "non-empty list"),
    ({"target_modules": [None]}, "non-empty list"), ({"unknown_option": 1}, "has no option"),
])
def test_adapter_options_peft_would_fail_on_are_refused_up_front(options, match):
    """Was: raw ValueError/TypeError/re.error from PEFT or torch, some after LoRA layers were injected (issue 15, 5
    and 11)."""
    model = small()
    unchanged_after(model, lambda: qadapt.attach(model, "lora", **options), qadapt.InvalidOptionError, match)


def test_an_option_peft_would_ignore_is_refused():
    model = small()
    unchanged_after(model, lambda: qadapt.attach(model, "adalora", r=4, total_step=4), qadapt.InvalidOptionError,
                    "PEFT ignores r")


def test_a_peft_failure_half_way_through_attach_leaves_the_model_exactly_as_it_was():
    """PEFT injects q_proj's LoRA layer, then refuses the RMSNorm (not a supported layer): qadapt puts everything back
    (module tree, requires_grad, PEFT's attributes) and says what PEFT said. A retry then works."""
    model = small()
    unchanged_after(model, lambda: qadapt.attach(model, "lora", target_modules=["q_proj", "input_layernorm"]),
                    qadapt.InvalidOptionError, "PEFT refused it .*the model is unchanged")
    assert all(p.requires_grad for p in model.parameters())
    assert qadapt.attach(model, "lora", r=2).get_base_model() is model


def test_a_failed_attach_through_proxies_removes_the_proxies():
    """Was: on hqq, a failed VeRA attach left qadapt's proxy wrappers in the model (issue 15, 5)."""
    backend_ready("hqq")
    model = qadapt.load(small(), backend="hqq", group_size=16)
    unchanged_after(model, lambda: qadapt.attach(model, "vera", target_modules=["q_proj", "input_layernorm"]))
    assert not [m for m in model.modules() if type(m).__name__ == "QuantizedLinearProxy"]
    qadapt.attach(model, "vera", r=4)


def test_attaching_twice_or_with_a_bad_model_is_refused():
    model = qadapt.attach(small(), "lora", r=2)
    inner = model.get_base_model()
    unchanged_after(inner, lambda: qadapt.attach(inner, "lora"), qadapt.InvalidOptionError, "already has")
    for bad in (None, "model", 5):
        with pytest.raises(qadapt.InvalidOptionError):
            qadapt.attach(bad, "lora")
    with pytest.raises(qadapt.InvalidOptionError, match="unknown adapter method"):
        qadapt.attach(small(), ["lora"])


def test_a_load_adapter_that_peft_fails_on_leaves_the_model_exactly_as_it_was(tmp_path):
    """Was: a 32-wide adapter loaded onto a 64-wide base raised after injecting layers (issue 15, 5)."""
    adapter = os.path.join(qadapt.save(qadapt.attach(small(), "lora", r=2), tmp_path / "narrow"), "adapter")
    wide = small(hidden_size=64, intermediate_size=128)
    unchanged_after(wide, lambda: qadapt.load_adapter(wide, adapter), qadapt.CheckpointError, "PEFT could not load it")
    narrow = small()
    assert qadapt.load_adapter(narrow, adapter).get_base_model() is narrow


def test_load_adapter_refuses_pickled_weights_and_bad_folders(tmp_path):
    adapter = os.path.join(qadapt.save(qadapt.attach(small(), "lora", r=2), tmp_path / "saved"), "adapter")
    pickled = shutil.copytree(adapter, tmp_path / "pickled")
    os.remove(os.path.join(pickled, "adapter_model.safetensors"))
    torch.save({}, os.path.join(pickled, "adapter_model.bin"))
    model = small()
    unchanged_after(model, lambda: qadapt.load_adapter(model, pickled), qadapt.CheckpointError, "safetensors only")
    broken = shutil.copytree(adapter, tmp_path / "broken")
    with open(os.path.join(broken, "qadapt_adapter.json"), "w") as handle:
        json.dump([1], handle)
    unchanged_after(model, lambda: qadapt.load_adapter(model, broken), qadapt.CheckpointError, "not qadapt's")
    unchanged_after(model, lambda: qadapt.load_adapter(model, tmp_path / "missing"), qadapt.CheckpointError)
    with pytest.raises(qadapt.InvalidOptionError):
        qadapt.load_adapter(None, adapter)


# ------------------------------------------------------------------------------------------------ load
def test_an_already_quantized_or_adapted_model_is_refused_before_any_change(tiny_dir):
    """Was: a bnb model (or a bnb PeftModel) passed to load(backend='hqq') was re-quantized from packed bytes,
    modifying the input (issue 15, 4)."""
    backend_ready("bnb")
    backend_ready("hqq")
    quantized = qadapt.load(tiny_dir, backend="bnb")
    unchanged_after(quantized, lambda: qadapt.load(quantized, backend="hqq"), qadapt.IncompatibleError,
                    "already quantized with 'bnb'")
    adapted = qadapt.attach(quantized, "lora")
    for carrier in (adapted, adapted.get_base_model()):  # the PeftModel, and the model inside it
        with pytest.raises(qadapt.IncompatibleError, match="carries a PEFT adapter"):
            qadapt.load(carrier, backend="hqq")
    unrecorded = qadapt.load(tiny_dir, backend="bnb")
    del unrecorded.__dict__["_qadapt_record"]  # only the layers say it: found by the registered backends' checks
    unrecorded.hf_quantizer = None
    unrecorded.is_quantized = False
    unchanged_after(unrecorded, lambda: qadapt.load(unrecorded, backend="hqq"), qadapt.IncompatibleError,
                    "already quantized \\('bnb'\\)")
    plain = small()
    plain.hf_quantizer = object()  # transformers' own mark of a quantized model
    unchanged_after(plain, lambda: qadapt.load(plain, backend="hqq"), qadapt.IncompatibleError, "transformers")


@pytest.fixture
def folders(tmp_path, tiny_dir):
    """Folders that are not loadable models."""
    empty = tmp_path / "empty"
    empty.mkdir()
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(os.path.join(tiny_dir, "config.json"), config_only)
    no_type = tmp_path / "no-type"
    no_type.mkdir()
    (no_type / "config.json").write_text("{}")
    listed = tmp_path / "list-config"
    listed.mkdir()
    (listed / "config.json").write_text("[1]")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    os.remove(pickled / "model.safetensors")
    torch.save({}, pickled / "pytorch_model.bin")
    truncated = tmp_path / "truncated"  # a copy or download that stopped half way
    shutil.copytree(tiny_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    shard_missing = tmp_path / "shard-missing"
    shutil.copytree(tiny_dir, shard_missing)
    (shard_missing / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    weight_missing = tmp_path / "weight-missing"  # a hand-edited or half-converted folder
    shutil.copytree(tiny_dir, weight_missing)
    state = load_file(weight_missing / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, weight_missing / "model.safetensors", metadata={"format": "pt"})
    return {"empty": (empty, "no config.json"), "config-only": (config_only, "no safetensors weights"),
            "no-type": (no_type, "not a transformers config"), "list-config": (listed, "not a transformers config"),
            "pickled": (pickled, "safetensors only"), "truncated": (truncated, "model.safetensors is damaged"),
            "shard-missing": (shard_missing, "names weight files the folder does not hold: model-00002-of-00002"),
            "weight-missing": (weight_missing, "1 of the model's weights are missing from the folder, or held there "
                               r"in another shape or as integers \(model.layers.0.mlp.up_proj.weight\); transformers "
                               "would start them at random")}


@pytest.mark.parametrize("kind", ["empty", "config-only", "no-type", "list-config", "pickled", "truncated",
                                  "shard-missing", "weight-missing"])
def test_folders_that_are_not_models_are_refused(folders, kind):
    """Was: ValueError/OSError from transformers (issue 15, 11)."""
    backend_ready("hqq")
    folder, match = folders[kind]
    before = tree(folder)
    with pytest.raises(qadapt.InvalidOptionError, match=match):
        qadapt.load(folder, backend="hqq")
    assert tree(folder) == before


def test_a_quantized_model_saved_without_its_quantization_config_is_not_quantized_again(tmp_path, tiny_dir):
    """Was: ``save_pretrained`` of an HQQ model writes HQQ's tensors and no quantization_config, and
    ``qadapt.load(folder, backend="hqq")`` quantized a model whose every layer transformers had started at random,
    reporting a normal load."""
    backend_ready("hqq")
    folder = tmp_path / "saved-pretrained"
    qadapt.load(tiny_dir, backend="hqq").save_pretrained(folder)
    before = tree(folder)
    for backend in ("hqq", None):
        with pytest.raises(qadapt.InvalidOptionError, match=r"(?s)14 of the model's weights are missing from the "
                           r"folder.*W_q.*without its quantization_config.*qadapt.save"):
            qadapt.load(folder, backend=backend)
    assert tree(folder) == before


@pytest.mark.parametrize("change", ["int8 codes", "transposed"])
def test_weights_held_as_integers_or_in_another_shape_are_not_loaded_as_floats(tmp_path, tiny_dir, change):
    """A full-precision folder whose weight is a quantized layer's int8 codes (what save_pretrained of an EETQ model
    writes, transposed): transformers would cast the codes to floats, or start a weight of another shape at random."""
    backend_ready("hqq")
    folder = tmp_path / "changed"
    shutil.copytree(tiny_dir, folder)
    state = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    weight = state[name]
    state[name] = weight.to(torch.int8) if change == "int8 codes" else weight.t().contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    before = tree(folder)
    with pytest.raises(qadapt.InvalidOptionError, match=f"1 of the model's weights .* as integers \\({name}\\)"):
        qadapt.load(folder, backend="hqq")
    assert tree(folder) == before


@pytest.mark.parametrize("arguments, match", [
    ({"model": None}, "expected a PreTrainedModel or a path"),
    ({"model": 5}, "expected a PreTrainedModel or a path"),
    ({"backend": ["bnb"]}, "a backend is named by a string"),
    ({"backend": 5}, "a backend is named by a string"),
    ({"calibration": 5}, "calibration must be a list"),
    ({"calibration": "text"}, "calibration must be a list"),
    ({"calibration": ["text"]}, "texts need a tokenizer"),
    ({"calibration": [[1, 10**6]]}, "outside the vocabulary"),
    ({"calibration": [[-1, 2]]}, "outside the vocabulary"),
    ({"calibration": [[1.5, 2.0]]}, "must be integers"),
    ({"calibration": [[]]}, "not empty"),
    ({"calibration": [object()]}, "a tensor or a list of integers"),
    ({"calibration": [[[[1]]]]}, "1-D or 2-D"),
    ({"bits": "4"}, "one of|integer"),
], ids=lambda value: repr(value)[:40])
def test_load_arguments_of_the_wrong_kind_are_refused(arguments, match):
    """Was: AttributeError, TypeError or IndexError from deep inside (issue 15, 11)."""
    backend_ready("hqq")
    model = small()
    target = arguments.pop("model", model)
    call = {"backend": "hqq", **arguments}
    unchanged_after(model, lambda: qadapt.load(target, **call), qadapt.InvalidOptionError, match)


# ------------------------------------------------------------------------------------------------ merge
def test_merge_arguments_of_the_wrong_kind_are_refused():
    model = qadapt.attach(small(), "lora", r=2, init_lora_weights=False)
    for arguments, match in [
        ({"max_error": math.nan}, "finite number"), ({"max_error": "0.1"}, "finite number"),
        ({"max_error": -1}, "finite number"), ({"max_error": True}, "finite number"),
        ({"max_error": math.inf}, "finite number"), ({"strategy": ["x"]}, "unknown strategy"),
        ({"strategy": "bogus"}, "unknown strategy"), ({"policy": "bogus"}, "offers no re-quantization policy"),
        ({"policy": ["best"]}, "offers no"), ({"calibration": [[1, 10**6]]}, "outside the vocabulary"),
        ({"calibration": "text"}, "token ids must be"),
    ]:
        unchanged_after(model, lambda: qadapt.merge(model, **arguments), qadapt.InvalidOptionError, match)


def test_an_adapter_holding_inf_or_nan_is_never_merged():
    """Was: an adapter holding inf merged NaN weights, since `error > max_error` is False for NaN (issue 15, 8)."""
    for value in (math.inf, math.nan):
        model = qadapt.attach(small(), "lora", r=2, init_lora_weights=False)
        with torch.no_grad():
            model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] = value
        for max_error in (None, 0.5):
            unchanged_after(model, lambda: qadapt.merge(model, max_error=max_error), qadapt.MergeRefusedError,
                            "NaN or infinite")


def test_a_nan_output_error_is_refused_whatever_max_error(monkeypatch):
    from qadapt.merging import engine

    model = qadapt.attach(small(), "lora", r=2, init_lora_weights=False)
    monkeypatch.setattr(engine, "relative_error", lambda actual, expected: (math.nan, math.nan))
    for max_error in (None, 0.5):
        unchanged_after(model, lambda: qadapt.merge(model, max_error=max_error), qadapt.MergeRefusedError, "NaN")


def test_training_a_merged_model_is_refused_until_unmerged(batches):
    """Was: training after a merge silently trained nothing (issue 15, 12)."""
    model = qadapt.attach(small(vocab_size=512), "lora", r=2)
    batch = batches[0]
    qadapt.merge(model)
    model.train()
    with pytest.raises(qadapt.InvalidOptionError, match="train a merged model"):
        model(input_ids=batch, labels=batch)
    with torch.no_grad():
        model(input_ids=batch)  # running it is fine, in training mode too
    model.eval()
    model(input_ids=batch)
    qadapt.unmerge(model)
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    assert any(p.grad is not None for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ options
def test_option_validation_checks_types_and_ranges():
    from qadapt import Option

    def check(option, value):
        return option.validate("test", value)

    count = Option("n", 3, "a count", minimum=0, maximum=10)
    assert check(count, 0) == 0 and check(count, 10) == 10
    for bad in (-1, 11, 2.0, True, "3", None):
        with pytest.raises(qadapt.InvalidOptionError):
            check(count, bad)
    ratio = Option("ratio", 0.5, "a ratio", type=float, minimum=0.0, maximum=1.0)
    assert check(ratio, 1) == 1.0 and isinstance(check(ratio, 1), float)
    for bad in (math.nan, math.inf, 1.5, True, "0.5"):
        with pytest.raises(qadapt.InvalidOptionError):
            check(ratio, bad)
    names = Option("names", ("a",), "names", type=tuple, items=str)
    assert check(names, ["a", "b"]) == ("a", "b")
    for bad in (5, "a", ["a", 1], None):
        with pytest.raises(qadapt.InvalidOptionError):
            check(names, bad)
    text = Option("mode", "x", "a mode", choices=("x", "y"))
    with pytest.raises(qadapt.InvalidOptionError):
        check(text, 1)
    bits = Option("bits", 4, "bits", choices=(1, 4))
    with pytest.raises(qadapt.InvalidOptionError):
        check(bits, True)  # True == 1, but it is not a bit count


def test_aqlm_options_use_ranges():
    """Was: aqlm accepted kmeans_iterations=-5 and seed=-1; skip_modules=5 crashed (issue 15, 11)."""
    backend = qadapt.get_backend("aqlm")
    for bad in ({"kmeans_iterations": -5}, {"refine_passes": -1}, {"seed": -1}, {"skip_modules": 5},
                {"skip_modules": ["lm_head", 3]}):
        with pytest.raises(qadapt.InvalidOptionError):
            backend.validate_options(bad)
    assert backend.validate_options({"skip_modules": ["lm_head"]})["skip_modules"] == ("lm_head",)
