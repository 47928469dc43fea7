"""The contract, stated as properties and checked on generated input (hypothesis): whatever the options of ``load``,
``attach``, ``merge`` and ``load_adapter``, and whatever a checkpoint's ``qadapt.json`` says, qadapt either succeeds
or raises a QadaptError, and then the model and the files are bit for bit as they were.

CI runs the bounded, derandomized ``ci`` profile (a few hundred examples, under a minute here); ``nox -s properties``
runs the ``long`` one (``QADAPT_HYPOTHESIS_PROFILE=long``)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qadapt
from qadapt.testing import toy

from .conftest import backend_ready
from .hostile_support import model_state, same_state, tree

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1500, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("QADAPT_HYPOTHESIS_PROFILE", "ci")
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
_TEMPLATES: dict = {}


def fresh(kind: str):
    """A fresh copy of a tiny model: "plain" (full precision), "lora" (with a LoRA adapter of non-zero weights)."""
    if kind not in _TEMPLATES:
        model = toy.build_model(**SMALL)
        _TEMPLATES[kind] = qadapt.attach(model, "lora", r=2, init_lora_weights=False) if kind == "lora" else model
    return copy.deepcopy(_TEMPLATES[kind])


def refused_cleanly(model, action):
    """Run ``action``: success is fine; a QadaptError must leave ``model`` as it was; anything else fails."""
    before = model_state(model)
    try:
        return action()
    except qadapt.QadaptError:
        assert same_state(before, model_state(model))
        return None


junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=6), st.lists(st.integers(-1, 200), max_size=3))


# ------------------------------------------------------------------------------------------------ attach
attach_options = st.fixed_dictionaries({}, optional={
    "r": st.one_of(st.integers(-2, 80), junk),
    "lora_alpha": st.one_of(st.integers(-4, 64), st.floats(-10, 100), junk),
    "lora_dropout": st.one_of(st.floats(-0.5, 1.5), junk),
    "bias": st.one_of(st.sampled_from(["none", "all", "lora_only", "vera_only", "x"]), junk),
    "init_lora_weights": st.sampled_from([True, False, "gaussian"]),
    "total_step": st.one_of(st.integers(-1, 10), junk),
    "target_modules": st.one_of(st.sampled_from(["all-linear", ["q_proj"], ["q_proj", "input_layernorm"], [],
                                                 ["nothing"], "(", ".*v_proj", "model", [None]]), junk),
    "adapter_name": st.one_of(st.sampled_from(["default", "other", "../x", "/tmp", "a.b", ""]), junk),
})


@settings(settings.get_profile(PROFILE))
@given(method=st.sampled_from(["lora", "dora", "vera", "adalora", "ia3", "loha", None]), options=attach_options)
def test_attach_succeeds_or_refuses_with_the_model_unchanged(method, options):
    model = fresh("plain")
    refused_cleanly(model, lambda: qadapt.attach(model, method, **options))


# ------------------------------------------------------------------------------------------------ load
valid_load_options = st.fixed_dictionaries({}, optional={
    "bits": st.sampled_from([1, 2, 3, 4, 8]),
    # widths 32 and 64: larger groups do not divide them (refusing those up front is issue 12's load-scope check)
    "group_size": st.sampled_from([16, 32]),
    "compute_dtype": st.sampled_from(["auto", "float32"]),
})
load_options = st.one_of(valid_load_options, st.fixed_dictionaries({}, optional={
    "bits": junk, "group_size": st.one_of(st.sampled_from([0, -1, 7, "16"]), junk), "compute_dtype": junk,
    "nbits": junk,
}))
bad_token_ids = st.sampled_from([5, "text", ["text"], [[1, 10**6]], [[-1, 2]], [[1.5, 2.0]], [[]], [None], [[[[1]]]],
                                 {"input_ids": [1]}])
token_batches = st.lists(st.lists(st.integers(0, 127), min_size=1, max_size=6), min_size=1, max_size=2)


@settings(settings.get_profile(PROFILE))
@given(backend=st.one_of(st.just("hqq"), st.sampled_from([None, "nope", 5, ["hqq"]])), options=load_options,
       calibration=st.one_of(st.none(), bad_token_ids, token_batches, junk))
def test_load_succeeds_or_refuses_with_the_model_unchanged(backend, options, calibration):
    backend_ready("hqq")
    model = fresh("plain")
    refused_cleanly(model, lambda: qadapt.load(model, backend=backend, calibration=calibration, **options))


# ------------------------------------------------------------------------------------------------ merge
@settings(settings.get_profile(PROFILE))
@given(strategy=st.one_of(st.sampled_from(["requantize", "dequantize"]), st.sampled_from(["bogus", ["requantize"], 5]),
                          junk),
       max_error=st.one_of(st.none(), st.floats(0, 2), st.sampled_from([math.nan, math.inf, -1.0, "0.1", True, 0]),
                           junk),
       policy=st.one_of(st.none(), st.sampled_from(["best", "fresh", "bogus", ["best"]]), junk),
       calibration=st.one_of(st.none(), token_batches, bad_token_ids, junk))
def test_merge_succeeds_or_refuses_with_the_model_unchanged(strategy, max_error, policy, calibration):
    model = fresh("lora")
    report = refused_cleanly(model, lambda: qadapt.merge(model, strategy, max_error=max_error, policy=policy,
                                                         calibration=calibration))
    if report is not None:
        assert math.isfinite(report.output_error) and (max_error is None or report.output_error <= max_error)
        qadapt.unmerge(model)


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return qadapt.save(fresh("lora"), tmp_path_factory.mktemp("properties") / "saved")


def _manifest(path):
    with open(os.path.join(path, "qadapt.json")) as handle:
        return json.load(handle)


json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False),
                                     st.text(max_size=8)),
                           lambda children: st.one_of(st.lists(children, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), children, max_size=3)),
                           max_leaves=6)
paths = st.one_of(st.sampled_from(["../x", "/etc/hostname", "base/../../x", "base//config.json", "./qadapt.json",
                                   "base/pytorch_model.bin", "adapter/adapter_model.bin", "base", "base/missing",
                                   "adapter/../base/config.json", "\x00", ""]), st.text(max_size=12))
edits = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(["format", "backend", "adapter", "merged", "files", "sizes",
                                               "qadapt_version"]), json_values),
    st.tuples(st.just("delete"), st.sampled_from(["format", "backend", "adapter", "merged", "files", "sizes"]),
              st.none()),
    st.tuples(st.just("backend"), st.sampled_from(["name", "options", "library_version", "quantized_layers"]),
              json_values),
    st.tuples(st.just("file"), paths, st.one_of(st.just("0" * 64), json_values)),
    st.tuples(st.just("size"), paths, st.one_of(st.integers(-1, 10**9), json_values)),
), min_size=1, max_size=3)


def _apply(manifest, edit):
    kind, key, value = edit
    if kind == "set":
        manifest[key] = value
    elif kind == "delete":
        manifest.pop(key, None)
    elif kind == "backend" and isinstance(manifest.get("backend"), dict):
        manifest["backend"][key] = value
    elif kind == "file" and isinstance(manifest.get("files"), dict):
        manifest["files"][key] = value
    elif kind == "size" and isinstance(manifest.get("sizes"), dict):
        manifest["sizes"][key] = value
    return manifest


@settings(settings.get_profile(PROFILE), max_examples=settings.get_profile(PROFILE).max_examples * 2,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=edits)
def test_a_checkpoint_with_any_edited_manifest_loads_or_is_refused_touching_nothing(checkpoint_dir, changes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = shutil.copytree(checkpoint_dir, os.path.join(tmp, "copy"))
        outside = os.path.join(tmp, "x")
        with open(outside, "w") as handle:
            handle.write("outside")
        manifest = _manifest(folder)
        for change in changes:
            manifest = _apply(manifest, change) if isinstance(manifest, dict) else manifest
        with open(os.path.join(folder, "qadapt.json"), "w") as handle:
            json.dump(manifest, handle)
        before = tree(tmp)
        try:
            loaded = qadapt.load(folder)
        except qadapt.QadaptError:
            loaded = None
        assert tree(tmp) == before
        if loaded is not None:  # only edits qadapt does not depend on can load, and then the adapter is there
            assert isinstance(loaded, torch.nn.Module)


@settings(settings.get_profile(PROFILE), suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(provenance=json_values, strict=st.booleans(), config=st.one_of(st.none(), json_values))
def test_load_adapter_of_any_provenance_loads_or_refuses_touching_nothing(checkpoint_dir, provenance, strict, config):
    import warnings

    with tempfile.TemporaryDirectory() as tmp:
        adapter = shutil.copytree(os.path.join(checkpoint_dir, "adapter"), os.path.join(tmp, "adapter"))
        with open(os.path.join(adapter, "qadapt_adapter.json"), "w") as handle:
            json.dump(provenance, handle)
        if config is not None:
            with open(os.path.join(adapter, "adapter_config.json"), "w") as handle:
                json.dump(config, handle)
        before = tree(tmp)
        model = fresh("plain")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            refused_cleanly(model, lambda: qadapt.load_adapter(model, adapter, strict=strict))
        assert tree(tmp) == before
