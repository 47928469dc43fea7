"""GPTQ backend (gptqmodel): quantize with calibration on CPU, de-/re-quantize layers, save/load checkpoints (ours and
gptqmodel's own), adapters through the conformance kit. Numbers are checked against the float model, an independent
unpacking of the GPTQ format written here, and the layer's own forward."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gptqmodel", reason="GPTQ backend needs the `gptq` extra (gptqmodel)")

import qadapt  # noqa: E402
from qadapt.testing import toy  # noqa: E402
from qadapt.errors import InvalidOptionError  # noqa: E402
from qadapt_plugins import _gptqmodel_common as common  # noqa: E402
from qadapt_plugins.gptq import GPTQBackend  # noqa: E402

from .conftest import ENGINE_CELLS  # noqa: E402

LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def backend():
    return GPTQBackend()


@pytest.fixture(scope="module")
def quantized(backend, batches):
    options = backend.validate_options({"bits": 4, "group_size": 64})
    return backend.quantize(toy.build_model(), options, batches), toy.build_model(), options


def linear_pairs(model, reference):
    for index, layer in enumerate(model.model.layers):
        for name in LAYERS:
            holder = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
            ref_holder = reference.model.layers[index].self_attn if holder is layer.self_attn else reference.model.layers[index].mlp
            yield f"{index}.{name}", getattr(holder, name), getattr(ref_holder, name).weight.detach().float()


def reference_unpack(module):
    """GPTQ format, written from the spec: qweight (in*bits/32, out) packs input rows low bits first; qzeros
    (groups, out*bits/32) packs output columns; gptqmodel holds zeros in memory without the v1 "-1"."""
    bits, rows = module.bits, module.in_features
    per = 32 // bits
    q = module.qweight.to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(q >> (bits * j)) & (2**bits - 1) for j in range(per)], dim=1).reshape(-1, q.shape[1])[:rows]
    z = module.qzeros.to(torch.int64) & 0xFFFFFFFF
    zeros = torch.stack([(z >> (bits * j)) & (2**bits - 1) for j in range(per)], dim=2).reshape(z.shape[0], -1)
    zeros = zeros[:, : module.out_features]
    g = module.g_idx.long()
    return (module.scales.float()[g] * (codes - zeros[g]).float()).T


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------- quantize + layers
def test_quantize_gives_gptqmodel_layers_close_to_the_float_weights(backend, quantized):
    model, reference, _ = quantized
    assert model.dtype == torch.float32
    for name, layer, weight in linear_pairs(model, reference):
        assert backend.is_quantized_layer(layer), name
        deq = backend.dequantize(layer)
        assert deq.dtype == torch.float32 and deq.shape == weight.shape
        step = layer.scales.float()[layer.g_idx.long()].T  # the quantization step of every weight
        # GPTQ moves weights by about one step to compensate errors; never by much more
        assert ((deq - weight).abs() <= 1.5 * step + 1e-6).float().mean() > 0.99, name
        assert rel(deq, weight) < 0.2, name
        assert torch.equal(deq, reference_unpack(layer)), name


def test_dequantize_is_what_the_layer_computes(backend, quantized):
    model, _, _ = quantized
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(layer(x), x @ backend.dequantize(layer).T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(common.probe_weight(layer), backend.dequantize(layer), rtol=1e-5, atol=1e-5)


def test_quantized_logits_track_the_float_model(quantized, batches):
    model, reference, _ = quantized
    with torch.no_grad():
        assert rel(model(batches[0]).logits, reference(batches[0]).logits) < 0.15


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_other_bit_widths_order_their_errors(backend, batches, bits):
    model = backend.quantize(toy.build_model(), backend.validate_options({"bits": bits, "group_size": 64}), batches)
    layer = model.model.layers[0].self_attn.q_proj
    weight = toy.build_model().model.layers[0].self_attn.q_proj.weight.detach()
    error = rel(backend.dequantize(layer), weight)
    assert layer.bits == bits
    assert {2: 0.5 < error < 0.8, 3: 0.2 < error < 0.35, 8: error < 0.02}[bits], error
    if bits != 3:
        assert torch.equal(backend.dequantize(layer), reference_unpack(layer))


def test_requantize_keeps_the_grid_and_rounds_to_nearest(backend, quantized):
    model, _, _ = quantized
    layer = model.model.layers[0].self_attn.v_proj
    deq = backend.dequantize(layer)
    same = backend.requantize(layer, deq)
    assert same is not layer
    for key in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(same, key), getattr(layer, key)), key
    # a small change stays on the layer's grid: every weight lands on the nearest level
    step = layer.scales.float()[layer.g_idx.long()].T
    target = deq + 0.3 * step * torch.randn(deq.shape, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    moved = backend.requantize(layer, target)
    assert torch.equal(moved.scales, layer.scales)
    inside = (target >= deq.min(dim=1, keepdim=True).values) & (target <= deq.max(dim=1, keepdim=True).values)
    assert ((backend.dequantize(moved) - target).abs()[inside] <= step[inside] / 2 + 1e-6).all()
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(moved(x), x @ backend.dequantize(moved).T, rtol=1e-5, atol=1e-5)
    # a large change overflows the grid: those groups get new scales, and the error stays about half a new step
    big = deq + torch.randn(deq.shape, generator=torch.Generator().manual_seed(2))
    grown = backend.requantize(big_layer := layer, big)
    assert not torch.equal(grown.scales, big_layer.scales)
    new_step = grown.scales.float()[grown.g_idx.long()].T
    assert ((backend.dequantize(grown) - big).abs() <= new_step * 0.51 + 1e-6).float().mean() > 0.99
    assert torch.equal(backend.dequantize(layer), deq)  # the original is untouched


# ---------------------------------------------------------------------------------------------- checkpoints
def test_save_and_load_round_trip_bit_for_bit(backend, quantized, batches, tmp_path):
    model, _, options = quantized
    backend.save(model, str(tmp_path), options)
    assert {"config.json", "model.safetensors", "quantize_config.json"} <= set(os.listdir(tmp_path))
    assert backend.folder_options(str(tmp_path)) == {"bits": 4, "group_size": 64, "desc_act": False, "sym": True}
    reloaded = qadapt.load(str(tmp_path), "gptq")  # qadapt sees a GPTQ checkpoint and loads it
    layers = [(name, module) for name, module in model.named_modules() if backend.is_quantized_layer(module)]
    again = dict((name, module) for name, module in reloaded.named_modules() if backend.is_quantized_layer(module))
    assert len(layers) == 2 * len(LAYERS) and again.keys() == dict(layers).keys()
    for name, a in layers:
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(a, key), getattr(again[name], key)), (name, key)
    with torch.no_grad():
        assert torch.equal(model(batches[0]).logits, reloaded(batches[0]).logits)


@pytest.fixture(scope="module")
def gptqmodel_folder(tiny_dir, batches, tmp_path_factory):
    """A 4-bit, group 32, act-order folder quantized and saved by gptqmodel itself."""
    path = tmp_path_factory.mktemp("gptqmodel-act-order")
    gptqmodel = common.import_gptqmodel()
    with common.quiet():
        made = gptqmodel.GPTQModel.load(str(tiny_dir), gptqmodel.GPTQConfig(bits=4, group_size=32, desc_act=True,
                                        pack_impl="original"), device="cpu", dtype=torch.float16)
        with common.logs_elsewhere():
            made.quantize(common.calibration_dicts(batches))
        made.save(str(path))
    return str(path)


def test_loads_act_order_checkpoint_written_by_gptqmodel_itself(backend, gptqmodel_folder, batches):
    gptqmodel = common.import_gptqmodel()
    with common.quiet():
        theirs = gptqmodel.GPTQModel.load(gptqmodel_folder, device="cpu", backend=gptqmodel.BACKEND.TORCH,
                                          dtype=torch.float16).model
    ours = qadapt.load(gptqmodel_folder, "gptq", dtype="float16")
    layer = ours.model.layers[0].self_attn.q_proj
    assert not torch.equal(layer.g_idx.long(), torch.arange(layer.in_features) // 32)  # act-order permutes groups
    with torch.no_grad():
        assert torch.equal(ours(batches[1]).logits, theirs(batches[1]).logits)
    weight = toy.build_model().model.layers[0].self_attn.q_proj.weight.detach()
    assert rel(backend.dequantize(layer), weight) < 0.2


# ---------------------------------------------------------------------------------------------- adapters
def test_capability_table_is_as_declared(backend):
    table = backend.capabilities(backend.validate_options({}))
    labels = {key: cell.label for key, cell in table.items()}
    for op in ("train", "merge", "merge_dequantized", "unmerge", "save"):
        assert labels[("lora", op)] == "yes"
        for method in ("dora", "vera", "adalora", "ia3"):  # through qadapt's nn.Linear proxy
            assert labels[(method, op)] == "yes"
    assert set(backend.proxy_methods) == {"dora", "vera", "adalora", "ia3"}
    marlin = backend.capabilities({**backend.validate_options({}), "kernel": "marlin", "dtype": "float16"})
    for method in ("lora", "dora", "vera", "adalora", "ia3"):  # gptqmodel's Marlin layers refuse training mode
        assert not marlin[(method, "train")] and "kernel='torch'" in marlin[(method, "train")].hint
    assert "load_adapter" in marlin[("lora", "train")].hint


def test_conformance_every_declared_cell(batches):
    from qadapt.testing.conformance import check_backend

    results = check_backend("gptq", {"bits": 4, "group_size": 64}, calibration=batches)
    failed = [str(r) for r in results if not r.ok]
    assert not failed, failed
    passed = {(r.method, r.operation) for r in results if r.outcome == "passed"}
    assert {("lora", op) for op in ("train", "merge", "merge_dequantized", "unmerge", "save")} <= passed


def test_refusals_name_the_way_out(backend, batches):
    with pytest.raises(InvalidOptionError, match="Marlin"):
        backend.validate_options({"kernel": "marlin", "bits": 3})  # CUDA-only, and 4/8-bit symmetric only
    with pytest.raises(InvalidOptionError):
        backend.validate_options({"bits": 5})
    model = qadapt.load(toy.build_model(), "gptq", calibration=batches[:2], group_size=64)
    import peft

    # PEFT alone refuses DoRA on GPTQ layers; qadapt attaches it through the nn.Linear proxy
    with pytest.raises(ValueError, match="DoRA"):
        peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    model = qadapt.load(toy.build_model(), "gptq", calibration=batches[:2], group_size=64)
    assert qadapt.attach(model, "dora").peft_config["default"].use_dora


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_gpu_train_on_the_torch_kernel_then_serve_on_marlin(backend, batches, tmp_path):
    from .marlin_serving import train_then_serve_on_marlin

    train_then_serve_on_marlin("gptq", backend, batches, tmp_path, marlin_class_prefix="Marlin")


@pytest.mark.gpu
def test_gpu_requantize_packs_on_cuda_the_same_bits_as_on_cpu(backend, quantized):
    """On CUDA a merge de-quantizes, fits the grid and packs (gptqmodel's ``pack_gpu``) on the GPU: the same bits."""
    from qadapt_plugins import _gptqmodel_common as common

    model, _, _ = quantized
    for name in ("self_attn.v_proj", "mlp.down_proj"):
        layer = model.model.layers[0].get_submodule(name)
        cpu_layer, cuda_layer = common.clone_layer(layer), common.clone_layer(layer).cuda()
        deq = backend.dequantize(cpu_layer)
        assert torch.equal(backend.dequantize(cuda_layer).cpu(), deq)
        big = deq + torch.randn(deq.shape, generator=torch.Generator().manual_seed(2))
        on_cpu = backend.requantize(cpu_layer, big)
        on_cuda = backend.requantize(cuda_layer, big.cuda())
        assert on_cuda.qweight.is_cuda and not on_cpu.qweight.is_cuda
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(getattr(on_cuda, key).cpu(), getattr(on_cpu, key)), (name, key)


def test_quantizing_writes_nothing_into_the_working_directory_and_frees_the_quantizer(batches, tmp_path, monkeypatch):
    """gptqmodel writes ./logs/*.log per quantization; qadapt sends them to a temporary folder. And its working model
    (a second copy of the weights) outlived the quantization (gptqmodel 7.6): qadapt lets go of it."""
    import gc

    from gptqmodel.models.base import BaseQModel

    monkeypatch.chdir(tmp_path)
    model = qadapt.load(toy.build_model(), "gptq", calibration=batches[:2], group_size=64)
    assert list(tmp_path.iterdir()) == []
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, BaseQModel)]
    assert model is not None


# ---------------------------------------------------------------------------------------------- round trips
def test_a_gptqmodel_folder_loads_without_backend_with_the_options_it_holds(gptqmodel_folder):
    from qadapt.record import get_record

    record = get_record(qadapt.load(gptqmodel_folder, kernel="torch"))  # a runtime option may be chosen
    assert record.backend == "gptq"
    assert {k: record.options[k] for k in ("bits", "group_size", "desc_act", "sym")} == {
        "bits": 4, "group_size": 32, "desc_act": True, "sym": True}
    with pytest.raises(qadapt.InvalidOptionError, match="group_size=128 asked, 32 in the folder"):
        qadapt.load(gptqmodel_folder, backend="gptq", group_size=128)
    with pytest.raises(qadapt.InvalidOptionError, match="holds gptq weights"):
        qadapt.load(gptqmodel_folder, backend="awq")


def test_an_adapter_goes_only_onto_a_gptq_base_quantized_like_its_own(gptqmodel_folder, quantized, tmp_path):
    from qadapt.record import ATTRIBUTE, Record, set_record

    qadapt.save(qadapt.attach(qadapt.load(gptqmodel_folder), "lora", r=4), tmp_path / "g32")
    model, _, options = quantized  # bits=4, group_size=64, no act-order
    set_record(model, Record(backend="gptq", options=options, library_version=GPTQBackend().library_version()))
    try:
        with pytest.raises(qadapt.IncompatibleError, match="desc_act=True \\(adapter\\) vs False \\(base\\); "
                                                           "group_size=32 \\(adapter\\) vs 64 \\(base\\)"):
            qadapt.load_adapter(model, tmp_path / "g32" / "adapter")
    finally:
        del model.__dict__[ATTRIBUTE]


def test_a_saved_gptq_base_carries_its_tokenizer_and_loads_in_gptqmodel(gptqmodel_folder, batches, tmp_path):
    ours = qadapt.load(gptqmodel_folder, dtype="float16")
    qadapt.save(ours, tmp_path / "out")  # the tokenizer gptqmodel wrote is found and copied
    assert (tmp_path / "out" / "base" / "tokenizer.json").exists()
    gptqmodel = common.import_gptqmodel()
    with common.quiet():
        theirs = gptqmodel.GPTQModel.load(str(tmp_path / "out" / "base"), device="cpu",
                                          backend=gptqmodel.BACKEND.TORCH, dtype=torch.float16).model
    with torch.no_grad():
        assert torch.equal(theirs(batches[1]).logits, ours(batches[1]).logits)


def test_moe_experts_split_by_gptqmodel_all_get_an_adapter(batches):
    """gptqmodel splits fused experts into per-expert layers (with defuser); PEFT's MoE conversion then moved those
    targets to target_parameters the model no longer has: 24 of 32 quantized layers of a Qwen3-MoE got no adapter
    (PEFT 0.21.2, a warning only). The kit checks every quantized layer has one; gptqmodel's process-wide defuser patch
    is undone after its load (a Qwen3-MoE built afterwards has fused experts again)."""
    from qadapt.testing import check_backend, panel

    results = check_backend("gptq", {"bits": 4, "group_size": 64}, methods=["lora"], architecture="qwen3-moe",
                            calibration=batches[:2])
    assert [r.outcome for r in results if r.operation not in ENGINE_CELLS] == ["passed"] * 5, [str(r) for r in results]
    assert panel.build("qwen3-moe").model.layers[0].mlp.experts.gate_up_proj.dim() == 3
