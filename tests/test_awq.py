"""AWQ backend (gptqmodel): CPU refuses to quantize; AWQ checkpoints load, de-/re-quantize and train on CPU.

``qadapt_plugins/data/awq-tiny`` is a real AWQ checkpoint of the toy Llama, made by gptqmodel's AWQ on a GPU with
``tools/make_awq_tiny.py`` (see docs/gpu-runs.md); ``reference.safetensors`` beside it holds the float model's and
the GPU AWQ model's logits for fixed inputs. A second checkpoint is made here on CPU by packing round-to-nearest
weights with gptqmodel's own AWQ packer: the same file format, without AWQ's activation-aware scale search.
"""

from __future__ import annotations

import json
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gptqmodel", reason="AWQ backend needs the `awq` extra (gptqmodel)")

import qadapt  # noqa: E402
from qadapt.testing import toy  # noqa: E402
from qadapt.errors import BackendUnavailableError  # noqa: E402
from qadapt_plugins import _gptqmodel_common as common  # noqa: E402
from qadapt_plugins.awq import AWQBackend  # noqa: E402

AWQ_TINY = AWQBackend.verification_checkpoint  # shipped with the plugin
needs_data = pytest.mark.skipif(
    not os.path.exists(os.path.join(AWQ_TINY, "model.safetensors")),
    reason="qadapt_plugins/data/awq-tiny is missing: make it on a GPU with tools/make_awq_tiny.py",
)


@pytest.fixture(scope="module")
def backend():
    return AWQBackend()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference_unpack(module):
    """AWQ "gemm" format, from the spec: qweight (in, out*bits/32) and qzeros (groups, out*bits/32) pack 8 output
    columns per int32 in the interleaved order 0,2,4,6,1,3,5,7 (low bits first)."""
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # position in the word of output column j (inverse of 0,2,4,6,1,3,5,7)

    def unpack(packed):
        words = packed.to(torch.int64) & 0xFFFFFFFF
        fields = torch.stack([(words >> (4 * k)) & 0xF for k in range(8)], dim=-1)  # (..., cols, 8)
        return fields[..., order].reshape(packed.shape[0], -1)

    codes, zeros = unpack(module.qweight), unpack(module.qzeros)
    group = module.group_size
    weight = (codes - zeros.repeat_interleave(group, 0)).float() * module.scales.float().repeat_interleave(group, 0)
    return weight.T


def rtn_awq_checkpoint(path, group_size=64):
    """The toy Llama, each linear layer packed RTN (min-max, zero points) into gptqmodel's AwqTorchLinear and saved in
    the AWQ gemm format: what a CPU can honestly make without AWQ's CUDA-only search."""
    common.import_gptqmodel()
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear

    model = toy.build_model(dtype=torch.float16)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
            weight = module.weight.detach().float()
            groups = weight.reshape(weight.shape[0], -1, group_size)
            low = groups.amin(-1).clamp(max=0)
            high = groups.amax(-1).clamp(min=0)
            scales = ((high - low) / 15).clamp(min=1e-5).half().float()
            zeros = torch.round(-low / scales).clamp(0, 15)
            layer = AwqTorchLinear(bits=4, group_size=group_size, sym=False, desc_act=False,
                                   in_features=module.in_features, out_features=module.out_features, bias=False,
                                   register_buffers=True)
            step, zero = scales.repeat_interleave(group_size, 1), zeros.repeat_interleave(group_size, 1)
            weight = torch.maximum(torch.minimum(weight, step * (15 - zero)), -step * zero)  # the packer does not clamp
            layer.pack(common.plain_linear(weight, None), scales, zeros)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    model.config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                        "zero_point": True, "version": "gemm", "sym": False, "desc_act": False}
    common.save_state(model, str(path), lambda m: {"qweight": m.qweight, "qzeros": m.qzeros, "scales": m.scales}
                      if isinstance(m, AwqTorchLinear) else None)
    return toy.build_model(dtype=torch.float16)


@pytest.fixture(scope="module")
def rtn(tmp_path_factory):
    path = tmp_path_factory.mktemp("awq-rtn")
    reference = rtn_awq_checkpoint(path)
    return str(path), reference


# ---------------------------------------------------------------------------------------------- quantize
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_quantize_refuses_without_cuda_before_any_work(backend, batches):
    model = toy.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BackendUnavailableError, match="AWQ quantization needs a CUDA GPU") as refused:
        qadapt.load(model, "awq", calibration=batches)
    assert "backend='gptq'" in refused.value.hint
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- CPU checkpoints
def test_cpu_packed_checkpoint_loads_and_dequantizes_to_the_rtn_weights(backend, rtn):
    path, reference = rtn
    assert backend.folder_options(path) is not None and qadapt.get_backend("gptq").folder_options(path) is None
    model = qadapt.load(path, "awq")
    layer = model.model.layers[0].mlp.gate_proj
    weight = reference.model.layers[0].mlp.gate_proj.weight.detach().float()
    step = layer.scales.float().repeat_interleave(64, 0).T
    deq = backend.dequantize(layer)
    assert torch.equal(deq, reference_unpack(layer))
    error = (deq - weight).abs()
    # round-to-nearest: within half a step, but where the rounded zero point clips a group's extreme by < 1 step
    assert (error <= step / 2 + 1e-4).float().mean() > 0.999 and (error <= step).all()
    x = torch.randn(4, layer.in_features)
    torch.testing.assert_close(layer(x), x @ deq.T, rtol=1e-5, atol=1e-5)  # float32 compute on CPU


@needs_data
def test_gpu_made_awq_checkpoint_runs_on_cpu(backend):
    from safetensors.torch import load_file

    with open(os.path.join(AWQ_TINY, "config.json")) as handle:
        qconfig = json.load(handle)["quantization_config"]
    assert qconfig["quant_method"] == "awq" and qconfig["bits"] == 4 and qconfig["group_size"] == 64
    assert sum(os.path.getsize(os.path.join(AWQ_TINY, f)) for f in os.listdir(AWQ_TINY)) < 2 * 1024 * 1024
    ref = load_file(os.path.join(AWQ_TINY, "reference.safetensors"))
    model = qadapt.load(AWQ_TINY, "awq")
    assert type(model.model.layers[0].self_attn.q_proj).__name__.startswith("AwqTorchLinear")
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits
    assert rel(logits, ref["awq_logits_gpu"]) < 5e-3  # the same checkpoint on the GPU (float16 kernels)
    assert rel(logits, ref["float_logits"]) < 0.2  # 4-bit AWQ of the toy model
    for layer in (model.model.layers[0].self_attn.q_proj, model.model.layers[1].mlp.down_proj):
        deq = backend.dequantize(layer)
        assert torch.equal(deq, reference_unpack(layer))
        torch.testing.assert_close(common.probe_weight(layer), deq, rtol=1e-5, atol=1e-5)


def test_prepare_fast_trains_like_the_plain_path(batches):
    """qadapt.prepare's fused layers through the AWQ training route: same loss and LoRA gradients as PEFT's path in
    float32 (the route must give the float32 weight qadapt's float32 layer computes with, not gptqmodel's float16
    compute dtype: that difference was 2e-3 on the attention's gradients)."""

    def step(fast):
        model = qadapt.load(AWQ_TINY, "awq")
        torch.manual_seed(0)
        model = qadapt.attach(model, "lora", r=8, init_lora_weights=False)
        if fast:
            assert len(qadapt.prepare(model, "fast").parts["lora"].modules) == 14
        loss = model(input_ids=batches[0], labels=batches[0]).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    (loss_plain, plain), (loss, fast) = step(False), step(True)
    assert abs(loss - loss_plain) / loss_plain < 1e-5
    assert max(rel(fast[n], plain[n]) for n in plain) < 1e-4


def test_requantize_keeps_the_grid(backend, rtn):
    model = qadapt.load(rtn[0], "awq")
    layer = model.model.layers[1].self_attn.o_proj
    deq = backend.dequantize(layer)
    same = backend.requantize(layer, deq)
    for key in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(same, key), getattr(layer, key)), key
    big = deq + 0.5 * torch.randn(deq.shape, generator=torch.Generator().manual_seed(0))
    grown = backend.requantize(layer, big)
    step = grown.scales.float().repeat_interleave(64, 0).T
    assert ((backend.dequantize(grown) - big).abs() <= 0.51 * step + 1e-6).float().mean() > 0.99
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(grown(x), x @ backend.dequantize(grown).T, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_requantize_on_cuda_packs_the_same_bits_as_on_cpu(backend, rtn):
    """On CUDA a merge fits the grid and packs on the GPU (gptqmodel's packer is device-agnostic torch): same bits."""
    layer = qadapt.load(rtn[0], "awq").model.layers[1].mlp.down_proj
    cpu_layer, cuda_layer = common.clone_layer(layer), common.clone_layer(layer).cuda()
    deq = backend.dequantize(cpu_layer)
    assert torch.equal(backend.dequantize(cuda_layer).cpu(), deq)
    big = deq + 0.5 * torch.randn(deq.shape, generator=torch.Generator().manual_seed(0))
    on_cpu = backend.requantize(cpu_layer, big)
    on_cuda = backend.requantize(cuda_layer, big.cuda())
    assert on_cuda.qweight.is_cuda and not on_cpu.qweight.is_cuda
    for key in ("qweight", "qzeros", "scales"):
        assert torch.equal(getattr(on_cuda, key).cpu(), getattr(on_cpu, key)), key


def test_save_round_trip(backend, rtn, tmp_path, batches):
    model = qadapt.load(rtn[0], "awq")
    backend.save(model, str(tmp_path), backend.validate_options({}))
    again = qadapt.load(str(tmp_path), "awq")
    with torch.no_grad():
        assert torch.equal(model(batches[0]).logits, again(batches[0]).logits)


# ---------------------------------------------------------------------------------------------- adapters
def test_capability_table_is_as_declared(backend):
    table = backend.capabilities(backend.validate_options({}))
    for op in ("train", "merge", "merge_dequantized", "unmerge", "save"):
        assert table[("lora", op)]
        for method in ("dora", "vera", "adalora", "ia3"):  # through qadapt's nn.Linear proxy
            assert table[(method, op)]


def test_conformance_every_declared_cell_on_an_awq_checkpoint(rtn):
    from qadapt.testing.conformance import check_backend

    path = AWQ_TINY if os.path.exists(os.path.join(AWQ_TINY, "model.safetensors")) else rtn[0]
    results = check_backend("awq", {}, model_factory=lambda: path)
    failed = [str(r) for r in results if not r.ok]
    assert not failed, failed
    passed = {(r.method, r.operation) for r in results if r.outcome == "passed"}
    assert {("lora", op) for op in ("train", "merge", "merge_dequantized", "unmerge", "save")} <= passed


def test_dora_peft_refuses_on_awq_attaches_through_the_proxy(rtn):
    import peft

    with pytest.raises(ValueError, match="DoRA"):
        peft.get_peft_model(qadapt.load(rtn[0], "awq"), peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert qadapt.attach(qadapt.load(rtn[0], "awq"), "dora").peft_config["default"].use_dora


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_train_on_the_torch_kernel_then_serve_on_marlin(backend, batches, tmp_path):
    from .marlin_serving import train_then_serve_on_marlin

    train_then_serve_on_marlin("awq", backend, batches, tmp_path, marlin_class_prefix="AwqMarlin")
