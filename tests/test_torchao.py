"""torchao's NF4 scheme (``scheme="nf4"``: torchao's NF4Tensor): what it holds, merges, trains and refuses. Its capability
cells run in the conformance kit (tests/test_capabilities.py); training sharded from two processes is in
tests/test_distributed.py."""

from __future__ import annotations

import os

import pytest
import torch

import qadapt
from qadapt.errors import ArchitectureError, IncompatibleError
from qadapt.testing import toy

from .conftest import backend_ready


@pytest.fixture
def nf4_lora():
    backend_ready("torchao")
    return qadapt.attach(qadapt.load(toy.build_model(), backend="torchao", scheme="nf4"), "lora", r=8)


def nf4_layers(model):
    """``{name: layer}`` of the NF4 layers, named as in the base model (PEFT's ``.base_layer`` left out: a merged
    layer takes its wrapper's place)."""
    return {name.replace(".base_layer", ""): module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and type(module.weight).__name__ == "NF4Tensor"}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_linear_layer_but_the_head_holds_an_nf4_tensor(nf4_lora):
    layers = nf4_layers(nf4_lora)
    assert len(layers) == 14 and not any("lm_head" in name for name in layers)
    assert [w.name for w in qadapt.load_report(nf4_lora).full_precision] == ["lm_head"]


def test_weights_nf4_cannot_hold_are_refused_before_any_work():
    """64 x 128 key/value weights (2 KV heads) are 8,192 weights: not a whole NF4 scale group."""
    backend_ready("torchao")
    with pytest.raises(ArchitectureError, match="16,384"):
        qadapt.load(toy.build_model(num_key_value_heads=2), backend="torchao", scheme="nf4")


def test_a_grid_merge_of_an_unchanged_weight_keeps_every_code(nf4_lora):
    """LoRA starts with B = 0: the merged weight is the de-quantized base, which lies on the layer's own NF4 grid,
    so rounding it onto that grid gives back every code and scale; the fresh quantization (PEFT's way) need not."""
    before = {name: layer.weight for name, layer in nf4_layers(nf4_lora).items()}
    report = qadapt.merge(nf4_lora, "requantize", policy="grid")
    after = nf4_layers(nf4_lora)
    assert after.keys() == before.keys() and report.output_error < 1e-6
    for name, layer in after.items():
        assert layer.weight is not before[name]  # a merged layer was built
        for inner in ("quantized_data", "quantized_scalers", "quantization_factor"):
            assert torch.equal(getattr(layer.weight, inner), getattr(before[name], inner)), (name, inner)
    qadapt.unmerge(nf4_lora)
    assert all(layer.weight is before[name] for name, layer in nf4_layers(nf4_lora).items())


def test_a_merge_keeps_what_a_trained_adapter_does(nf4_lora):
    with torch.no_grad():
        for name, param in nf4_lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    adapted = logits(nf4_lora, ids)
    with nf4_lora.disable_adapter():
        effect = ((logits(nf4_lora, ids) - adapted).norm() / adapted.norm()).item()
    errors = {}
    for policy in ("fresh", "grid", "best"):
        qadapt.merge(nf4_lora, "requantize", policy=policy, calibration=ids)
        errors[policy] = ((logits(nf4_lora, ids) - adapted).norm() / adapted.norm()).item()
        qadapt.unmerge(nf4_lora)
    assert max(errors.values()) < 0.8 * effect, (errors, effect)  # seen: fresh 0.157, grid 0.243, best 0.157 of 1.03
    assert torch.equal(logits(nf4_lora, ids), adapted)


def test_prepare_fast_trains_like_the_plain_path(nf4_lora):
    backend_ready("torchao")
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))

    def one_step(model):
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = one_step(nf4_lora)
    fast = qadapt.attach(qadapt.load(toy.build_model(), backend="torchao", scheme="nf4"), "lora", r=8)
    report = qadapt.prepare(fast, "fast", strict=True)
    loss, grads = one_step(fast)
    assert len(report.parts["lora"].modules) == 14
    assert abs(loss - plain_loss) / plain_loss < 1e-5
    assert grads.keys() == plain_grads.keys()
    assert max(((grads[n] - plain_grads[n]).norm() / plain_grads[n].norm().clamp_min(1e-12)).item()
               for n in grads) < 1e-4


def test_saving_is_refused_and_the_route_the_refusal_names_works(nf4_lora, tmp_path, tiny_dir):
    """transformers cannot serialize NF4Tensor: qadapt.save refuses, writing nothing; the hint's route (the adapter
    alone in PEFT's format, put back on the base quantized again from its folder) gives the same model."""
    model = qadapt.attach(qadapt.load(str(tiny_dir), backend="torchao", scheme="nf4"), "lora", r=8,
                          init_lora_weights=False)
    with pytest.raises(IncompatibleError, match="NF4Tensor") as refusal:
        qadapt.save(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert "model.save_pretrained" in str(refusal.value) and "qadapt.load_adapter" in str(refusal.value)
    model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.warns(UserWarning):  # a plain PEFT folder: qadapt cannot check what base it was trained on
        again = qadapt.load_adapter(qadapt.load(str(tiny_dir), backend="torchao", scheme="nf4"), str(tmp_path / "adapter"))
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    model.eval()
    assert torch.equal(logits(again, ids), logits(model, ids))
