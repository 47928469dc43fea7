"""HQQ's serving kernel (``kernel="torchao_int4"``): declared serving-only, refused where it cannot run, and on a GPU
a model trained, merged and saved on the default kernel serves the same logits on tinygemm's int4 matmul."""

from __future__ import annotations

import pytest
import torch

import qadapt
from qadapt.capabilities import METHODS
from qadapt.testing import toy

from .conftest import backend_ready


@pytest.fixture
def hqq():
    backend_ready("hqq")
    return qadapt.get_backend("hqq")


def test_the_int4_kernel_is_declared_serving_only_with_the_route_to_it(hqq):
    cells = hqq.capabilities({**hqq.validate_options({}), "kernel": "torchao_int4"})
    for method in METHODS:
        assert not cells[(method, "train")] and "kernel='default'" in cells[(method, "train")].hint
    assert not cells[("lora", "save")] and "kernel='torchao_int4')" in cells[("lora", "train")].hint
    assert hqq.validate_options({})["kernel"] == "default"  # the kernel that trains stays the default


def test_weights_that_do_not_fit_tinygemm_s_tiles_are_declared_before_any_work(hqq):
    from qadapt.testing.toy import build_model

    model = build_model(intermediate_size=192)  # down_proj takes 192 inputs: not a multiple of 128
    limited = {name: kept for name, kept in hqq.full_precision(
        model, {**hqq.validate_options({}), "kernel": "torchao_int4"}).items() if not kept.by_design}
    assert sorted(limited) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all("tinygemm's int4 tiles" in kept.reason for kept in limited.values()), limited
    assert set(hqq.full_precision(model, hqq.validate_options({}))) == {"lm_head"}  # the default kernel takes them


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_the_int4_kernel_is_refused_off_cuda_before_any_work(hqq):
    model = toy.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qadapt.InvalidOptionError, match="runs only on a CUDA GPU.*kernel='default'"):
        qadapt.load(model, backend="hqq", kernel="torchao_int4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.gpu
def test_gpu_train_merge_save_then_serve_on_the_int4_kernel(hqq, tmp_path):
    from qadapt_plugins._hqq_int4 import TinygemmInt4Linear

    with pytest.raises(qadapt.InvalidOptionError, match="4-bit weights only"):
        hqq.validate_options({"kernel": "torchao_int4", "bits": 8})
    with pytest.raises(qadapt.InvalidOptionError, match="bfloat16 only"):
        hqq.validate_options({"kernel": "torchao_int4", "compute_dtype": "float16"})
    model = qadapt.load(toy.build_model(dtype=torch.bfloat16), backend="hqq", compute_dtype="bfloat16")
    peft_model = qadapt.attach(model, "lora", r=8)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    qadapt.merge(peft_model, policy="fresh")
    ids = torch.randint(4, 512, (2, 48), device="cuda")
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits.float()
    qadapt.save(peft_model, tmp_path / "merged")

    served = qadapt.load(str(tmp_path / "merged" / "base"), backend="hqq", kernel="torchao_int4")
    layers = [m for m in served.modules() if isinstance(m, TinygemmInt4Linear)]
    assert len(layers) == 14  # every linear layer but the head: none left on the de-quantizing kernel
    with torch.no_grad():
        got = served(input_ids=ids).logits.float()
        served.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2
    with pytest.raises(qadapt.IncompatibleError, match="kernel='default'"):
        qadapt.attach(served, "lora", r=8)
    # the checkpoint itself, in one call, and a float32 model served on bfloat16's kernel
    served = qadapt.load(tmp_path / "merged", kernel="torchao_int4")
    assert sum(isinstance(m, TinygemmInt4Linear) for m in served.modules()) == 14
    with torch.no_grad():
        assert ((served(input_ids=ids).logits.float() - expected).norm() / expected.norm()).item() < 2e-2
    float32 = qadapt.load(toy.build_model(), backend="hqq", compute_dtype="bfloat16", kernel="torchao_int4")
    with torch.no_grad():
        assert float32(input_ids=ids).logits.dtype == torch.float32


def test_a_half_precision_model_built_in_memory_reloads_in_its_dtype(hqq, tmp_path):
    """A model made in memory and cast to bfloat16 keeps dtype=None in its config; saved as it was, its folder loaded
    the embeddings and norms in float32 beside bfloat16 HQQ layers, and the first forward failed ("expected m1 and m2
    to have the same dtype"; found by the H200 run of the int4-kernel test). The saved config records the dtype."""
    model = qadapt.load(toy.build_model(dtype=torch.bfloat16), backend="hqq", compute_dtype="bfloat16")
    assert model.config.dtype is None  # what the in-memory model says of itself
    ids = torch.randint(4, 512, (1, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    qadapt.save(model, tmp_path / "saved")
    reloaded = qadapt.load(str(tmp_path / "saved"))
    assert {p.dtype for p in reloaded.parameters() if p.is_floating_point()} == {torch.bfloat16}
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    # bf16 rounding only: the in-memory model's rotary table was cast to bfloat16 with it, a model built in
    # bfloat16 keeps it in float32
    assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2
