"""Mixture-of-experts models (transformers 5: fused 3-D expert parameters): experts quantized, adapters on them,
routers kept in full precision, and the PEFT and defuser behaviours qadapt works around, each shown still present."""

from __future__ import annotations

import warnings

import pytest
import torch

import qadapt
from qadapt import adapters
from qadapt.testing import panel

from .conftest import backend_ready


def _expert_adapters(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and ".experts" in n]


def test_bnb_quantizes_the_experts_and_keeps_the_routers():
    """transformers' bitsandbytes integration leaves fused experts in float32 (89% of Mixtral's matmul weights),
    silently; qadapt quantizes them with bitsandbytes' parametrization, in the linear layers' 4-bit format."""
    backend_ready("bnb")
    report = qadapt.load_report(qadapt.load(panel.build("qwen2-moe"), backend="bnb", bits=4, quant_type="fp4"))
    experts = [w for w in report.weights if w.kind == "experts"]
    assert len(experts) == 4 and all(w.quantized and w.bytes < w.elements for w in experts)  # < 8 bits each
    kept = {w.name: w.status for w in report.full_precision}
    assert kept == {"model.layers.0.mlp.gate": "kept by design", "model.layers.1.mlp.gate": "kept by design",
                    "model.layers.0.mlp.shared_expert_gate": "kept by design",
                    "model.layers.1.mlp.shared_expert_gate": "kept by design", "lm_head": "kept by design"}


def test_bnb_8bit_refuses_experts_unless_allowed():
    backend_ready("bnb")
    with pytest.raises(qadapt.ArchitectureError, match="no 8-bit parametrization"):
        qadapt.load(panel.build("mixtral"), backend="bnb", bits=8)
    model = qadapt.load(panel.build("mixtral"), backend="bnb", bits=8, allow_unquantized=["*.experts.*"])
    allowed = [w for w in qadapt.load_report(model).full_precision if w.kind == "experts"]
    assert len(allowed) == 4 and all(w.status == "kept, allowed by allow_unquantized" for w in allowed)


def test_lora_on_fused_experts_by_default_and_other_methods_refused():
    backend_ready("bnb")
    model = qadapt.load(panel.build("mixtral"), backend="bnb")
    with pytest.raises(qadapt.ArchitectureError, match="LoRA only"):
        qadapt.attach(model, "dora")
    experts = adapters.target_parameters(model)
    peft_model = qadapt.attach(model, "lora")
    config = peft_model.peft_config["default"]
    assert sorted(config.target_parameters) == sorted(experts)
    assert len(config.target_parameters) == 4 and not any("gate" == t.rsplit(".", 1)[-1] for t in config.target_modules)


def test_peft_param_wrapper_bugs_are_still_there_and_worked_around(monkeypatch):
    """The two PEFT 0.21.2 bugs ``adapters.repair_parameter_wrappers`` works around, on bitsandbytes' parametrized
    experts: (A) every forward stacks one more LoRA proxy; (B) the inner of two nested wrappers has no effect. When a
    PEFT release fixes them, the first half of this test fails: drop the workaround (or its version gate)."""
    backend_ready("bnb")
    batch = torch.randint(0, 512, (2, 16))

    def experts_model(repair):
        monkeypatch.setattr(adapters, "repair_parameter_wrappers", repair)
        model = qadapt.attach(qadapt.load(panel.build("mixtral"), backend="bnb"), "lora", init_lora_weights=False)
        monkeypatch.undo()
        return model

    broken = experts_model(lambda model: 0)
    with torch.no_grad(), pytest.warns(UserWarning, match="Could not find any LoRA parametrization"):
        first, second = broken(input_ids=batch).logits, broken(input_ids=batch).logits
    assert not torch.equal(first, second)  # bug A

    repaired = experts_model(adapters.repair_parameter_wrappers)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(repaired(input_ids=batch).logits, repaired(input_ids=batch).logits)
    repaired.train()
    repaired(input_ids=batch, labels=batch).loss.backward()
    inner = [p for n, p in repaired.named_parameters() if "experts.base_layer.lora_B" in n]
    assert inner and all(p.grad is not None and p.grad.abs().sum() > 0 for p in inner)  # bug B: no gradient before


def test_peft_s_moe_target_rewriting_is_kept_out():
    """PEFT moves targets ending in gate_proj/up_proj/down_proj of Qwen-MoE models to target_parameters that a model
    with split experts does not have: 24 of 32 layers got no adapter (gptq on Qwen3-MoE), with a warning only."""
    backend_ready("hqq")
    import peft

    model = qadapt.load(panel.build("qwen3-moe"), backend="hqq")
    names = adapters.target_names(model, qadapt.get_backend("hqq"), "all-linear")
    rewritten = peft.get_peft_model(model, peft.LoraConfig(target_modules=names))
    assert len(_expert_adapters(rewritten)) == 0  # what PEFT does on its own (warning only)
    rewritten.unload()
    assert len(_expert_adapters(qadapt.attach(model, "lora"))) == 24


def test_defused_experts_reload_and_a_dequantized_merge_saves_a_standard_folder(tmp_path):
    """A model whose experts were split for quantizing records it (qadapt_conversions.json) and reloads into the
    same layout; a de-quantized merge is saved fused again, as a folder plain transformers reads."""
    backend_ready("hqq")
    from transformers import AutoModelForCausalLM

    model = qadapt.attach(qadapt.load(panel.build("qwen3-moe"), backend="hqq"), "lora", init_lora_weights=False)
    model.eval()
    batch = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        adapted = model(input_ids=batch).logits
    qadapt.save(model, tmp_path / "adapter")
    reloaded = qadapt.load(tmp_path / "adapter")
    assert len(_expert_adapters(reloaded)) == 24
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=batch).logits, adapted)
    qadapt.merge(model, "dequantize")
    qadapt.save(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "base").eval()
    assert plain.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 256, 128)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=batch).logits, adapted, atol=1e-4)


def test_defuser_s_process_wide_patches_are_undone():
    """gptqmodel 7.6 calls defuser.replace_fused_blocks on every load: it replaces transformers' MoE block classes
    for the whole process, so any MoE model built later (by any backend) came out with split experts."""
    pytest.importorskip("defuser")
    import contextlib
    import io

    import defuser

    from qadapt.hf import restore_defuser_patches

    with restore_defuser_patches(), contextlib.redirect_stdout(io.StringIO()):
        defuser.replace_fused_blocks("qwen3_moe")
        assert type(panel.build("qwen3-moe").model.layers[0].mlp).__module__.startswith("defuser")  # patched inside
    assert panel.build("qwen3-moe").model.layers[0].mlp.experts.gate_up_proj.dim() == 3
