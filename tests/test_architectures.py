"""Architectures beyond Llama: the conformance kit over a subset of the architecture panel (the full panel is the
``panel`` nox session), and the defects of issue 12 that other architectures showed, each fixed where it lived.

Each ``test_*`` of a defect fails on the code before the fix; the line that used to fail is named in its docstring.
"""

from __future__ import annotations

import pytest
import torch

import qadapt
from qadapt.testing import check_backend, panel

from .conftest import ENGINE_CELLS, backend_ready

#: the default suite's subset: biases + tied embeddings, Conv1D, an nn.Linear subclass, fused MoE experts
ARCHITECTURES = ("qwen2", "gpt2", "falcon", "mixtral")
BACKENDS = {"bnb4": ("bnb", {"bits": 4}), "hqq": ("hqq", {}), "torchao": ("torchao", {})}
#: what the default suite expects to be refused before any work: (architecture, backend) -> words of the reason
REFUSED = {("gpt2", "torchao"): "Conv1D", ("mixtral", "torchao"): "fused MoE expert"}


def _ids(cells):
    return [f"{arch}-{backend}" for arch, backend in cells]


CELLS = [(arch, backend) for arch in ARCHITECTURES for backend in BACKENDS]


@pytest.mark.parametrize("arch,backend", CELLS, ids=_ids(CELLS))
def test_the_kit_passes_or_refuses_before_any_work(arch, backend):
    name, options = BACKENDS[backend]
    backend_ready(name)
    results = check_backend(name, options, methods=["lora"], architecture=arch)
    failures = [str(r) for r in results if not r.ok]
    assert not failures, failures
    refused = [r for r in results if r.outcome == "refused for this architecture"]
    if (arch, backend) in REFUSED:
        assert len(refused) == len(results) and REFUSED[(arch, backend)] in refused[0].detail
    else:
        assert [r.outcome for r in results if r.operation not in ENGINE_CELLS] == ["passed"] * 5


def test_panel_architectures_build_and_run():
    for name in panel.NAMES:
        model = panel.build(name)
        with torch.no_grad():
            assert model(input_ids=torch.randint(0, 512, (1, 8))).logits.shape == (1, 8, 512)


def test_an_unknown_panel_architecture_is_refused():
    with pytest.raises(qadapt.InvalidOptionError, match="not in the panel"):
        check_backend("hqq", architecture="mamba")


# ------------------------------------------------------------------------------------------ the defects, one by one
def test_hqq_saves_tied_embeddings(tmp_path):
    """qadapt_plugins/hqq.py saved ``model.state_dict()`` as is: safetensors refused ``lm_head.weight`` and
    ``model.embed_tokens.weight`` ("Some tensors share memory") on every model with tied embeddings."""
    backend_ready("hqq")
    model = qadapt.attach(qadapt.load(panel.build("qwen2"), backend="hqq"), "lora", init_lora_weights=False)
    batch = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        before = model(input_ids=batch).logits
    qadapt.save(model, tmp_path / "tied")
    restored = qadapt.load(tmp_path / "tied")
    with torch.no_grad():
        assert torch.equal(restored(input_ids=batch).logits, before)
    inner = restored.get_base_model()
    assert inner.lm_head.weight is inner.model.embed_tokens.weight


def test_conv1d_layers_are_quantized_by_layer_replacing_backends(tmp_path):
    """hqq replaced ``nn.Linear`` only: GPT-2's Conv1D layers stayed in full precision (0 of 8) and the load said
    nothing. They are made nn.Linear first (recorded), quantized, and the reload rebuilds that layout."""
    backend_ready("hqq")
    model = qadapt.load(panel.build("gpt2"), backend="hqq")
    report = qadapt.load_report(model)
    assert len(report.quantized) == 8 and [w.name for w in report.full_precision] == ["lm_head"]
    assert len(report.conversions["linearized"]) == 8
    batch = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        before = model(input_ids=batch).logits
    qadapt.save(model, tmp_path / "gpt2")
    with torch.no_grad():
        assert torch.equal(qadapt.load(tmp_path / "gpt2")(input_ids=batch).logits, before)


@pytest.mark.parametrize("bits", [4, 8])
def test_falcon_linear_layers_are_quantized_by_bnb(bits):
    """transformers' replace_with_bnb_linear matches ``type(module) is nn.Linear``: FalconLinear (a subclass) stayed
    in full precision on bnb 4- and 8-bit, silently."""
    backend_ready("bnb")
    report = qadapt.load_report(qadapt.load(panel.build("falcon"), backend="bnb", bits=bits))
    assert len(report.quantized) == 8 and [w.name for w in report.full_precision] == ["lm_head"]


def test_torchao_falcon_runs_a_forward():
    """FalconLinear computes ``input @ self.weight.T``; torchao's Int8Tensor has no ``aten.permute``: the loaded model
    raised NotImplementedError at its first forward."""
    backend_ready("torchao")
    full = panel.build("falcon")
    batch = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        reference = full(input_ids=batch).logits
        quantized = qadapt.load(full, backend="torchao")(input_ids=batch).logits
    assert ((quantized - reference).norm() / reference.norm()).item() < 0.1


def test_attach_on_an_unquantized_gpt2_adapts_what_peft_adapts():
    """qadapt's "all-linear" took nn.Linear and quantized layers only: on a full-precision GPT-2 it refused ("no
    linear or quantized layers") although PEFT's own "all-linear" wraps Conv1D."""
    import peft

    ours = qadapt.attach(panel.build("gpt2"), "lora")
    theirs = peft.get_peft_model(panel.build("gpt2"), peft.LoraConfig(target_modules="all-linear"))
    assert _adapted(ours) == _adapted(theirs) and len(_adapted(ours)) == 8


@pytest.mark.parametrize("strategy", ["requantize", "dequantize"])
def test_merging_over_conv1d_layers_is_exact(strategy, tmp_path, batches):
    """A Conv1D stores its weight (in, out): qadapt's full-precision dequantize returned it as is, so merging an
    adapter over an unquantized GPT-2 added a transposed delta (square layers) or crashed building the merged layer."""
    model = qadapt.attach(panel.build("gpt2"), "lora", init_lora_weights=False)
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=batches[0]).logits
    report = qadapt.merge(model, strategy)
    assert report.output_error < 1e-5
    qadapt.save(model, tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(qadapt.load(tmp_path / "merged")(input_ids=batches[0]).logits, adapted, atol=1e-4)


def test_merging_over_a_layer_the_backend_left_in_full_precision():
    """merge de-quantized every adapted layer with the backend: bnb's dequantize (PEFT's dequantize_bnb_weight)
    raised ValueError on a full-precision layer (Falcon's, before bnb quantized them; here the output head, which
    every backend keeps in full precision). Such layers merge exactly, with plain arithmetic."""
    backend_ready("bnb")
    model = qadapt.attach(qadapt.load(panel.build("llama"), backend="bnb"), "lora",
                          target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model.eval()
    batch = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        before = model(input_ids=batch).logits
    report = qadapt.merge(model, "dequantize")
    assert report.output_error < 1e-4 and {layer.name.rsplit(".", 1)[-1] for layer in report.layers} == {"q_proj", "lm_head"}
    qadapt.unmerge(model)
    report = qadapt.merge(model)
    head = [layer for layer in report.layers if layer.name.endswith("lm_head")][0]
    assert head.kept_error < 1e-6  # the full-precision head takes its adapter exactly
    qadapt.unmerge(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, before)


@pytest.mark.parametrize("arch", ["gpt2", "bloom", "llama"])
def test_ia3_feed_forward_layers_are_peft_s(arch):
    """qadapt compared only the last name part with PEFT's mapping, whose GPT-2 and Bloom entries are dotted
    ("mlp.c_proj", "mlp.dense_4h_to_h"): IA3 there scaled no feed-forward input, silently."""
    import peft

    ours = qadapt.attach(panel.build(arch), "ia3")
    theirs = peft.get_peft_model(panel.build(arch), peft.IA3Config(task_type="CAUSAL_LM"))
    assert _feedforward(ours) == _feedforward(theirs) and len(_feedforward(ours)) == 2


def test_ia3_on_an_architecture_peft_has_no_feed_forward_list_for_is_refused():
    """PEFT raises for a model type missing from its IA3 mapping (Phi-3 in PEFT 0.21); qadapt used [] silently."""
    with pytest.raises(qadapt.ArchitectureError, match="feedforward_modules"):
        qadapt.attach(panel.build("phi3"), "ia3")
    model = qadapt.attach(panel.build("phi3"), "ia3", feedforward_modules=["down_proj"])
    assert len(_feedforward(model)) == 2


def _adapted(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from qadapt.inventory import clean_name

    return sorted(clean_name(n) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))


def _feedforward(model):
    from peft.tuners.ia3.layer import IA3Layer

    from qadapt.inventory import clean_name

    return sorted(clean_name(n) for n, m in model.named_modules() if isinstance(m, IA3Layer) and m.is_feedforward)


def test_the_declared_table_has_the_architecture_dimension():
    """`qadapt matrix --architecture ...`: what each backend declares it cannot quantize on an architecture, asked of
    the architecture's model on the meta device (no weights, no work)."""
    backend_ready("torchao")
    from qadapt.testing.matrix import declared_architecture_rows

    rows = {(r["options"].get("scheme"), r["architecture"]): r
            for r in declared_architecture_rows(["torchao"], ["llama", "gpt2", "mixtral"])}
    assert rows[("int8_weight_only", "llama")]["supported"]
    assert not rows[("int8_weight_only", "gpt2")]["supported"] and "Conv1D" in rows[("int8_weight_only", "gpt2")]["reason"]
    assert "fused MoE expert" in rows[("int8_weight_only", "mixtral")]["reason"]


def test_the_architecture_page_is_rendered_from_recorded_runs(tmp_path):
    import json

    from tools import panel_docs

    def row(arch, method, operation, outcome, detail=""):
        return {"backend": "hqq", "options": {}, "architecture": arch, "method": method, "operation": operation,
                "outcome": outcome, "detail": detail}

    refusal = ("load with backend 'hqq': 8 of 9 matmul weights would stay in full precision: a, b (Conv1D: not here) "
               "(nothing was changed). Pass allow_unquantized=...")
    results = [row("llama", "lora", op, "passed") for op in ("train", "merge", "save")]
    results += [row("gpt2", "lora", op, "refused for this architecture", refusal) for op in ("train", "save")]
    results += [row("opt", "lora", "train", "failed", "boom")]
    record = {"date": "2026-12-01T00:00:00", "seconds": 1, "versions": {"hqq": "0.2.8"}, "command": "qadapt matrix",
              "architectures": ["llama", "gpt2", "opt"], "results": results}
    (tmp_path / "hqq-cpu.json").write_text(json.dumps(record))
    page = panel_docs.render(panel_docs.load(str(tmp_path)))
    assert "| hqq | defaults | cpu | passed | refused | **FAILED**: lora |" in page
    assert "- **hqq** on gpt2: Conv1D: not here" in page and "opt: lora train: failed boom" in page
