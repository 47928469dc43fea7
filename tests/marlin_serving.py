"""The GPU story of gptq and awq, shared by their test files: gptqmodel's Marlin layers refuse training mode, so an
adapter is trained on the pure-PyTorch kernel (on the GPU) and then served on a Marlin base."""

from __future__ import annotations

import pytest
import torch

import qadapt
from qadapt.testing import toy
from qadapt.errors import IncompatibleError

from .conftest import train_steps


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def train_then_serve_on_marlin(backend_name, backend, batches, tmp_path, *, marlin_class_prefix):
    model = qadapt.load(toy.build_model(), backend_name, calibration=batches, group_size=64, dtype="float16")
    assert model.device.type == "cuda"
    torch_weight = backend.dequantize(model.model.layers[0].mlp.up_proj)

    # train on the torch kernel, on the GPU
    peft_model = qadapt.attach(model, "lora", r=8)
    ids = batches[0].cuda()
    losses = train_steps(peft_model, [ids] * 4)
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0], losses
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    qadapt.save(peft_model, tmp_path / "trained")

    # serve: the same checkpoint on Marlin, the adapter loaded onto it
    marlin = qadapt.load(str(tmp_path / "trained" / "base"), backend_name, kernel="marlin", dtype="float16",
                         group_size=64)
    layer = marlin.model.layers[0].mlp.up_proj
    assert type(layer).__name__.startswith(marlin_class_prefix), type(layer).__name__
    torch.testing.assert_close(backend.dequantize(layer), torch_weight, rtol=2e-3, atol=2e-3)
    with pytest.raises(IncompatibleError, match="training mode"):
        qadapt.attach(marlin, "lora")  # refused before any change
    served = qadapt.load_adapter(marlin, tmp_path / "trained" / "adapter")
    with torch.no_grad():
        got = served(input_ids=ids).logits
        with served.disable_adapter():
            base_only = served(input_ids=ids).logits
    assert rel(got, expected) < 1e-2, rel(got, expected)
    assert rel(base_only, expected) > 10 * rel(got, expected)  # the adapter is what makes them agree

    # the same in one call: the checkpoint itself loaded with another kernel (a runtime option)
    checkpoint_on_marlin = qadapt.load(str(tmp_path / "trained"), kernel="marlin")
    kinds = {type(m).__name__ for m in checkpoint_on_marlin.modules()}
    assert any(kind.startswith(marlin_class_prefix) for kind in kinds), kinds
    with torch.no_grad():
        assert rel(checkpoint_on_marlin(input_ids=ids).logits, got) < 1e-3
