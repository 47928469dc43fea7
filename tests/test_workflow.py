"""The README's workflow, end to end: load -> attach -> train -> merge -> save -> load."""

from __future__ import annotations

import pytest
import torch

import qadapt

from .conftest import backend_ready


def test_readme_workflow_with_a_plain_pytorch_loop(tiny_dir, batches, tmp_path):
    backend_ready("bnb")
    model = qadapt.load(tiny_dir, backend="bnb", bits=4, quant_type="nf4", double_quant=True)
    model = qadapt.attach(model, "lora", r=16, target_modules="all-linear")
    import peft

    assert isinstance(model, peft.PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=batches[0], labels=batches[0]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=batches[1]).logits
    report = qadapt.merge(model)
    assert report.backend == "bnb" and report.method == "lora" and len(report.layers) == 14
    assert 0 < report.output_error < 1
    qadapt.unmerge(model)
    qadapt.save(model, tmp_path / "out")
    restored = qadapt.load(tmp_path / "out")
    restored.eval()
    with torch.no_grad():
        assert torch.equal(restored(input_ids=batches[1]).logits, before)
    assert isinstance(restored, peft.PeftModel)


def test_transformers_trainer_trains_the_adapter(tiny_dir, batches, tmp_path):
    backend_ready("torchao")
    from transformers import Trainer, TrainingArguments

    model = qadapt.attach(qadapt.load(tiny_dir, backend="torchao"), "lora")
    rows = [{"input_ids": row, "labels": row} for batch in batches for row in batch]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    result = Trainer(model=model, args=args, train_dataset=rows).train()
    assert result.global_step == 3
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


def test_merged_model_saves_without_adapter_and_reloads(tiny_dir, batches, tmp_path):
    backend_ready("hqq")
    model = qadapt.attach(qadapt.load(tiny_dir, backend="hqq", bits=4, group_size=64), "lora", init_lora_weights=False)
    model.eval()
    report = qadapt.merge(model)
    with torch.no_grad():
        merged = model(input_ids=batches[1]).logits
    qadapt.save(model, tmp_path / "merged")
    manifest = qadapt.checkpoint.read_manifest(str(tmp_path / "merged"))
    assert manifest["adapter"] is None and manifest["merged"]["strategy"] == "requantize"
    assert manifest["merged"]["report"]["output_error"] == pytest.approx(report.output_error)
    restored = qadapt.load(tmp_path / "merged")
    assert not hasattr(restored, "peft_config")
    with torch.no_grad():
        assert torch.equal(restored(input_ids=batches[1]).logits, merged)


def test_dequantized_merge_ships_a_plain_transformers_model(tiny_dir, batches, tmp_path):
    backend_ready("bnb")
    model = qadapt.attach(qadapt.load(tiny_dir, backend="bnb"), "ia3", init_ia3_weights=False)
    model.eval()
    with torch.no_grad():
        reference = model(input_ids=batches[1]).logits
    report = qadapt.merge(model, "dequantize")
    assert report.output_error < 1e-4 and all(layer.kept == 1.0 for layer in report.layers)
    qadapt.save(model, tmp_path / "fp")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fp" / "base")
    assert all(type(m) is not torch.nn.Module and "bitsandbytes" not in type(m).__module__ for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=batches[1]).logits, reference, atol=1e-4)


def test_in_memory_models_are_quantized_without_touching_the_original(batches):
    backend_ready("bnb")
    from qadapt.testing import toy

    original = toy.build_model()
    weights = {k: v.clone() for k, v in original.state_dict().items()}
    qadapt.load(original, backend="bnb")
    assert all(torch.equal(weights[k], v) for k, v in original.state_dict().items())


@pytest.mark.parametrize("backend", ["bnb", "torchao"])
def test_a_folder_loads_in_the_dtype_it_was_saved_in(backend, tmp_path, tokenizer):
    """As transformers' dtype="auto": the layers a backend leaves unquantized (embeddings, norms, head) keep the
    checkpoint's dtype instead of being widened to float32."""
    backend_ready(backend)
    from qadapt.testing import toy

    folder = toy.save_model(toy.build_model(dtype=torch.bfloat16), tmp_path / "bf16", tokenizer)
    model = qadapt.load(folder, backend=backend, **({"bits": 8} if backend == "bnb" else {}))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16


def test_adalora_rank_count_stays_frozen_and_the_saved_adapter_reloads_exactly(tmp_path, batches, tokenizer):
    """PEFT re-wraps AdaLoRA's ``ranknum`` as a trainable Parameter when it moves the adapter to a bfloat16 (or GPU)
    base; trained, it drifts, and is not saved, so the reload differed (seen on an H100). qadapt keeps it frozen."""
    from transformers import AutoModelForCausalLM

    from qadapt.testing import toy

    folder = toy.save_model(toy.build_model(dtype=torch.bfloat16), tmp_path / "bf16", tokenizer)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model = qadapt.attach(base, "adalora", total_step=4, init_lora_weights=False)
    ranknum = {n: p for n, p in model.named_parameters() if ".ranknum." in n}
    assert ranknum and not any(p.requires_grad for p in ranknum.values())
    before = {n: p.detach().clone() for n, p in ranknum.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches[:2]:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(before[n], p) for n, p in ranknum.items())
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batches[0]).logits
        reloaded = qadapt.load(qadapt.save(model, tmp_path / "saved"))
        assert torch.equal(reloaded(input_ids=batches[0]).logits, expected)


def test_documented_fast_hqq_path_gives_the_default_paths_loss_and_gradients(tiny_dir, batches):
    """docs/benchmarks.md's fastest 4-bit path: HQQ's PYTORCH_FORWARD backend (de-quantization cached for the
    backward) and each decoder layer compiled. It must train exactly what the default path trains."""
    backend_ready("hqq")
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (c++ or g++ on PATH)")
    from hqq.core.quantize import HQQBackend, HQQLinear

    def loss_and_grads(backend, compile_layers):
        torch.manual_seed(0)
        model = qadapt.attach(qadapt.load(tiny_dir, backend="hqq", bits=4, group_size=64), "lora", r=8,
                              init_lora_weights=False)
        if compile_layers:
            for layer in model.get_base_model().model.layers:
                layer.compile()
        HQQLinear.set_backend(backend)
        try:
            loss = model(input_ids=batches[0], labels=batches[0], use_cache=False).loss
            loss.backward()
        finally:
            HQQLinear.set_backend(HQQBackend.PYTORCH)  # a class-wide switch: leave the default for other tests
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    default_loss, default_grads = loss_and_grads(HQQBackend.PYTORCH, compile_layers=False)
    fast_loss, fast_grads = loss_and_grads(HQQBackend.PYTORCH_FORWARD, compile_layers=True)
    assert fast_loss == pytest.approx(default_loss, rel=1e-5)
    assert fast_grads.keys() == default_grads.keys() and len(fast_grads) > 0
    for name, grad in default_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unmerge_of_a_reloaded_merged_checkpoint_says_the_adapter_is_baked_in(tiny_dir, tmp_path):
    backend_ready("hqq")
    model = qadapt.attach(qadapt.load(tiny_dir, backend="hqq"), "lora", init_lora_weights=False)
    qadapt.merge(model)
    reloaded = qadapt.load(qadapt.save(model, tmp_path / "merged"))
    with pytest.raises(qadapt.InvalidOptionError, match="part of its weights") as raised:
        qadapt.unmerge(reloaded)
    assert "before the merge" in raised.value.hint
