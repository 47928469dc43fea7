"""What ``qadapt.load`` did, weight by weight: the load report, the backend's declared scope, and the refusal (before
any work) of a load that would leave part of that scope in full precision."""

from __future__ import annotations

import logging

import pytest
import torch

import qadapt
from qadapt.inventory import by_design, cannot, matmul_weights
from qadapt.plugins import register_plugin, unregister_plugin
from qadapt.testing import panel

from .conftest import backend_ready


def test_the_report_lists_every_matmul_weight_and_logs_once(caplog):
    backend_ready("hqq")
    with caplog.at_level(logging.INFO, logger="qadapt"):
        model = qadapt.load(panel.build("llama"), backend="hqq")
    report = qadapt.load_report(model)
    assert len(report.weights) == 15 and len(report.quantized) == 14
    (head,) = report.full_precision
    assert head.name == "lm_head" and head.status == "kept by design" and "output head" in head.reason
    assert 4 < report.bits_per_weight < 12 and 0.8 < report.quantized_share < 0.9
    logged = [r for r in caplog.records if r.name == "qadapt" and "matmul weights quantized" in r.getMessage()]
    assert len(logged) == 1 and "lm_head" in logged[0].getMessage()
    assert str(report).startswith("load with hqq: 14 of 15 matmul weights quantized")


def test_a_model_qadapt_did_not_load_has_no_report():
    assert qadapt.load_report(panel.build("llama")) is None


def test_the_inventory_sees_conv1d_experts_and_routers():
    kinds = {w.name: (w.kind, w.role) for w in matmul_weights(panel.build("gpt2"))}
    assert kinds["transformer.h.0.attn.c_attn"] == ("conv1d", None) and kinds["lm_head"] == ("linear", "head")
    moe = {w.name: (w.kind, w.role, w.shape) for w in matmul_weights(panel.build("qwen2-moe"))}
    assert moe["model.layers.0.mlp.experts.gate_up_proj"] == ("experts", None, (4, 256, 128))
    assert moe["model.layers.0.mlp.gate"][:2] == ("router", "router")  # a TopKRouter, not an nn.Linear
    assert moe["model.layers.0.mlp.shared_expert_gate"][:2] == ("linear", "router")


# ------------------------------------------------------------------------------------------ a third-party backend
class _HalfScope(qadapt.QuantBackend):
    """A backend that declares it cannot quantize the MLPs: its scope is what it says, checked before any work."""

    name = "half-scope"
    peft_dispatchers = ()

    def capabilities(self, options):
        from qadapt.capabilities import declare, no, yes

        never = no("a test backend", "none")
        return declare(train={"lora": yes("plain")}, requantize=never, dequantize=never, save=never)

    def full_precision(self, model, options):
        kept = super().full_precision(model, options)
        kept.update({w.name: cannot("no MLPs here") for w in matmul_weights(model) if ".mlp." in w.name})
        return kept

    def quantize(self, model, options, calibration=None):
        self.calls += 1
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and ".self_attn." in name:
                module.weight = torch.nn.Parameter(module.weight.data.to(torch.int8), requires_grad=False)
        return model

    def quantized_layer_types(self):
        return ()

    def is_quantized_layer(self, module):
        return isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.int8


class _Plugin:
    def __init__(self, backend):
        self.backend = backend

    @qadapt.hookimpl
    def register_backends(self, register):
        register(self.backend)


@pytest.fixture
def half_scope():
    backend = _HalfScope()
    backend.calls = 0
    register_plugin(_Plugin(backend), "half-scope-plugin")
    try:
        yield backend
    finally:
        unregister_plugin("half-scope-plugin")


def test_a_load_below_the_declared_scope_is_refused_before_any_work(half_scope):
    model = panel.build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qadapt.ArchitectureError) as refused:
        qadapt.load(model, backend="half-scope")
    assert "model.layers.0.mlp.gate_proj" in str(refused.value) and "no MLPs here" in str(refused.value)
    assert "allow_unquantized" in str(refused.value)
    assert half_scope.calls == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_allow_unquantized_keeps_them_and_the_report_says_so(half_scope):
    model = qadapt.load(panel.build("llama"), backend="half-scope", allow_unquantized=["*.mlp.*"])
    kept = {w.name: w for w in qadapt.load_report(model).full_precision}
    assert kept["model.layers.1.mlp.down_proj"].status == "kept, allowed by allow_unquantized"
    assert kept["lm_head"].status == "kept by design" and len(kept) == 7


def test_a_weight_left_unquantized_without_being_declared_is_refused(half_scope):
    half_scope.full_precision = lambda model, options: {"lm_head": by_design("head")}  # says nothing of the MLPs
    with pytest.raises(qadapt.IncompatibleError, match="without declaring it: model.layers.0.mlp.gate_proj"):
        qadapt.load(panel.build("llama"), backend="half-scope")


def test_a_folder_is_checked_from_its_config_before_it_is_read(half_scope, tmp_path):
    path = str(tmp_path / "llama")
    panel.build("llama").save_pretrained(path)
    with pytest.raises(qadapt.ArchitectureError):
        qadapt.load(path, backend="half-scope")
    assert half_scope.calls == 0


def test_allow_unquantized_takes_names_only():
    backend_ready("hqq")
    with pytest.raises(qadapt.InvalidOptionError):
        qadapt.load(panel.build("llama"), backend="hqq", allow_unquantized=[3])


# ------------------------------------------------------------------------------------------ memory of MoE models
def test_moe_memory_counts_the_4bit_experts():
    """bitsandbytes' parametrization keeps the experts' QuantState on the parametrization module: storage_bytes
    counts it (it used to miss it), and the report's bits per weight are over every matmul weight, experts
    included (fp32 experts would make it about 29)."""
    backend_ready("bnb")
    from qadapt.memory import storage_bytes

    model = qadapt.load(panel.build("mixtral"), backend="bnb", bits=4)
    report = qadapt.load_report(model)
    experts = [w for w in report.weights if w.kind == "experts"]
    assert len(experts) == 4 and all(w.quantized for w in experts)
    module = model.get_submodule("model.layers.0.mlp.experts")
    packed = module.parametrizations.gate_up_proj.original
    absmax = module.parametrizations.gate_up_proj[0].quant_state.absmax
    assert storage_bytes(module) >= packed.numel() + absmax.numel()  # absmax: uint8 codes with double quant
    assert experts[0].bytes == storage_bytes(module.parametrizations.gate_up_proj)
    assert report.bits_per_weight < 8 and report.quantized_share > 0.9


def test_hqq_layers_whose_weights_do_not_split_into_its_groups_are_refused_before_any_change():
    """Was: group_size=128 on a 130-wide MLP converted the attention layers in place, then HQQ's bit-packing raised
    a raw RuntimeError (issue 15, item 6): the model was left half-converted."""
    backend_ready("hqq")
    from qadapt.testing import toy

    model = toy.build_model(hidden_size=64, intermediate_size=130, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=256)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(qadapt.ArchitectureError, match="do not split into groups of 128"):
        qadapt.load(model, backend="hqq", group_size=128)
    assert all(type(m).__name__ != "HQQLinear" for m in model.modules())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    loaded = qadapt.load(model, backend="hqq", group_size=32)  # 130 x 64 = 260 groups of 32, an even count
    assert [weight.name for weight in qadapt.load_report(loaded).full_precision] == ["lm_head"]
