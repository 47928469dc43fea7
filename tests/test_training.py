"""qadapt.prepare: the training switch trains like the plain path, part by part and together, and says what it did.

Tolerances (each checked below):
- float32, against the plain PEFT path on the same weights and batch: loss within 1e-5 relative, every LoRA gradient
  within 1e-4 relative (||g - g_plain|| / ||g_plain||): only the summation order differs; recompute and offloaded
  checkpointing are bit-identical to no checkpointing.
- bfloat16: loss within 1e-3 relative of the plain bf16 path, and every LoRA gradient no further from the float32 run of
  the same model than the plain bf16 path is (err_fast <= 1.25 err_plain + 5e-3). The fused LoRA branch computes in
  bfloat16, as unsloth's does; PEFT's in float32, so bit-equality is not expected (measured: fused 1.8e-2 vs plain
  1.7e-2 from float32 on the full-precision toy).
- The Functions themselves: ``torch.autograd.gradcheck`` in float64.
GPU-only parts (Liger's and cut-cross-entropy's Triton kernels, pinned host copies) are in the ``gpu``-marked tests at
the end; on a CPU their wiring and fallback messages are tested instead.
"""

from __future__ import annotations

import copy
import shutil
import sys
import types

import pytest
import torch

import qadapt
from qadapt.testing import toy
from qadapt.training import loss as loss_part
from qadapt.training import settings
from qadapt.training.dequant import FrozenLinearFn
from qadapt.training.lora import LoRALinearFn
from qadapt.training.mlp import LoRASwiGLUFn
from qadapt.training.norm import RMSNormFn

from .conftest import backend_ready

#: every width different (hidden 128, intermediate 192, 4 heads, 2 KV heads), so a transposed weight cannot pass
SHAPE = dict(num_key_value_heads=2, intermediate_size=192)
OPTIONS = {None: {}, "bnb": dict(bits=4), "hqq": dict(bits=4, group_size=64), "torchao": dict(scheme="int8_weight_only"),
           "rowwise-int8": {}}


def adapted(backend, dtype=torch.float32, *, method="lora", seed=0, build=None, **lora_options):
    """The toy Llama quantized with ``backend`` and a LoRA adapter whose B is random (PEFT starts it at zero, so the
    adapter would contribute nothing to compare)."""
    model = (build or toy.build_model)(seed=seed, dtype=dtype, **({} if build else SHAPE))
    if backend is not None:
        backend_ready(backend)
        options = dict(OPTIONS[backend])
        if backend in ("bnb", "hqq") and options.get("bits") == 4:
            options["compute_dtype"] = str(dtype).replace("torch.", "")
        model = qadapt.load(model, backend=backend, **options)
    peft_model = qadapt.attach(model, method, **{"r": 8, **lora_options})
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return peft_model


def batch(seed=1, size=(2, 32)):
    return torch.randint(0, toy.TINY_LLAMA["vocab_size"], size, generator=torch.Generator().manual_seed(seed))


def step(model, ids, **kwargs):
    """One training forward and backward: (loss, {name: gradient}) of every trainable parameter."""
    model.train()
    for param in model.parameters():
        param.grad = None
    loss = model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float(), grads


def worst(grads, reference):
    assert set(grads) == set(reference), set(reference) ^ set(grads)
    return max((torch.linalg.vector_norm(grads[n] - reference[n]) / torch.linalg.vector_norm(reference[n])).item()
               for n in reference)


def saved_bytes(model, ids=None):
    """Bytes autograd keeps for the backward of one training step (distinct storages; parameters, buffers and
    bitsandbytes' quant state excluded)."""
    known = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    for module in model.modules():  # bitsandbytes' quant state hangs on the parameter
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            known.update(t.untyped_storage().data_ptr() for t in vars(state).values() if isinstance(t, torch.Tensor))
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in known:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = batch(size=(2, 64)) if ids is None else ids
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return sum(seen.values())


def checkpointed(model):
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def patched(model):
    """Names of the modules whose forward was replaced on the instance."""
    return sorted(name for name, module in model.named_modules() if "forward" in module.__dict__)


# ---------------------------------------------------------------------------------------------- same training
RECOMPUTED_NORM = ("fast", {"norm": "recompute"})


@pytest.mark.parametrize("backend,modes", [(None, ("default", "fast", "lean", RECOMPUTED_NORM)),
                                           ("bnb", ("default", "fast", "lean", RECOMPUTED_NORM)),
                                           ("hqq", ("fast",)), ("torchao", ("fast",))])
def test_every_mode_trains_like_the_plain_path_in_float32(backend, modes):
    """(checkpointing is backend-independent once it works with bnb's layers: lean and default run on two backends)"""
    ids = batch()
    loss_plain, grads_plain = step(adapted(backend), ids)
    for mode in modes:
        mode, parts = mode if isinstance(mode, tuple) else (mode, {})
        model = adapted(backend)
        report = qadapt.prepare(model, mode, strict=True, **parts)  # strict: on a Llama nothing falls back
        loss, grads = step(model, ids)
        assert abs(loss - loss_plain) / loss_plain < 1e-5, (mode, loss, loss_plain)
        assert worst(grads, grads_plain) < 1e-4, mode
        if mode != "default":
            assert len(report.parts["lora"].modules) == 14 and len(report.parts["mlp"].modules) == 2
            assert report.parts["loss"].how.startswith("qadapt ChunkedLinearCE")



def functions_in_graph(loss):
    """How many times each autograd node type (``LoRASwiGLUFnBackward``, ...) is in ``loss``'s backward graph."""
    import collections

    seen, found, todo = set(), collections.Counter(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found[type(node).__name__] += 1
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


@pytest.mark.parametrize("backend", [None, "bnb"])
def test_every_module_the_report_names_runs_its_fused_function(backend):
    """The report is what runs: one LoRASwiGLUFn per fused MLP, one LoRALinearFn per fused attention projection,
    one RMSNormFn per lean norm, and no SiLU of transformers' own MLP (a step bound to the wrong modules once made
    "fused" a label only: the MLP ran PEFT's path, 3.5 GiB more at 8B, and the losses were equal)."""
    model = adapted(backend)
    report = qadapt.prepare(model, "fast", strict=True)
    model.train()
    found = functions_in_graph(model(input_ids=batch(), labels=batch(), use_cache=False).loss)
    mlps, norms = report.parts["mlp"].modules, report.parts["norm"].modules
    assert found["LoRASwiGLUFnBackward"] == len(mlps) == 2
    assert found["LoRALinearFnBackward"] == len(report.parts["lora"].modules) - 3 * len(mlps) == 8
    assert len(norms) == 5 and found["RMSNormFnBackward"] == 4  # the first norm reads the frozen embeddings: no node
    assert found["SiluBackward0"] == 0 and found["ChunkedLinearCEBackward"] == 1
    assert all(name.endswith("mlp") for name in mlps) and all(name.endswith("norm") for name in norms)

    routed = adapted(backend)  # PEFT's layers over the de-quantization route: one FrozenLinearFn per routed layer
    report = qadapt.prepare(routed, "fast", lora="peft", mlp="off", strict=True)
    routed.train()
    found = functions_in_graph(routed(input_ids=batch(), labels=batch(), use_cache=False).loss)
    if backend is None:
        assert report.parts["dequant"].modules == [] and found["FrozenLinearFnBackward"] == 0
    else:  # layer 0's q/k/v read the first norm's output, which needs no gradient: no node for them
        assert found["FrozenLinearFnBackward"] == len(report.parts["dequant"].modules) - 3 == 11


@pytest.mark.parametrize("backend", [None, "bnb"])
def test_bfloat16_fast_is_no_further_from_float32_than_the_plain_path(backend):
    ids = batch()
    _, grads32 = step(adapted(backend, torch.float32), ids)
    loss_plain, grads_plain = step(adapted(backend, torch.bfloat16), ids)
    model = adapted(backend, torch.bfloat16)
    qadapt.prepare(model, "fast")
    loss, grads = step(model, ids)
    assert abs(loss - loss_plain) / loss_plain < 1e-3
    assert worst(grads, grads32) <= 1.25 * worst(grads_plain, grads32) + 5e-3


def test_fast_keeps_less_than_half_of_what_the_plain_path_keeps_for_the_backward():
    """What autograd saves for the backward (distinct storages, parameters and packed weights excluded) on bnb nf4 in
    bf16: PEFT's fp32 input copies, four intermediate-wide MLP tensors, HF RMSNorm's fp32 copies and the fp32 logits
    are gone; and each part keeps exactly what it should less (the memory model counts these: docs/benchmarks.md)."""

    plain = saved_bytes(adapted("bnb", torch.bfloat16))
    model = adapted("bnb", torch.bfloat16)
    qadapt.prepare(model, "fast")
    fast = saved_bytes(model)
    assert fast < 0.5 * plain
    unfused = adapted("bnb", torch.bfloat16)
    qadapt.prepare(unfused, "fast", mlp="off")
    # the fused MLP keeps gate(x) and up(x) but neither silu(gate(x)) nor the product, nor its projections' x @ A
    layers, tokens, intermediate, r = 2, 2 * 64, 192, 8
    assert saved_bytes(unfused) - fast == layers * (2 * tokens * intermediate + 3 * tokens * r) * 2
    qadapt.prepare(model, "fast", norm="recompute")  # the normed inputs of q/k/v and the MLP recomputed, not kept
    # two bf16 hidden-wide tensors a layer, but the first norm's: it reads the frozen embeddings, so it has no graph
    hidden, tokens, norms = 128, 2 * 64, 2 * 2 - 1
    assert fast - saved_bytes(model) == norms * tokens * hidden * 2


def test_training_steps_through_transformers_trainer_give_the_plain_losses(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = Dataset.from_dict({"input_ids": batch(size=(8, 32)).tolist()})
    rows = rows.map(lambda row: {"labels": row["input_ids"]})

    def losses(prepare_mode):
        model = adapted(None)
        if prepare_mode:
            qadapt.prepare(model, prepare_mode)
        args = TrainingArguments(tmp_path / str(prepare_mode), per_device_train_batch_size=2, max_steps=2,
                                 learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                 use_cpu=True, dataloader_num_workers=0, seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    plain = losses(None)
    assert losses("fast") == pytest.approx(plain, rel=1e-4)


def test_trl_fuses_the_lm_head_itself_and_the_loss_part_steps_aside(tmp_path, tokenizer):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = Dataset.from_dict({"input_ids": batch(size=(4, 32)).tolist()})
    config = SFTConfig(tmp_path, per_device_train_batch_size=2, max_steps=2, report_to=[], save_strategy="no",
                       use_cpu=True, gradient_checkpointing=False, logging_steps=1, dataset_kwargs={"skip_prepare_dataset": True})
    before = adapted(None)
    qadapt.prepare(before, "fast")  # prepare first: TRL wraps qadapt's forward and bypasses it for its fused calls
    with pytest.warns(UserWarning, match="TRL's fused LM head computes the loss"):
        SFTTrainer(model=before, args=config, train_dataset=rows, processing_class=tokenizer).train()
    after = adapted(None)
    trainer = SFTTrainer(model=after, args=config, train_dataset=rows, processing_class=tokenizer)
    report = qadapt.prepare(after, "fast")  # prepare after: TRL's head is seen, the loss part is not installed
    assert report.parts["loss"].how.startswith("left to TRL's fused LM head") and not report.fallbacks
    assert len(report.parts["lora"].modules) == 14
    trainer.train()
    assert all(entry["loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)


# ---------------------------------------------------------------------------------------------- the Functions
def test_the_functions_have_exact_gradients_in_float64():
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)

    x, A, B, W = rand(2, 3, 6), rand(4, 6), rand(5, 4), rand(5, 6).detach()
    bias = torch.randn(5, dtype=torch.float64, generator=gen)
    for keep in (False, True):
        assert torch.autograd.gradcheck(lambda x, A, B: LoRALinearFn.apply(x, A, B, 0.5, lambda d: W, bias, keep), (x, A, B))
    assert torch.autograd.gradcheck(lambda x: FrozenLinearFn.apply(x, lambda d: W, bias, False), (x,))
    Wg, Wu, Wd = rand(7, 6).detach(), rand(7, 6).detach(), rand(6, 7).detach()
    gA, gB, uA, uB, dA, dB = rand(4, 6), rand(7, 4), rand(4, 6), rand(7, 4), rand(4, 7), rand(6, 4)
    routes = ((lambda d: Wg, 0.5), (lambda d: Wu, 2.0), (lambda d: Wd, 1.0))
    assert torch.autograd.gradcheck(lambda *t: LoRASwiGLUFn.apply(*t, routes), (x, gA, gB, uA, uB, dA, dB))
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFn.apply(x, w, 1e-6), (x, rand(6)))
    h, head = rand(9, 6), rand(11, 6).detach()
    labels = torch.tensor([1, 2, -100, 4, 5, 6, -100, 8, 10])
    assert torch.autograd.gradcheck(lambda h: loss_part.ChunkedLinearCE.apply(h, head, labels, torch.tensor(7.0), 4), (h,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_rmsnorm_computes_transformers_llama_rmsnorm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    y = norm(x)
    (dx,) = torch.autograd.grad(y.float().square().sum(), x)
    x2 = x.detach().requires_grad_(True)
    y2 = RMSNormFn.apply(x2, norm.weight, norm.variance_epsilon)
    (dx2,) = torch.autograd.grad(y2.float().square().sum(), x2)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(dx2, dx, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_chunked_loss_has_transformers_semantics():
    """Shift by one, -100 ignored, mean over counted tokens; or sum / num_items_in_batch; or shift_labels as given;
    any chunk size."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden = torch.randn(2, 13, 16, dtype=torch.float64)
    head = torch.randn(40, 16, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 13))
    labels[0, 3] = labels[1, 7] = -100
    logits = hidden @ head.t()
    for chunk in (1, 5, 1024):
        for extra in ({}, {"num_items_in_batch": torch.tensor(9)}):
            expected = ForCausalLMLoss(logits, labels, 40, **extra)
            got = loss_part.causal_lm_loss(hidden, head, labels, chunk=chunk, **extra)
            torch.testing.assert_close(got, expected.to(got.dtype))
        shifted = torch.roll(labels, -1, 1)
        expected = ForCausalLMLoss(logits, None, 40, shift_labels=shifted)
        got = loss_part.causal_lm_loss(hidden, head, shift_labels=shifted, chunk=chunk)
        torch.testing.assert_close(got, expected.to(got.dtype))


# ---------------------------------------------------------------------------------------------- nothing silent
def test_strict_refuses_fallbacks_before_changing_anything():
    model = adapted("bnb", lora_dropout=0.1)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    with pytest.raises(qadapt.IncompatibleError, match="lora_dropout > 0"):
        qadapt.prepare(model, "fast", strict=True)
    assert patched(model) == [] and {n: p.dtype for n, p in model.named_parameters()} == dtypes
    report = qadapt.prepare(model, "fast")
    assert len(report.parts["lora"].fallbacks) == 14 and "lora_dropout > 0" in str(report)
    assert report.parts["mlp"].fallbacks  # the MLP needs fused projections: it says so per MLP
    assert step(model, batch())[0] > 0


def test_a_backend_without_a_training_route_keeps_its_forward_and_says_so():
    backend_ready("bnb")
    base = qadapt.load(toy.build_model(**SHAPE), backend="bnb", bits=8)
    model = qadapt.attach(base, "lora", r=8)
    report = qadapt.prepare(model, "fast")
    reasons = set(report.parts["lora"].fallbacks.values())
    assert reasons == {"backend 'bnb' has no training de-quantization route for Linear8bitLt "
                       "(QuantBackend.training_dequantizer returned None)"}
    assert report.parts["norm"].modules and report.parts["loss"].how  # the other parts still apply
    assert step(model, batch())[0] > 0


def test_a_third_party_backend_joins_through_its_training_route(monkeypatch):
    """examples/qadapt-rowwise-int8 declares no route: its layers stay on PEFT's path, and say so; given one (the
    contract member QuantBackend.training_dequantizer), they are fused and train as before."""
    if "rowwise-int8" not in qadapt.backends():
        pytest.skip("examples/qadapt-rowwise-int8 is not installed (nox's tests session installs it)")
    ids = batch()
    model = adapted("rowwise-int8")
    loss_plain, grads_plain = step(model, ids)
    report = qadapt.prepare(model, "fast")
    assert "backend 'rowwise-int8' has no training de-quantization route" in str(report)
    backend = qadapt.get_backend("rowwise-int8")
    monkeypatch.setattr(type(backend), "training_dequantizer", lambda self, m: (lambda dtype: backend.dequantize(m).to(dtype)))
    report = qadapt.prepare(model, "fast", strict=True)
    assert len(report.parts["lora"].modules) == 14
    loss, grads = step(model, ids)
    assert abs(loss - loss_plain) / loss_plain < 1e-5 and worst(grads, grads_plain) < 1e-4


def test_other_architectures_get_each_part_where_their_code_matches_llamas():
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, vocab_size=128)
    qwen = adapted(None, build=lambda seed, dtype: Qwen2ForCausalLM(Qwen2Config(**small)).to(dtype))
    report = qadapt.prepare(qwen, "fast", strict=True)  # Qwen2's modules are Llama's (transformers' modular files)
    assert report.parts["mlp"].modules and report.parts["norm"].modules and report.parts["loss"].how
    gemma = adapted(None, build=lambda seed, dtype: Gemma2ForCausalLM(Gemma2Config(**small)).to(dtype))
    report = qadapt.prepare(gemma, "fast")
    text = str(report)
    assert "Gemma2RMSNorm.forward is not Llama's RMSNorm forward" in text
    assert "activation" in text and "not SiLU" in text  # Gemma's GELU MLP
    assert "Gemma2ForCausalLM.forward is not Llama's causal-LM forward" in text  # logit soft-capping
    assert len(report.parts["lora"].modules) == 7  # the LoRA layers themselves fuse on any architecture
    assert step(gemma, batch(size=(1, 16)) % 128)[0] > 0


def test_a_second_call_replaces_the_first_and_off_undoes_it():
    model = adapted("bnb")
    qadapt.prepare(model, "fast")
    assert patched(model)
    report = qadapt.prepare(model, "default")
    assert patched(model) == [] and report.parts["checkpoint"].modules
    assert checkpointed(model)
    qadapt.prepare(model, "off")
    assert patched(model) == [] and not checkpointed(model)
    assert qadapt.training.report_of(model) is None


def test_inference_and_generate_run_the_original_forwards():
    ids = batch(size=(1, 8))
    plain, model = adapted("bnb"), adapted("bnb")
    qadapt.prepare(model, "fast")
    for m in (plain, model):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(input_ids=ids, **settings), plain.generate(input_ids=ids, **settings))


def test_default_mode_is_peft_kbit_preparation_before_an_adapter_is_attached():
    """prepare before attach (as with peft.prepare_model_for_kbit_training, or before TRL attaches the adapter):
    the base is frozen, layers are checkpointed, input grads are on; float16 norms/embeddings/head go to float32."""
    base = toy.build_model(**SHAPE).to(torch.float16)
    report = qadapt.prepare(base, "default")
    assert not any(p.requires_grad for p in base.parameters())
    assert checkpointed(base) and report.parts["input_grads"].how
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert "model.norm.weight" in report.parts["upcast"].modules
    fast = qadapt.prepare(toy.build_model(**SHAPE), "fast")
    assert "no LoRA layers" in fast.parts["lora"].fallbacks[""]


def test_invalid_settings_are_refused_with_the_choices():
    model = adapted(None)
    with pytest.raises(qadapt.InvalidOptionError, match="'off', 'recompute', 'offload'"):
        qadapt.prepare(model, checkpoint="sometimes")
    with pytest.raises(qadapt.InvalidOptionError, match="mlp='fused'"):
        qadapt.prepare(model, "fast", lora="peft")
    with pytest.raises(qadapt.InvalidOptionError, match="unknown mode"):
        qadapt.prepare(model, "fastest")
    assert patched(model) == []


def test_the_loss_says_which_library_runs_and_why_not_the_others(monkeypatch):
    name, summed, notes, fallback = loss_part.choose("liger", on_cuda=False)
    assert name == "torch" and summed is None and "Triton, CUDA only" in fallback
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)
    fake = types.ModuleType("cut_cross_entropy")
    fake.linear_cross_entropy = lambda *a, **k: "called"
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", fake)
    monkeypatch.setattr(loss_part, "_probed", lambda load: load())  # no CUDA here to run the probe on
    name, summed, notes, fallback = loss_part.choose("auto", on_cuda=True)
    assert name == "cce" and fallback == "" and "liger-kernel not usable (ModuleNotFoundError" in notes[0]
    assert "pip install 'qadapt-lm[kernels]'" in notes[0]  # not installed: how to install it
    assert summed(None, None, None) == "called"


def test_a_kernel_library_that_is_missing_is_named_with_its_install_command(monkeypatch):
    from qadapt.training import mlp, norm

    for module in ("liger_kernel", "liger_kernel.ops", "liger_kernel.ops.swiglu", "liger_kernel.transformers",
                   "liger_kernel.transformers.functional"):
        monkeypatch.setitem(sys.modules, module, None)  # not installed
    probes = (mlp.liger_swiglu, norm.liger_rms_norm)
    try:
        for probe in probes:
            probe.cache_clear()
            function, why = probe()
            assert function is None and "ModuleNotFoundError" in why and "pip install 'qadapt-lm[kernels]'" in why
    finally:
        for probe in probes:
            probe.cache_clear()
    compiled_badly = settings.unusable("liger-kernel", RuntimeError("Triton cannot compile for this GPU"))
    assert "RuntimeError: Triton cannot compile" in compiled_badly and "pip install" not in compiled_badly


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return torch.tanh(x @ self.weight)


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU code needs a C compiler (cc)")
def test_many_compiled_layers_in_one_process_do_not_hit_dynamo_s_recompile_limit():
    """Every compiled layer shares ``Module._call_impl``'s code object, so each kind of layer is one more cache entry;
    dynamo's default limit is 8, a hard error under fullgraph=True (the H200's GPU suite failed at its seventh model).
    Ten kinds of layer here, two entries each (with and without gradients)."""
    from qadapt.training.compiling import compile_layers
    from qadapt.training.patching import Patches

    patches = Patches()
    for kind in range(10):
        layer = type(f"Block{kind}", (_Block,), {})()
        compile_layers(patches, [("layer", layer)])
        layer(torch.randn(2, 4, requires_grad=True)).sum().backward()
        with torch.no_grad():
            layer(torch.randn(2, 4))
    patches.undo()


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU code needs a C compiler (cc)")
def test_compiled_fused_layers_train_like_eager_and_keep_no_dequantized_weight():
    """torch.compile over the fused Functions (fullgraph): the same loss and gradients, and no more kept for the
    backward than eager keeps; with AOT autograd's CSE on, the forward's and backward's de-quantizations merged and
    every bf16 weight was kept (2.4 x eager's saved bytes here; 25.8 instead of 12.9 GiB at Llama-3-8B)."""
    ids = batch(size=(2, 64))
    eager, compiled = adapted("bnb", torch.bfloat16), adapted("bnb", torch.bfloat16)
    qadapt.prepare(eager, "fast")
    report = qadapt.prepare(compiled, "fast", compile="regional")
    assert len(report.parts["compile"].modules) == 2 and "fullgraph=True" in report.parts["compile"].how
    loss_eager, grads_eager = step(eager, ids)
    loss, grads = step(compiled, ids)  # compiles
    assert abs(loss - loss_eager) / loss_eager < 1e-3 and worst(grads, grads_eager) < 2e-2
    assert saved_bytes(compiled, ids) <= saved_bytes(eager, ids)


def test_checkpoint_layers_checkpoints_that_many_decoder_layers_spread_evenly():
    from qadapt.training.checkpointing import chosen_layers

    names = [(f"layers.{i}", None) for i in range(32)]
    assert chosen_layers(names, 4) == ["layers.0", "layers.8", "layers.16", "layers.24"]
    assert chosen_layers(names, 6) == ["layers.0", "layers.5", "layers.10", "layers.16", "layers.21", "layers.26"]
    assert chosen_layers(names, None) == chosen_layers(names, 40) == [n for n, _ in names]
    model = adapted(None)
    ids = batch(size=(2, 64))
    loss_plain, grads_plain = step(model, ids)
    report = qadapt.prepare(model, "default", checkpoint_layers=1)  # eager: transformers' hook on one layer
    assert report.parts["checkpoint"].modules == ["model.layers.0"]
    assert [m.gradient_checkpointing for m in model.base_model.model.model.layers] == [True, False]
    loss, grads = step(model, ids)
    assert abs(loss - loss_plain) / loss_plain < 1e-5 and worst(grads, grads_plain) < 1e-4
    note = qadapt.prepare(model, "default", checkpoint_layers=3).parts["checkpoint"].notes
    assert "the model has 2 decoder layers; every one is checkpointed" in note[0]


@pytest.mark.parametrize("backend", [None, "bnb"])
def test_mlp_recompute_trains_like_the_fused_mlp_and_keeps_less(backend):
    """mlp='recompute': the fused MLP keeping only its input, gate and up recomputed in the backward from the weights
    the backward de-quantizes anyway: the same loss and gradients as mlp='fused' (float32), and two intermediate-wide
    tensors less kept per recomputing layer; mlp_layers=1 recomputes in one of the two layers."""
    ids = batch(size=(2, 64))
    kept, results = {}, {}
    for mlp_choice, layers in (("fused", None), ("recompute", 1), ("recompute", None)):
        model = adapted(backend)
        report = qadapt.prepare(model, "fast", mlp=mlp_choice, mlp_layers=layers)
        if mlp_choice == "recompute":
            assert f"in {layers or 2} of the 2 MLPs only x is saved" in report.parts["mlp"].how
        results[mlp_choice, layers] = step(model, ids)
        kept[mlp_choice, layers] = saved_bytes(model, ids)
    loss_fused, grads_fused = results["fused", None]
    for key in (("recompute", 1), ("recompute", None)):
        loss, grads = results[key]
        assert abs(loss - loss_fused) / loss_fused < 1e-5 and worst(grads, grads_fused) < 1e-4, key
    per_layer = 2 * 2 * 64 * SHAPE["intermediate_size"] * 4  # gate and up, float32, 2 x 64 tokens
    assert kept["fused", None] - kept["recompute", 1] == per_layer, kept
    assert kept["fused", None] - kept["recompute", None] == 2 * per_layer, kept


def test_mlp_recompute_has_exact_gradients_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(12, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64),
               torch.randn(8, 12, dtype=torch.float64)]
    adapters = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
                for shape in ((2, 8), (12, 2), (2, 8), (12, 2), (2, 12), (8, 2))]
    routes = tuple((lambda dtype, w=w: w, 0.5) for w in weights)
    assert torch.autograd.gradcheck(lambda x, *a: LoRASwiGLUFn.apply(x, *a, routes, True), (x, *adapters))


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU code needs a C compiler (cc)")
def test_compiled_mlp_recompute_keeps_its_saving():
    """Inside a compiled layer the partitioner could keep gate and up anyway; it does not: less is kept than by the
    compiled fused MLP, and the loss is the eager one."""
    ids = batch(size=(2, 64))
    eager = adapted("bnb", torch.bfloat16)
    qadapt.prepare(eager, "fast", mlp="recompute")
    loss_eager, _ = step(eager, ids)
    kept = {}
    for choice in ("fused", "recompute"):
        model = adapted("bnb", torch.bfloat16)
        qadapt.prepare(model, "fast", compile="regional", mlp=choice)
        loss, _ = step(model, ids)
        kept[choice] = saved_bytes(model, ids)
    assert abs(loss - loss_eager) / loss_eager < 1e-3
    assert kept["fused"] - kept["recompute"] >= 2 * 2 * 2 * 64 * SHAPE["intermediate_size"] * 2, kept


def test_compile_auto_and_graphs_say_what_they_resolve_to_off_cuda():
    model = adapted(None)
    report = qadapt.prepare(model, "fast")  # compile="auto"
    assert report.parts["compile"].modules == [] and "not compiled off CUDA" in report.parts["compile"].notes[0]
    assert all(m._compiled_call_impl is None for m in model.modules())
    report = qadapt.prepare(model, "fast", compile="graphs")
    assert len(report.parts["compile"].modules) == 2 and "CUDA graphs need CUDA" in report.parts["compile"].notes[0]
    assert "reduce-overhead" not in report.parts["compile"].how
    assert qadapt.prepare(model, "lean").parts["compile"].modules == []  # "auto" off CUDA
    third_party = adapted("rowwise-int8")  # a backend that has not declared its route compiles: never compiled by auto
    note = qadapt.prepare(third_party, "fast").parts["compile"].notes[0]
    assert "backend 'rowwise-int8' has not been verified under torch.compile" in note
    # bnb declares its 4-bit route compiles; LLM.int8 layers have no route and run bitsandbytes' own forward
    backend_ready("bnb")
    int8 = qadapt.attach(qadapt.load(toy.build_model(**SHAPE), backend="bnb", bits=8), "lora", r=8)
    note = qadapt.prepare(int8, "fast").parts["compile"].notes[0]
    assert "not compiled: 14 quantized layers keep the bnb backend's own forward (no training route" in note


class EagerRecorder:
    """What the graphs' plumbing sees from a recorder, without CUDA: the recorded function runs again at each replay
    (the static tensors, the copies in and out, the gradients autograd gets are the real ones)."""

    def record(self, function):
        function()
        return function


@pytest.mark.parametrize("backend", [None, "bnb"])
@pytest.mark.parametrize("stash", ["host", "device"])
def test_checkpointed_layers_replayed_from_recordings_train_like_eager_checkpointing(backend, stash):
    """Two layers replayed through one set of static tensors; two steps of AdamW, a second batch shape (recorded
    again), a replaced parameter (recorded again): the losses and gradients of eager checkpointing each time."""
    from qadapt.training import compiling, graphed
    from qadapt.training.patching import Patches

    eager, replayed = adapted(backend), adapted(backend)
    qadapt.prepare(eager, "lean", compile="off")  # eager offloaded checkpointing through transformers' hook
    qadapt.prepare(replayed, "fast", compile="off")  # the same fused parts, no checkpointing: the graphs add it
    replayed.base_model.model.gradient_checkpointing_enable()  # transformers' own, left on: the graphs take over
    layers, patches = compiling.layers(replayed.base_model.model), Patches()
    graphs = graphed.install(patches, layers, stash, EagerRecorder())
    assert not any(layer.gradient_checkpointing for _, layer in layers)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (eager, replayed)]
    for index, ids in enumerate([batch(), batch(seed=2), batch(seed=3, size=(1, 48)), batch(seed=4)]):
        if index == 3:  # a parameter replaced (same values, another tensor): the old recording reads the old one
            lora_a = replayed.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"]
            lora_a.weight = torch.nn.Parameter(lora_a.weight.detach().clone())
            optimizers[1] = torch.optim.AdamW([p for p in replayed.parameters() if p.requires_grad], lr=1e-2)
            optimizers[1].load_state_dict(copy.deepcopy(optimizers[0].state_dict()))  # else they share state
        (loss_eager, grads_eager), (loss, grads) = step(eager, ids), step(replayed, ids)
        assert abs(loss - loss_eager) / loss_eager < 1e-6 and worst(grads, grads_eager) < 1e-5, index
        for optimizer in optimizers:
            optimizer.step()
    assert graphs.recordings == 2 * 2 + 2 * 2 + 2  # per layer: two shapes x (forward, backward); layer 1 again
    # transformers collects hidden states through forward hooks, which a replay would not run: eager checkpointing
    ids = batch()
    (_, grads_eager), (_, grads) = step(eager, ids), step(replayed, ids)
    expected = eager(input_ids=ids, labels=ids, output_hidden_states=True, use_cache=False).hidden_states
    got = replayed(input_ids=ids, labels=ids, output_hidden_states=True, use_cache=False).hidden_states
    assert len(got) == len(expected) == 3 and graphs.eager_calls == 2
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert worst(grads, grads_eager) < 1e-5
    patches.undo()  # what prepare("off") does: the layers' own calls and the caller's checkpointing back
    assert all(layer._compiled_call_impl is None and layer.gradient_checkpointing for _, layer in layers)
    with torch.no_grad():  # evaluation runs the layers' own calls
        torch.testing.assert_close(replayed(input_ids=batch()).logits, eager(input_ids=batch()).logits)


def test_a_layer_that_draws_random_numbers_or_is_offloaded_is_not_replayed_from_recordings():
    from qadapt.training import graphed

    plain = toy.build_model(**SHAPE)
    assert graphed.why_not(plain.model.layers[0]) == ""
    plain.model.layers[1].mlp._hf_hook = object()  # what accelerate's device_map offloading leaves on a module
    assert "mlp has an accelerate hook" in graphed.why_not(plain.model.layers[1])
    dropping = toy.build_model(**SHAPE, attention_dropout=0.1)
    assert "attention_dropout=0.1" in graphed.why_not(dropping.model.layers[0])
    with_lora_dropout = qadapt.attach(toy.build_model(**SHAPE), "lora", r=4, lora_dropout=0.1)
    assert "dropout with p=0.1" in graphed.why_not(with_lora_dropout.base_model.model.model.layers[0])


@pytest.mark.parametrize("parts, match", [
    ({"compile": "graphs", "checkpoint": "recompute", "checkpoint_layers": 1}, "replay checkpointed layers only.*"
     "Checkpoint every layer"),
    ({"compile": "regional", "norm": "recompute"}, "grad_fn, which torch.compile cannot read.*norm='lean'"),
    ({"checkpoint_layers": 4}, "checkpoint is 'off'.*Pass checkpoint='recompute'"),
    ({"checkpoint": "recompute", "checkpoint_layers": 0}, "positive number of layers"),
    ({"mlp_layers": 4}, "mlp is 'fused'.*Pass mlp='recompute'"),
    ({"mlp": "recompute", "lora": "peft", "dequant": "recompute"}, "fused LoRA layers of its three projections"),
])
def test_compile_settings_that_cannot_work_are_refused_before_any_change(parts, match):
    model = adapted(None)
    before = {name: type(m).forward for name, m in model.named_modules()}
    with pytest.raises(qadapt.InvalidOptionError, match=match):
        qadapt.prepare(model, "fast", **parts)
    assert {name: type(m).forward for name, m in model.named_modules()} == before
    assert all("forward" not in m.__dict__ and m._compiled_call_impl is None for m in model.modules())


def test_offloaded_checkpointing_and_compile_are_reported_per_layer():
    model = adapted(None)
    report = qadapt.prepare(model, "lean", compile="regional", lora="peft", mlp="off")
    assert report.parts["checkpoint"].modules == ["model.layers.0", "model.layers.1"]
    assert "not on CUDA" in report.parts["checkpoint"].notes[0]
    assert len(report.parts["compile"].modules) == 2
    qadapt.prepare(model, "off")  # compiled layers back to eager
    assert all(m._compiled_call_impl is None for m in model.modules())


@pytest.mark.parametrize("backend, checkpoint", [("torchao", "offload"), (None, "recompute")])
def test_checkpointed_layers_compiled_regionally_train_like_eager(backend, checkpoint):
    """transformers 5.23 checkpoints inside a layer's forward (5.17 in its ``__call__``): compiling the call traced
    qadapt's offloaded checkpoint Function and the first step failed in dynamo ("Attempted to call function marked as
    skipped"). The layer's own forward is compiled inside the checkpoint instead."""
    ids = batch()
    eager = adapted(backend)
    qadapt.prepare(eager, "lean", compile="off", checkpoint=checkpoint)
    compiled = adapted(backend)
    report = qadapt.prepare(compiled, "lean", compile="regional", checkpoint=checkpoint)
    assert report.parts["checkpoint"].modules == report.parts["compile"].modules == ["model.layers.0", "model.layers.1"]
    for _ in range(2):
        loss_eager, grads_eager = step(eager, ids)
        loss_compiled, grads = step(compiled, ids)
    assert abs(loss_compiled - loss_eager) / loss_eager < 1e-4 and worst(grads, grads_eager) < 1e-3


def test_where_qadapt_s_graphs_checkpoint_the_whole_layer_call_is_compiled():
    """Under qadapt's recorded graphs (CUDA) the layers' own checkpointing is turned off, so a flag the user turned
    on must not move the compilation inside a checkpoint that no longer runs (the layer would replay eagerly)."""
    from qadapt.training import compiling
    from qadapt.training.patching import Patches

    model = adapted(None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = compiling.layers(model)
    patches = Patches()
    compiling.compile_layers(patches, layers, transformers_checkpoints=False)
    assert all(layer._compiled_call_impl is not None for _, layer in layers)
    patches.undo()
    compiling.compile_layers(patches, layers)  # transformers 5.23 checkpoints inside forward: compiled in there
    assert all(layer._compiled_call_impl is None for _, layer in layers) == compiling._checkpoints_in_forward(layers[0][1])
    patches.undo()


def test_tensor_subclass_weights_are_not_replayed_as_recorded_graphs():
    from qadapt.training import graphed

    model = adapted("torchao")
    why = graphed.why_not(model.base_model.model.model.layers[0])
    assert "tensor subclass" in why and "Int8Tensor" in why
    assert graphed.why_not(adapted(None).base_model.model.model.layers[0]) == ""


# ---------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


def _cuda_adapted(backend, dtype=torch.bfloat16, **shape):
    def build(seed, dtype):
        return toy.build_model(seed=seed, dtype=dtype, **{**SHAPE, **shape}).cuda()

    return adapted(backend, dtype, build=build)


@gpu
@pytest.mark.parametrize("backend", [None, "bnb", "hqq", "torchao"])
def test_gpu_fast_and_lean_train_like_the_plain_path(backend):
    ids = batch(size=(2, 64)).cuda()
    _, grads32 = step(_cuda_adapted(backend, torch.float32), ids)
    loss_plain, grads_plain = step(_cuda_adapted(backend), ids)
    for mode in ("fast", "lean"):
        model = _cuda_adapted(backend)
        report = qadapt.prepare(model, mode)
        assert not [f for f in report.fallbacks if f[0] not in ("norm", "loss")], report
        loss, grads = step(model, ids)
        assert abs(loss - loss_plain) / loss_plain < 1e-3, (mode, str(report))
        assert worst(grads, grads32) <= 1.25 * worst(grads_plain, grads32) + 1e-2, (mode, str(report))


@gpu
def test_gpu_liger_and_cce_losses_match_the_chunked_torch_loss():
    _needs_kernel_libraries("liger_kernel", "cut_cross_entropy")
    hidden = torch.randn(4, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(5000, 128, device="cuda", dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, 5000, (4, 256), device="cuda")
    reference = loss_part.causal_lm_loss(hidden, head, labels, chunk=100)
    (grad_ref,) = torch.autograd.grad(reference, hidden)
    for asked in ("liger", "cce"):
        name, summed, notes, fallback = loss_part.choose(asked, on_cuda=True)
        assert name == asked, notes
        got = loss_part.causal_lm_loss(hidden, head, labels, summed=summed)
        (grad,) = torch.autograd.grad(got, hidden)
        assert abs(got.item() - reference.item()) / reference.item() < 1e-3, asked
        assert (torch.linalg.vector_norm((grad - grad_ref).float()) / torch.linalg.vector_norm(grad_ref.float())) < 2e-2


@gpu
def test_gpu_liger_rmsnorm_and_swiglu_match_the_torch_functions():
    _needs_kernel_libraries("liger_kernel")
    from qadapt.training.mlp import liger_swiglu
    from qadapt.training.norm import liger_rms_norm

    liger, why = liger_rms_norm()
    assert liger is not None, why
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    y_ref = RMSNormFn.apply(x, w, 1e-6)
    y = liger(x, w, 1e-6, 0.0, "llama", False)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    kernels, why = liger_swiglu()
    assert kernels is not None, why


def _needs_kernel_libraries(*modules):
    """Skip, saying what to install, where the optional kernel libraries are missing (qadapt falls back and says so)."""
    for module in modules:
        pytest.importorskip(module, reason=f"{module} is not installed: {settings.KERNELS_EXTRA}")


def _training_peaks(model, ids, steps):
    """(max allocated, max reserved) bytes over ``steps`` AdamW steps of ``model`` on ``ids``."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


@gpu
def test_gpu_fast_peaks_well_below_the_plain_path():
    """batch 4 x 512, hidden 1024, 4 layers, vocab 32,000 on bnb nf4: the fused parts and the chunked loss cut the
    step's peak (weights, adapter, AdamW and activations) by more than a third."""

    def peak(mode):
        model = _cuda_adapted("bnb", hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                              num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
        if mode:
            qadapt.prepare(model, mode)
        return _training_peaks(model, torch.randint(0, 32000, (4, 512), device="cuda"), steps=2)[0]

    plain, fast, lean = peak(None), peak("fast"), peak("lean")
    # at this size the activations the offloaded checkpointing saves are small: lean beats fast at 8B (6.5 vs 16.3 GiB,
    # docs/benchmarks.md), not here (H200: plain 1.46, fast 0.53, lean 0.69 GiB)
    assert fast < 0.66 * plain and lean < 0.66 * plain, (plain, fast, lean)


@gpu
@pytest.mark.parametrize("backend", ["bnb", "hqq", "torchao", None])
@pytest.mark.parametrize("compile", ["regional", "graphs"])
def test_gpu_compiled_fused_layers_train_like_eager(compile, backend):
    ids = batch(size=(2, 64)).cuda()
    eager = _cuda_adapted(backend)
    qadapt.prepare(eager, "fast", compile="off")
    compiled = _cuda_adapted(backend)
    report = qadapt.prepare(compiled, "fast", compile=compile)
    assert report.parts["compile"].modules and report.parts["lora"].modules and report.parts["mlp"].modules
    for _ in range(3):  # the first steps compile (and record the graphs)
        loss_eager, grads_eager = step(eager, ids)
        loss_compiled, grads = step(compiled, ids)
    assert abs(loss_compiled - loss_eager) / loss_eager < 1e-2
    assert worst(grads, grads_eager) < 5e-2


@gpu
@pytest.mark.parametrize("backend", ["bnb", "hqq", None])
def test_gpu_mlp_recompute_under_cuda_graphs_trains_like_eager_and_keeps_less(backend):
    ids = batch(size=(2, 64)).cuda()
    eager = _cuda_adapted(backend)
    qadapt.prepare(eager, "fast", mlp="recompute", compile="off")
    compiled = _cuda_adapted(backend)
    report = qadapt.prepare(compiled, "fast", mlp="recompute")  # compile="auto": CUDA graphs
    assert "CUDA graphs" in report.parts["compile"].how and "only x is saved" in report.parts["mlp"].how, report
    for _ in range(3):  # the first steps compile and record
        loss_eager, grads_eager = step(eager, ids)
        loss, grads = step(compiled, ids)
    assert abs(loss - loss_eager) / loss_eager < 1e-2 and worst(grads, grads_eager) < 5e-2



def _graphs_of(model):
    """The LayerGraphs qadapt.prepare installed on ``model``'s decoder layers (None if none)."""
    from qadapt.training import compiling

    for _, layer in compiling.layers(model.base_model.model):
        call = layer.__dict__.get("_compiled_call_impl")
        if call is not None and getattr(call, "args", None):
            return call.args[0]
    return None


@gpu
@pytest.mark.parametrize("backend", ["bnb", "hqq", None])
@pytest.mark.parametrize("checkpoint", ["offload", "recompute"])
def test_gpu_checkpointed_layers_replay_as_cuda_graphs_and_train_like_eager(checkpoint, backend):
    """prepare("lean") on CUDA (compile="auto"): each layer's forward and its recompute with backward recorded once
    per batch shape and replayed; the losses and gradients of eager checkpointing, step after step."""
    eager = _cuda_adapted(backend)
    qadapt.prepare(eager, "lean", checkpoint=checkpoint, compile="off")
    replayed = _cuda_adapted(backend)
    report = qadapt.prepare(replayed, "lean", checkpoint=checkpoint)
    assert "recorded as CUDA graphs by qadapt" in report.parts["compile"].how, report
    assert "replayed as CUDA graphs" in report.parts["checkpoint"].how and not report.fallbacks, report
    graphs = _graphs_of(replayed)
    assert graphs is not None and graphs.stash == ("host" if checkpoint == "offload" else "device")
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (eager, replayed)]
    for index, ids in enumerate([batch(size=(2, 64)).cuda(), batch(seed=2, size=(2, 64)).cuda(),
                                 batch(seed=3, size=(1, 96)).cuda(), batch(seed=4, size=(2, 64)).cuda()]):
        (loss_eager, grads_eager), (loss, grads) = step(eager, ids), step(replayed, ids)
        assert abs(loss - loss_eager) / loss_eager < 1e-2 and worst(grads, grads_eager) < 5e-2, index
        for optimizer in optimizers:
            optimizer.step()
    assert graphs.recordings == 2 * 2 * 2  # two layers, two batch shapes, forward and backward: recorded once each


@gpu
def test_gpu_replayed_checkpointed_layers_keep_what_eager_checkpointing_keeps():
    """At a shape where activations dominate (8 layers, 4 x 1024 tokens), the replayed lean step peaks within 10 %
    (+ 32 MiB of static tensors) of the eager one. The graphs' working memory is reserved, not allocated, between
    replays: every graph shares one pool, so the reserved peak stays near eager's too (a pool per graph would hold
    16 layers' working memory)."""

    def peaks(**parts):
        model = _cuda_adapted("bnb", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                              num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
        qadapt.prepare(model, "lean", **parts)
        torch.cuda.empty_cache()  # the reserved peak of this model, not of the one before
        return _training_peaks(model, torch.randint(0, 32000, (4, 1024), device="cuda"), steps=3)

    (eager, eager_reserved), (replayed, replayed_reserved) = peaks(compile="off"), peaks()
    assert replayed < 1.1 * eager + 2**25, (eager, replayed)
    assert replayed_reserved < 1.5 * eager_reserved, (eager_reserved, replayed_reserved)
