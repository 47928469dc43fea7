"""AQLM backend: qadapt's quantizer, aqlm.QuantizedLinear layers, transformers' AQLM checkpoints, PEFT adapters.

Everything runs on the tiny toy Llama on CPU (a few seconds per test). Numbers are compared to references computed
here: aqlm's own de-quantization, dense matmuls, round-to-nearest quantization, weights built from known codebooks.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest

torch = pytest.importorskip("torch")
aqlm = pytest.importorskip("aqlm", reason="AQLM backend needs the `aqlm` extra (aqlm[cpu])")

import qadapt  # noqa: E402
from qadapt.testing import toy  # noqa: E402
from qadapt.errors import IncompatibleError  # noqa: E402
from qadapt_plugins import _aqlm_quantize as aq  # noqa: E402
from qadapt_plugins._aqlm_layers import install_cpu_kernels  # noqa: E402
from qadapt_plugins.aqlm import AqlmBackend  # noqa: E402

from .conftest import train_steps  # noqa: E402

FAST = {"kmeans_iterations": 6, "refine_passes": 2}
TARGET_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def backend():
    return AqlmBackend()


@pytest.fixture(scope="module")
def quantized_2x8(backend):
    """The toy model quantized 2x8 (module scope: tests that change it make their own)."""
    return backend.quantize(toy.build_model(), backend.validate_options(FAST)), toy.build_model()


def fresh(backend, **options):
    return backend.quantize(toy.build_model(), backend.validate_options({**FAST, **options}))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------- the quantizer
def test_quantizer_recovers_weights_built_from_a_codebook():
    # every row: the same 16 known 8-vectors in a random order, times a per-row scale. After AQLM's per-row
    # normalisation there are exactly 16 distinct groups, so 1x8 AQLM (256 entries) can represent it exactly.
    gen = torch.Generator().manual_seed(1)
    book = torch.randn(16, 8, generator=gen)
    picks = torch.stack([torch.randperm(16, generator=gen) for _ in range(64)])
    row_scale = torch.rand(64, 1, generator=gen) + 0.5
    weight = book[picks].reshape(64, 128) * row_scale
    result = aq.quantize_weight(weight, in_group_size=8, num_codebooks=1, nbits_per_codebook=8, kmeans_iterations=30)
    restored = aq.dequantize_codes(result.codes, result.codebooks, result.scales)
    assert rel(restored, weight) < 1e-4
    assert result.codes.shape == (64, 16, 1) and result.codebooks.shape == (1, 256, 1, 8) and result.scales.shape == (64, 1, 1, 1)


def test_more_codebooks_lower_error_and_beat_rtn_at_equal_bits():
    weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    errors = {}
    for m in (1, 2):
        r = aq.quantize_weight(weight, num_codebooks=m, nbits_per_codebook=8, kmeans_iterations=10)
        errors[m] = rel(aq.dequantize_codes(r.codes, r.codebooks, r.scales), weight)
    assert errors[2] < 0.75 * errors[1]
    # 2x8 on 256x256: 2 bits of codes + codebooks + scales = 2.56 bits/param; RTN 2-bit g64 is 2.5 bits/param
    assert aq.bits_per_parameter(256, 256, in_group_size=8, out_group_size=1, num_codebooks=2, nbits_per_codebook=8) > 2.5
    assert errors[2] < rel(aq.rtn_quantize(weight, 2, 64), weight)


def test_refinement_lowers_error():
    weight = torch.randn(128, 128, generator=torch.Generator().manual_seed(2))
    kwargs = dict(num_codebooks=2, nbits_per_codebook=8, kmeans_iterations=10)
    plain = aq.quantize_weight(weight, refine_passes=0, **kwargs)
    refined = aq.quantize_weight(weight, refine_passes=3, **kwargs)
    e0 = rel(aq.dequantize_codes(plain.codes, plain.codebooks, plain.scales), weight)
    e1 = rel(aq.dequantize_codes(refined.codes, refined.codebooks, refined.scales), weight)
    assert e1 < e0


def test_the_codebooks_are_fitted_where_the_model_will_run(backend, monkeypatch):
    # qadapt fits on default_device() (a CUDA GPU where there is one), and the layers it builds are on the CPU
    # until the model is moved: the seam, checked on any machine by recording what the plugin asks for
    import qadapt.hf

    asked = []
    fit = aq.quantize_weight

    def recording(weight, **kwargs):
        asked.append(kwargs["device"])
        result = fit(weight, **kwargs)
        assert result.codes.device.type == result.codebooks.device.type == result.scales.device.type == "cpu"
        return result

    monkeypatch.setattr(aq, "quantize_weight", recording)
    fresh(backend)
    assert len(asked) == 14 and set(asked) == {qadapt.hf.default_device()}


@pytest.mark.gpu
def test_gpu_fit_on_cuda_starts_from_the_same_centroids_and_is_as_good_as_on_the_host():
    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3)) * 0.02
    kwargs = dict(num_codebooks=2, nbits_per_codebook=8, kmeans_iterations=0, refine_passes=0)
    # no Lloyd iteration: the centroids are the seeded random groups, the same on either device
    host, gpu = (aq.quantize_weight(weight, device=device, **kwargs) for device in ("cpu", "cuda"))
    assert gpu.codes.device.type == "cpu"
    torch.testing.assert_close(gpu.codebooks[0], host.codebooks[0])
    kwargs.update(kmeans_iterations=10, refine_passes=2)
    errors = {}
    for device in ("cpu", "cuda"):
        r = aq.quantize_weight(weight, device=device, **kwargs)
        errors[device] = rel(aq.dequantize_codes(r.codes, r.codebooks, r.scales), weight)
    assert errors["cuda"] < 0.4 and abs(errors["cuda"] - errors["cpu"]) < 0.02 * errors["cpu"]


def test_1x16_on_a_tiny_model_is_capped_and_says_so(backend):
    with pytest.warns(UserWarning, match="fewer weight groups than codebook entries"):
        model = fresh(backend, num_codebooks=1, nbits_per_codebook=16)
    reference = toy.build_model()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.codebooks.shape == (1, 65536, 1, 8) and layer.codes.dtype == torch.int16
    # every group is its own codebook entry: exact, but the codebook outweighs the weight
    assert rel(backend.dequantize(layer), reference.model.layers[0].self_attn.q_proj.weight) < 1e-6
    assert aq.bits_per_parameter(128, 128, in_group_size=8, out_group_size=1, num_codebooks=1, nbits_per_codebook=16) > 16


# ---------------------------------------------------------------------------------------------- format and kernels
def test_quantized_model_is_aqlm_format(backend, quantized_2x8):
    model, reference = quantized_2x8
    layers = {n: m for n, m in model.named_modules() if isinstance(m, aqlm.QuantizedLinear)}
    assert len(layers) == 14 and isinstance(model.lm_head, torch.nn.Linear)
    q = layers["model.layers.0.mlp.down_proj"]  # 128 x 256
    assert q.codes.dtype == torch.int8 and q.codes.shape == (128, 32, 2)
    assert q.codebooks.shape == (2, 256, 1, 8) and q.scales.shape == (128, 1, 1, 1)
    config = model.config.quantization_config
    assert config.quant_method == "aqlm" and (config.num_codebooks, config.nbits_per_codebook, config.in_group_size) == (2, 8, 8)
    assert "lm_head.weight" in config.linear_weights_not_to_quantize
    assert model.is_quantized and model.hf_quantizer is not None
    # our de-quantization agrees with aqlm's own, and the weights are close to the originals
    from aqlm.utils import _dequantize_weight, unpack_int_data

    theirs = _dequantize_weight(unpack_int_data(q.codes, 8), q.codebooks, q.scales)
    assert torch.equal(backend.dequantize(q), theirs)
    original = reference.model.layers[0].mlp.down_proj.weight
    assert rel(theirs, original) < 0.3 < rel(aq.rtn_quantize(original, 2, 128), original)


def test_forward_and_backward_match_dense_reference(backend, quantized_2x8):
    model, _ = quantized_2x8
    layer = model.model.layers[1].self_attn.o_proj
    weight = backend.dequantize(layer)
    for rows in (1, 40):  # aqlm's "gemv" and "gemm" sizes
        x = torch.randn(rows, 128, requires_grad=True)
        y = layer(x)
        torch.testing.assert_close(y, x @ weight.T, rtol=1e-5, atol=1e-5)
        grad = torch.randn_like(y)
        y.backward(grad)
        torch.testing.assert_close(x.grad, grad @ weight, rtol=1e-5, atol=1e-5)
    # deterministic from call to call (aqlm's numba kernel is not on 2 threads: it races)
    x = torch.randn(33, 128)
    assert torch.equal(layer(x), layer(x))


def test_aqlm_numba_path_permutes_codes_and_qadapt_undoes_it(backend):
    model = fresh(backend)
    layer = model.model.layers[0].mlp.gate_proj  # 256 x 128: codes (256, 16, 2)
    before = backend.dequantize(layer).clone()
    codes = layer.codes.detach().clone()
    layer.gemv_op = layer.gemm_op = layer.use_gemv_rule = None  # aqlm's own kernel choice
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert layer.codes.shape == (16, 256, 2)  # aqlm transposed the codes in place for its numba kernel
    assert torch.equal(backend.dequantize(layer), before)  # qadapt reads them either way
    install_cpu_kernels(layer)
    assert torch.equal(layer.codes, codes)
    x = torch.randn(5, 128, requires_grad=True)
    layer(x).sum().backward()  # the backward aqlm's numba path cannot do
    torch.testing.assert_close(x.grad, torch.ones(5, 256) @ before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- save / load
def test_save_and_load_roundtrip(backend, quantized_2x8, tmp_path):
    model, _ = quantized_2x8
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    backend.save(model, str(tmp_path), {})
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "aqlm" and config["num_codebooks"] == 2 and config["nbits_per_codebook"] == 8
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.codes").dtype == torch.int8
    assert {"model.layers.0.self_attn.q_proj.codes", "model.layers.0.self_attn.q_proj.codebooks",
            "model.layers.0.self_attn.q_proj.scales", "lm_head.weight"} <= keys
    assert not any(k.endswith(".weight") and "proj" in k for k in keys)
    assert backend.folder_options(str(tmp_path)) == {"num_codebooks": 2, "nbits_per_codebook": 8, "in_group_size": 8,
                                                    "skip_modules": ("lm_head",)}
    loaded = backend.load(str(tmp_path), {})
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, aqlm.QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)


def test_loads_checkpoint_listing_weight_names_only(backend, quantized_2x8, tmp_path):
    # Published AQLM checkpoints list `lm_head.weight`; transformers 5 matches module names, so without qadapt's
    # fix the head would become an empty AQLM layer.
    model, _ = quantized_2x8
    backend.save(model, str(tmp_path), {})
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["linear_weights_not_to_quantize"] = ["lm_head.weight"]
    path.write_text(json.dumps(config))
    loaded = backend.load(str(tmp_path), {})
    assert isinstance(loaded.lm_head, torch.nn.Linear)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_qadapt_load_quantizes_a_folder_and_reloads_an_aqlm_one(tmp_path):
    fp = toy.save_model(toy.build_model(), tmp_path / "fp")
    model = qadapt.load(fp, "aqlm", **FAST)
    assert isinstance(model.model.layers[0].self_attn.v_proj, aqlm.QuantizedLinear)
    out = tmp_path / "aqlm"
    out.mkdir()
    qadapt.get_backend("aqlm").save(model, str(out), {})
    again = qadapt.load(str(out), "aqlm")
    assert torch.equal(again.model.layers[1].mlp.up_proj.codes, model.model.layers[1].mlp.up_proj.codes)


def test_a_folder_is_quantized_and_reloaded_in_the_dtype_its_config_records(tmp_path):
    """As transformers' dtype="auto" and every other backend: a bfloat16 checkpoint gives a bfloat16 model (the
    H100 benchmark caught this backend training a bfloat16 checkpoint in float32)."""
    fp = toy.save_model(toy.build_model(dtype=torch.bfloat16), tmp_path / "bf16")
    model = qadapt.load(fp, "aqlm", **FAST)
    layer = model.model.layers[0].mlp.up_proj
    assert model.model.embed_tokens.weight.dtype == layer.codebooks.dtype == layer.scales.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert model(ids).logits.dtype == torch.bfloat16
    out = tmp_path / "aqlm"
    out.mkdir()
    qadapt.get_backend("aqlm").save(model, str(out), {})
    again = qadapt.load(str(out), "aqlm")
    assert again.model.layers[0].mlp.up_proj.codebooks.dtype == torch.bfloat16
    assert torch.equal(again(ids).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------- dequantize / requantize
def test_requantize_keeps_codebooks_and_format(backend, quantized_2x8):
    # (qadapt refuses merge(strategy="requantize") on AQLM, see the capability table; the method itself works)
    model, _ = quantized_2x8
    layer = model.model.layers[0].self_attn.k_proj
    weight = backend.dequantize(layer)
    snapshot = {k: v.clone() for k, v in layer.state_dict().items()}
    same = backend.requantize(layer, weight)
    assert torch.equal(same.codes, layer.codes)  # a weight the codebooks hold exactly comes back exactly
    delta = 0.5 * weight.std() * torch.randn_like(weight)
    new = backend.requantize(layer, weight + delta)
    assert isinstance(new, aqlm.QuantizedLinear) and new.codes.dtype == torch.int8
    assert torch.equal(new.codebooks, layer.codebooks) and torch.equal(new.scales, layer.scales)
    stored = backend.dequantize(new)
    assert (stored - (weight + delta)).norm() < delta.norm()  # part of the change survives
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in snapshot.items())  # original untouched
    x = torch.randn(3, 128)
    torch.testing.assert_close(new(x), x @ stored.T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- adapters
def _train(peft_model, steps=3):
    batches = [torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(s)) for s in range(steps)]
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    peft_model.train()
    losses = train_steps(peft_model, batches * 2)
    peft_model.eval()
    params = dict(peft_model.named_parameters())
    assert trainable and all(not torch.equal(params[n], v) for n, v in trainable.items())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    return losses


@pytest.mark.parametrize("shape", [(2, 8), (1, 8)])
def test_lora_trains_on_256_entry_codebooks(shape):
    model = qadapt.load(toy.build_model(), "aqlm", num_codebooks=shape[0], nbits_per_codebook=shape[1], **FAST)
    peft_model = qadapt.attach(model, "lora", r=4)
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "AqlmLoraLinear"
    losses = _train(peft_model)
    assert losses[-1] < losses[0]


def test_lora_trains_on_1x16():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qadapt.load(toy.build_model(), "aqlm", num_codebooks=1, nbits_per_codebook=16)
    _train(qadapt.attach(model, "lora", r=4))


def test_vera_trains_and_merges(tmp_path):
    model = qadapt.load(toy.build_model(), "aqlm", **FAST)
    peft_model = qadapt.attach(model, "vera", r=16)
    _train(peft_model)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    report = qadapt.merge(peft_model, "dequantize")
    assert report.output_error < 1e-5
    qadapt.unmerge(peft_model)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, before)


def test_lora_merge_unmerge_and_save(tmp_path):
    model = qadapt.load(toy.build_model(), "aqlm", **FAST)
    peft_model = qadapt.attach(model, "lora", r=4)
    _train(peft_model)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    exact = qadapt.merge(peft_model, "dequantize")
    assert exact.output_error < 1e-5
    qadapt.unmerge(peft_model)
    # re-quantizing into the same codebooks loses the adapter: declared "no", refused before any change
    with pytest.raises(IncompatibleError, match="loses the adapter"):
        qadapt.merge(peft_model, "requantize")
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, before)
    qadapt.save(peft_model, tmp_path / "ckpt")
    restored = qadapt.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,options", [("dora", {}), ("adalora", {"total_step": 4}), ("ia3", {})])
def test_methods_peft_refuses_on_aqlm_train_through_the_proxy(backend, method, options):
    import peft

    assert method in backend.proxy_methods
    assert backend.capabilities(backend.validate_options({}))[(method, "train")]
    # PEFT alone refuses aqlm layers for these methods ...
    model = qadapt.load(toy.build_model(), "aqlm", **FAST)
    configs = {
        "dora": peft.LoraConfig(target_modules=list(TARGET_LAYERS), use_dora=True),
        "adalora": peft.AdaLoraConfig(target_modules=list(TARGET_LAYERS), total_step=4),
        "ia3": peft.IA3Config(target_modules=list(TARGET_LAYERS), feedforward_modules=["down_proj"]),
    }
    with pytest.raises(ValueError, match="not support|not supported"):
        peft.get_peft_model(model, configs[method])
    # ... qadapt attaches them, and the adapter trains (tests/test_capabilities.py checks every cell)
    model = qadapt.attach(qadapt.load(toy.build_model(), "aqlm", **FAST), method, **options)
    assert any(p.requires_grad for p in model.parameters())


def test_capabilities_for_every_option_shape(backend):
    from qadapt.capabilities import METHODS, OPERATIONS

    for shape in [(1, 8), (2, 8), (1, 16), (4, 8)]:
        table = backend.capabilities(backend.validate_options({"num_codebooks": shape[0], "nbits_per_codebook": shape[1]}))
        assert set(table) == {(m, o) for m in METHODS for o in OPERATIONS}
        assert all(table[(m, "train")] for m in METHODS)
        assert all(table[(m, "merge_dequantized")] and table[(m, "unmerge")] for m in METHODS)
        assert not any(table[(m, "merge")] for m in METHODS)
        assert all(cell.reason for cell in table.values())
    assert "numba" in backend.capabilities(backend.validate_options({}))[("lora", "train")].reason


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_forward_and_lora_backward(backend, dtype):
    """On the GPU as on CPU, an AQLM layer computes x @ W.T with W from aqlm's own de-quantization, forward and
    backward, in any dtype (aqlm's CUDA training kernels pass back a wrong input gradient for 2x8 and 1x8 codebooks:
    bench/aqlm_cuda_kernels.py)."""
    dtype = getattr(torch, dtype)
    model = qadapt.load(toy.build_model(dtype=dtype), "aqlm", **FAST)
    assert model.device.type == "cuda"  # fitted on the GPU, layers built on the host, moved where the GPU is
    layer = model.model.layers[0].self_attn.q_proj
    weight = backend.dequantize(layer).to(dtype)
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    for rows in (1, 64):
        x = torch.randn(rows, 128, device="cuda", dtype=dtype, requires_grad=True)
        y = layer(x)
        torch.testing.assert_close(y.float(), (x @ weight.T).float(), rtol=tolerance, atol=tolerance)
        y.sum().backward()
        torch.testing.assert_close(x.grad.float(), (torch.ones_like(y) @ weight).float(), rtol=tolerance, atol=tolerance)
    peft_model = qadapt.attach(model, "lora", r=4)
    batch = torch.randint(0, 512, (2, 24), device="cuda")
    loss = peft_model(input_ids=batch, labels=batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.gpu
def test_gpu_train_on_the_dequantizing_kernel_then_serve_on_aqlms_own(backend, batches, tmp_path):
    """kernel='aqlm' is the serving kernel (aqlm's CUDA kernels): an adapter trained on the default kernel, saved,
    and loaded onto it gives the same logits; nothing trains on it."""
    model = qadapt.load(toy.build_model(dtype=torch.float16), "aqlm", **FAST)
    reference_weight = backend.dequantize(model.model.layers[0].mlp.up_proj)
    peft_model = qadapt.attach(model, "lora", r=8)
    ids = batches[0].cuda()
    losses = train_steps(peft_model, [ids] * 4)
    assert losses[-1] < losses[0], losses
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    qadapt.save(peft_model, tmp_path / "trained")

    served = qadapt.load(str(tmp_path / "trained"), kernel="aqlm")
    with torch.no_grad():
        got = served(input_ids=ids).logits
        with served.disable_adapter():
            base_only = served(input_ids=ids).logits
    layer = served.get_base_model().model.layers[0].mlp.up_proj
    layer = getattr(layer, "base_layer", layer)
    assert layer.gemv_op is not None and type(layer.gemv_op).__name__ != "_DequantMatmul"  # aqlm's own kernels ran
    assert torch.equal(backend.dequantize(layer), reference_weight)  # the codes as stored: not permuted
    assert rel(got, expected) < 1e-2, rel(got, expected)
    assert rel(base_only, expected) > 10 * rel(got, expected)  # the adapter is what makes them agree

    base = qadapt.load(str(tmp_path / "trained" / "base"), "aqlm", kernel="aqlm")
    with pytest.raises(IncompatibleError, match="wrong input gradient"):
        qadapt.attach(base, "lora")  # refused before any change
    served.train()
    with pytest.raises(IncompatibleError, match="kernel='aqlm' base"):
        served(input_ids=ids, labels=ids)  # a hand-made training step is refused too


def test_the_serving_kernel_is_refused_without_a_cuda_gpu_before_any_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = toy.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qadapt.errors.InvalidOptionError, match="CUDA GPU only"):
        qadapt.load(model, "aqlm", kernel="aqlm", **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_serving_kernel_refuses_float32_and_every_training_method(backend, monkeypatch):
    from qadapt.capabilities import METHODS

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the option check only: nothing runs on a GPU
    options = backend.validate_options({**FAST, "kernel": "aqlm"})
    with pytest.raises(qadapt.errors.InvalidOptionError, match="float16 or bfloat16"):
        backend.quantize(toy.build_model(), options)  # refused before the k-means
    table = backend.capabilities(options)
    for method in METHODS:
        cell = table[(method, "train")]
        assert not cell and "wrong input gradient" in cell.reason and "load_adapter" in cell.hint
    assert backend.capabilities(backend.validate_options(FAST))[("lora", "train")]


def test_a_training_forward_on_the_serving_kernel_is_refused(backend, quantized_2x8):
    from qadapt_plugins._aqlm_layers import install_serving_kernels

    model = install_serving_kernels(copy.deepcopy(quantized_2x8[0]))
    model.train()
    ids = torch.randint(0, 512, (1, 8))
    with pytest.raises(IncompatibleError, match="kernel='aqlm' base"):
        model(input_ids=ids)
    assert all(m.gemv_op is None for m in model.modules() if isinstance(m, aqlm.QuantizedLinear))  # nothing ran


def test_a_checkpoint_loads_onto_the_serving_kernel_and_refuses_float32_first(backend, tmp_path):
    # backend.load itself (the option check that needs a CUDA GPU is the orchestrator's, tested above)
    half = backend.quantize(toy.build_model(dtype=torch.bfloat16), backend.validate_options(FAST))
    backend.save(half, str(tmp_path / "bf16"), {})
    options = {**backend.validate_options(FAST), "kernel": "aqlm"}
    served = backend.load(str(tmp_path / "bf16"), options)
    layers = [m for m in served.modules() if isinstance(m, aqlm.QuantizedLinear)]
    assert len(layers) == 14 and all(m.gemv_op is None for m in layers)  # left to aqlm's own choice at first forward
    served.train()
    with pytest.raises(IncompatibleError, match="kernel='aqlm' base"):
        served(input_ids=torch.randint(0, 512, (1, 8)))
    full = backend.quantize(toy.build_model(), backend.validate_options(FAST))  # float32
    backend.save(full, str(tmp_path / "fp32"), {})
    with pytest.raises(qadapt.errors.InvalidOptionError, match="float16 or bfloat16"):
        backend.load(str(tmp_path / "fp32"), options)


def test_lora_trains_on_linears_with_a_bias():
    """qadapt's de-quantizing Function returned ``F.linear(x, W, b)``, a view for 3-D input with a bias; PEFT's
    AqlmLoraLinear's ``result += ...`` then raised "a view was created in no_grad mode" (Qwen2, Bloom, OPT...)."""
    from qadapt.testing import check_backend

    options = {"num_codebooks": 1, "nbits_per_codebook": 8, **FAST}
    results = check_backend("aqlm", options, methods=["lora"], architecture="qwen2")
    assert all(r.ok for r in results) and results[0].outcome == "passed", [str(r) for r in results]


def test_conv1d_and_fused_experts_are_refused_before_any_work():
    import qadapt
    from qadapt.testing import panel

    for arch, words in (("gpt2", "Conv1D"), ("mixtral", "fused MoE expert")):
        with pytest.raises(qadapt.ArchitectureError, match=words):
            qadapt.load(panel.build(arch), backend="aqlm", **FAST)
