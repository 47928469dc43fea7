"""Intel Neural Compressor backend: every declared capability performed on a tiny Llama, numbers compared to references."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("neural_compressor.torch.quantization", reason="neural-compressor-pt is not installed")
torch = pytest.importorskip("torch")

from qadapt.testing import toy  # noqa: E402
from qadapt.errors import InvalidOptionError  # noqa: E402
from qadapt_plugins import inc  # noqa: E402

from .conftest import ENGINE_CELLS, train_steps  # noqa: E402

BACKEND = inc.INCBackend()
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def batches():
    return toy.token_batches(toy.build_tokenizer(), count=4, batch_size=2, seq_len=32)


def quantized(batches=None, **options):
    options = BACKEND.validate_options(options)
    return BACKEND.quantize(toy.build_model(), options, calibration=batches), options


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ------------------------------------------------------------------------------------------------ environment/options
def test_environment_ok():
    env = BACKEND.check_environment()
    assert env.ok, env.reason
    assert env.version and env.version.startswith("3.")


def test_half_install_of_plain_neural_compressor_is_named(monkeypatch):
    versions = {"neural-compressor": "3.10", "neural-compressor-pt": None}
    monkeypatch.setattr(inc, "_dist_version", lambda name: versions[name])
    monkeypatch.setattr(inc.INCBackend, "library_version", lambda self: None)
    env = BACKEND.check_environment()
    assert not env.ok
    assert "without neural-compressor-pt" in env.reason and "EVERY backend" in env.reason
    assert "neural-compressor-pt" in env.hint


@pytest.mark.parametrize(
    "options, words",
    [
        ({"dtype": "fp8"}, "Gaudi"),
        ({"dtype": "nf4", "bits": 8}, "4-bit code books"),
        ({"dtype": "fp4", "sym": False}, "symmetric"),
        ({"act_order": True}, "GPTQ option"),
        ({"bits": 5}, "must be one of"),
    ],
)
def test_refused_options(options, words):
    with pytest.raises(InvalidOptionError, match=words):
        BACKEND.validate_options(options)


def test_gptq_without_calibration_is_refused():
    with pytest.raises(InvalidOptionError, match="calibration"):
        BACKEND.quantize(toy.build_model(), BACKEND.validate_options({"algorithm": "gptq"}))
    model = toy.build_model(dtype=torch.bfloat16)  # refused before the float32 conversion changes it
    with pytest.raises(InvalidOptionError, match="calibration"):
        BACKEND.quantize(model, BACKEND.validate_options({"algorithm": "gptq"}))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------ formats
CONFIGS = [
    pytest.param({}, 0.12, id="int4-sym-g64"),
    pytest.param({"sym": False}, 0.12, id="int4-asym"),
    pytest.param({"bits": 8, "group_size": 128}, 0.01, id="int8-g128"),
    pytest.param({"bits": 3, "group_size": 32}, 0.25, id="int3-g32"),
    pytest.param({"bits": 4, "group_size": -1}, 0.15, id="int4-per-channel"),
    pytest.param({"dtype": "nf4"}, 0.12, id="nf4"),
    pytest.param({"dtype": "fp4"}, 0.15, id="fp4"),
    pytest.param({"algorithm": "gptq"}, 0.15, id="gptq"),
    pytest.param({"algorithm": "gptq", "act_order": True, "sym": False}, 0.15, id="gptq-act-order"),
]


@pytest.mark.parametrize("options, max_weight_error", CONFIGS)
def test_quantize_dequantize_requantize_save(options, max_weight_error, batches, tmp_path):
    model, resolved = quantized(batches if options.get("algorithm") == "gptq" else None, **options)
    full = toy.build_model()
    layers = dict(inc._inc_layers(model))
    assert len(layers) == 14 and not isinstance(model.lm_head, BACKEND.quantized_layer_types())
    name = "model.layers.0.mlp.up_proj"
    layer, original = layers[name], full.get_submodule(name).weight.detach()
    packed_before = {k: v.clone() for k, v in layer.state_dict().items()}

    # dequantize: the exact weight INC's own recover() (and so its forward) computes with
    weight = BACKEND.dequantize(layer)
    assert weight.dtype == torch.float32 and weight.shape == original.shape
    assert torch.equal(weight, layer.recover().float())
    x = torch.randn(5, layer.in_features)
    bias = layer.bias.float() if layer.bias is not None else None
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, weight, bias), atol=1e-6)
    assert relative(weight, original) < max_weight_error

    # requantize: a new layer, same format; the given module is unchanged
    new = BACKEND.requantize(layer, original)
    assert new is not layer and type(new) is type(layer)
    assert (new.bits, new.group_size, new.dtype) == (layer.bits, layer.group_size, layer.dtype)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in packed_before.items())
    if resolved["algorithm"] == "rtn":  # RTN of the same weight gives INC's own tensors, bit for bit
        for key in ("qweight", "scales") + (("qzeros",) if hasattr(layer, "qzeros") else ()):
            assert torch.equal(getattr(new, key), getattr(layer, key)), key
    else:  # a GPTQ layer is re-quantized by RTN: same grid, error of RTN size
        assert relative(BACKEND.dequantize(new), original) < max_weight_error
    shifted = original + 0.05 * torch.randn_like(original)
    assert relative(BACKEND.dequantize(BACKEND.requantize(layer, shifted)), shifted) < max_weight_error

    # save / load: safetensors + json only, identical logits
    ids = batches[0]
    with torch.no_grad():
        reference = model(ids).logits
    BACKEND.save(model, str(tmp_path), resolved)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "inc_layers.json", "model.safetensors"]
    assert BACKEND.folder_options(str(tmp_path)) == resolved
    layout = json.loads((tmp_path / "inc_layers.json").read_text())
    assert layout["layers"][name]["bits"] == layer.bits
    loaded = BACKEND.load(str(tmp_path), resolved)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference)
    assert torch.equal(BACKEND.dequantize(loaded.get_submodule(name)), weight)


def test_gptq_beats_rtn_on_output_error(batches):
    full = toy.build_model()
    with torch.no_grad():
        reference = full(batches[0]).logits
        rtn = quantized()[0](batches[0]).logits
        gptq = quantized(batches, algorithm="gptq")[0](batches[0]).logits
    assert relative(gptq, reference) < 0.8 * relative(rtn, reference)


# ------------------------------------------------------------------------------------------------ adapters
def _train(peft_model, batch, steps=8):
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    return train_steps(peft_model, [batch] * steps)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_train_and_merge_through_peft(method, batches):
    import peft

    model, _ = quantized()
    base_packed = model.model.layers[0].self_attn.q_proj.qweight.clone()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS, use_dora=method == "dora")
    config._register_custom_module(BACKEND.peft_layer_types())
    peft_model = peft.get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "IncLoraLinear"
    losses = _train(peft_model, batches[0])
    assert losses[-1] < losses[0] - 0.3
    assert torch.equal(layer.get_base_layer().qweight, base_packed)  # the quantized base is frozen

    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(batches[1]).logits
        original_base = layer.base_layer
        peft_model.merge_adapter()
        assert type(layer.base_layer) is type(original_base) and layer.base_layer is not original_base
        merged = peft_model(batches[1]).logits
        assert relative(merged, adapted) < 0.3  # re-quantization rounds the merged weight
        peft_model.unmerge_adapter()
        assert layer.base_layer is original_base
        assert torch.equal(peft_model(batches[1]).logits, adapted)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_qadapt_merge_strategies(method, batches):
    api = pytest.importorskip("qadapt.api")
    model = api.load(toy.build_model(), "inc")
    peft_model = api.attach(model, method)
    _train(peft_model, batches[0], steps=4)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(batches[1]).logits
    report = api.merge(peft_model, "dequantize")
    assert report.output_error < 1e-5
    api.unmerge(peft_model)
    report = api.merge(peft_model, "requantize")
    assert 0 < report.output_error < 0.3 and report.mean_kept > 0.5
    quantized_now = [m for m in peft_model.modules() if isinstance(m, BACKEND.quantized_layer_types())]
    assert len(quantized_now) == 14  # the merged base is INC layers again
    api.unmerge(peft_model)
    with torch.no_grad():
        assert torch.equal(peft_model(batches[1]).logits, adapted)


@pytest.mark.parametrize("method", ["vera", "ia3", "adalora"])
def test_peft_alone_cannot_wrap_inc_layers_for_these_methods(method):
    """PEFT has no hook for these methods and fails on INC's layers: qadapt declares them through its nn.Linear
    proxy instead (tests/test_capabilities.py drives them)."""
    import peft

    assert method in BACKEND.proxy_methods
    assert BACKEND.capabilities(BACKEND.validate_options({}))[(method, "train")]
    model, _ = quantized()
    config = {
        "vera": lambda: peft.VeraConfig(r=8, target_modules=LINEARS),
        "ia3": lambda: peft.IA3Config(target_modules=LINEARS, feedforward_modules=["down_proj"]),
        "adalora": lambda: peft.AdaLoraConfig(target_modules=LINEARS, total_step=10),
    }[method]()
    with pytest.raises((ValueError, TypeError, NotImplementedError)):
        peft.get_peft_model(model, config)


# ------------------------------------------------------------------------------------------------ round trips
def test_trainer_runs_on_an_inc_model_quantized_in_this_process(batches, tmp_path):
    import qadapt
    from transformers import Trainer, TrainingArguments

    # INC marks the model is_quantized=True; transformers' Trainer then asked it for an hf_quantizer it has not
    model = qadapt.attach(qadapt.load(toy.build_model(), "inc"), "lora", r=4)
    rows = [{"input_ids": row, "labels": row} for batch in batches for row in batch]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, bf16=True, save_strategy="no", dataloader_num_workers=0)
    assert Trainer(model=model, args=args, train_dataset=rows).train().global_step == 2


def test_an_inc_base_is_refused_by_plain_transformers_and_detected_by_qadapt(batches, tmp_path):
    import qadapt
    from transformers import AutoModelForCausalLM

    from qadapt.record import get_record

    model = qadapt.load(toy.build_model(), "inc", bits=8, group_size=32, sym=False)
    qadapt.save(model, tmp_path / "out")
    base = tmp_path / "out" / "base"
    with pytest.raises(ValueError, match="no `quant_method`"):
        AutoModelForCausalLM.from_pretrained(base)
    assert (base / "generation_config.json").exists()
    loaded = qadapt.load(base)
    assert get_record(loaded).backend == "inc"
    assert {k: get_record(loaded).options[k] for k in ("bits", "group_size", "sym")} == {"bits": 8, "group_size": 32,
                                                                                         "sym": False}
    with pytest.raises(qadapt.InvalidOptionError, match="bits=4 asked, 8 in the folder"):
        qadapt.load(base, bits=4)
    with torch.no_grad():
        assert torch.equal(loaded(batches[0]).logits, model(batches[0]).logits)


def test_the_weight_inc_caches_after_a_forward_is_counted_as_memory(batches):
    from qadapt.memory import storage_bytes

    model, _ = quantized()
    packed = storage_bytes(model)
    with torch.no_grad():
        model(batches[0])  # INC's CPU forward keeps each layer's de-quantized float32 weight as layer.weight
    cached = sum(layer.weight.numel() * layer.weight.element_size() for _, layer in inc._inc_layers(model))
    # (the forward also turns INC's float16 bias buffers into float32 ones: a few bytes more)
    assert cached > packed and packed + cached <= storage_bytes(model) < packed + cached + packed // 10


@pytest.mark.parametrize("arch", ["gpt2", "qwen2-moe"])
def test_conv1d_and_moe_experts(arch):
    """INC quantizes Conv1D itself; fused experts are split with defuser first, Qwen2-MoE's shared_expert_gate (a
    router, 128 -> 1) stays in full precision."""
    from qadapt.testing import check_backend

    results = check_backend("inc", {}, methods=["lora"], architecture=arch)
    assert [r.outcome for r in results if r.operation not in ENGINE_CELLS] == ["passed"] * 5, [str(r) for r in results]


def test_a_bfloat16_checkpoint_runs_in_float32_and_says_so(tmp_path):
    """INC's weight-only layers compute in float32 on a CPU; a bfloat16 checkpoint (what most are) loaded as it was
    failed at its first forward (bfloat16 head, float32 activations). It is converted to float32, with a warning,
    and saved and reloaded in float32."""
    import qadapt

    toy.build_model(dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with pytest.warns(UserWarning, match="compute in float32 on the CPU; the torch.bfloat16 model"):
        model = qadapt.load(str(tmp_path / "bf16"), backend="inc")
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    ids = torch.randint(4, 512, (1, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    qadapt.save(model, tmp_path / "saved")
    reloaded = qadapt.load(str(tmp_path / "saved"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)

