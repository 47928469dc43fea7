"""EETQ backend. On this CPU machine EETQ itself cannot run (no cp311 wheel, no CUDA; SM90 GPUs are refused too), so
the CPU tests exercise the torch route over EETQ's int8 format, and check the layout code against a literal port of
EETQ's C++ loops. The test that compares with EETQ's own library is marked gpu and needs a machine where EETQ runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qadapt.testing import toy  # noqa: E402
from qadapt.errors import BackendUnavailableError  # noqa: E402
from qadapt_plugins import _eetq_layers as layers  # noqa: E402
from qadapt_plugins import eetq  # noqa: E402

from .conftest import ENGINE_CELLS, train_steps  # noqa: E402

BACKEND = eetq.EETQBackend()


# ------------------------------------------------------------------------------------------------ literal C++ port
def literal_preprocess(q: np.ndarray) -> np.ndarray:
    """EETQ's cutlass_preprocessors.cc for int8 on SM80, loop for loop (slow; small matrices only)."""
    rows, cols = q.shape
    src = q.astype(np.int8).copy()
    # permute_B_rows_for_mixed_gemm: uint32 words, B_ROWS_PER_MMA = 16, ELTS_PER_REG = 4
    words_in = src.view(np.uint32).reshape(-1)
    words_out = np.empty_like(words_in)
    num_vec_cols = cols // 4
    for base_row in range(0, rows, 16):
        for tile_row in range(16):
            tile_read_row = 8 * ((tile_row % 4) // 2) + tile_row % 2 + 2 * (tile_row // 4)
            for write_col in range(num_vec_cols):
                words_out[(base_row + tile_row) * num_vec_cols + write_col] = words_in[
                    (base_row + tile_read_row) * num_vec_cols + write_col
                ]
    src = words_out.view(np.int8).reshape(rows, cols)
    # subbyte_transpose (int8): element transpose
    src = np.ascontiguousarray(src.T)
    # interleave_column_major_tensor: rows_per_tile 64, columns_interleaved 2, uint32 words
    words_in = src.reshape(-1).view(np.uint32)
    words_out = np.empty_like(words_in)
    num_vec_rows, vec_rows_per_tile, interleave = rows // 4, 64 // 4, 2
    for read_col in range(cols):
        write_col = read_col // interleave
        for base_vec_row in range(0, num_vec_rows, vec_rows_per_tile):
            for vec_read_row in range(base_vec_row, min(num_vec_rows, base_vec_row + vec_rows_per_tile)):
                vec_write_row = (interleave * base_vec_row + vec_rows_per_tile * (read_col % interleave)
                                 + vec_read_row % vec_rows_per_tile)
                words_out[write_col * num_vec_rows * interleave + vec_write_row] = words_in[
                    read_col * num_vec_rows + vec_read_row]
    flat = words_out.view(np.int8).copy()
    # add_bias_and_interleave_int8s_inplace
    flat = ((flat.astype(np.int16) + 128).astype(np.uint8)).view(np.int8)
    for base in range(0, flat.size, 4):
        flat[base + 1], flat[base + 2] = flat[base + 2], flat[base + 1]
    return flat.reshape(rows, cols)


@pytest.mark.parametrize("shape", [(64, 64), (128, 192), (256, 128)])
def test_layout_matches_literal_port_of_eetq_cpp(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    stored = layers.preprocess_int8(q)
    assert np.array_equal(stored.numpy(), literal_preprocess(q.numpy()))
    assert torch.equal(layers.unpreprocess_int8(stored), q)
    assert not torch.equal(stored, q)


def test_shapes_that_are_not_multiples_of_64_are_refused():
    with pytest.raises(ValueError, match="multiples of 64"):
        layers.preprocess_int8(torch.zeros(96, 64, dtype=torch.int8))


def test_symmetric_quantize_rule():
    weight = torch.tensor([[1.0, -0.5, 0.25, 0.0] * 16, [0.0] * 64, [-2.0, 1.0, 0.0078125, 0.5] * 16])
    q, scale = layers.symmetric_quantize(weight)
    assert q.shape == (64, 3) and scale.dtype == torch.float16
    assert torch.equal(scale, torch.tensor([1 / 128, 0.0, 2 / 128], dtype=torch.float16))
    assert q[:4, 0].tolist() == [127, -64, 32, 0]  # 128 clamps to 127; round half away from zero
    assert q[:4, 2].tolist() == [-128, 64, 1, 32]  # 0.5 -> 1 (C round), not 0 (banker's)
    assert q[:, 1].abs().sum() == 0


# ------------------------------------------------------------------------------------------------ environment
def test_environment_says_why_eetq_itself_cannot_run_here():
    env = BACKEND.check_environment()
    problem = eetq.library_problem()
    if problem is None:
        pytest.skip("EETQ runs on this machine")
    assert env.ok and env.details["kernel"] == "torch"
    assert problem in env.reason
    assert "Hub" in env.details["transformers"]
    with pytest.raises(BackendUnavailableError, match="eetq"):
        BACKEND.validate_options({"kernel": "eetq"})


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"cuda": False}, "CUDA GPU"),
        ({"cuda": True, "capability": (9, 0)}, "Unsupported Arch"),
        ({"cuda": True, "capability": (7, 0)}, "7.5-8.9"),
        ({"cuda": True, "capability": (8, 6)}, None),
    ],
)
def test_library_problem_reasons(monkeypatch, patch, words):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "eetq", types.ModuleType("eetq"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: patch["cuda"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: patch.get("capability", (0, 0)))
    problem = eetq.library_problem()
    assert problem is None if words is None else words in problem


# ------------------------------------------------------------------------------------------------ torch route
def test_quantize_dequantize_requantize_save_load(tmp_path):
    options = BACKEND.validate_options({"kernel": "torch"})
    full = toy.build_model()
    model = BACKEND.quantize(toy.build_model(), options)
    layer = model.model.layers[0].mlp.down_proj
    original = full.model.layers[0].mlp.down_proj.weight.detach()
    assert isinstance(layer, BACKEND.quantized_layer_types()) and layer.weight.dtype == torch.int8
    assert layer.weight.shape == (original.shape[1], original.shape[0])  # EETQ stores (in, out)

    weight = BACKEND.dequantize(layer)
    q, scale = layers.symmetric_quantize(original)
    assert torch.equal(weight, (q.t().to(torch.float16) * scale.view(-1, 1)).float())
    assert ((weight - original).abs() <= original.abs().amax(1, keepdim=True) / 128 * 0.51 + 1e-3).all()
    x = torch.randn(3, layer.in_features)
    assert torch.allclose(layer(x), x @ weight.t(), atol=1e-5)

    new = BACKEND.requantize(layer, original)
    assert new is not layer and torch.equal(new.weight, layer.weight) and torch.equal(new.weight_scales, layer.weight_scales)

    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        assert ((reference - full(ids).logits).norm() / full(ids).logits.norm()) < 0.03
    BACKEND.save(model, str(tmp_path), options)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "eetq"
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = BACKEND.load(str(tmp_path), options)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference)


def test_lora_trains_and_merges(tmp_path):
    api = pytest.importorskip("qadapt.api")
    batch = toy.token_batches(toy.build_tokenizer(), count=1, batch_size=2, seq_len=32)[0]
    model = api.load(toy.build_model(), "eetq", kernel="torch")
    peft_model = api.attach(model, "lora")
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "EetqLoraLinear"
    losses = train_steps(peft_model, [batch] * 8)
    assert losses[-1] < losses[0] - 0.3
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(batch).logits
    assert api.merge(peft_model, "dequantize").output_error < 1e-4
    api.unmerge(peft_model)
    report = api.merge(peft_model, "requantize")
    assert report.output_error < 0.05 and report.mean_kept > 0.9  # int8 keeps most of the change
    api.unmerge(peft_model)
    with torch.no_grad():
        assert torch.equal(peft_model(batch).logits, adapted)


def test_torch_route_recomputes_the_weight_in_the_backward_instead_of_keeping_it():
    """Autograd would keep each layer's de-quantized weight until the backward (more memory than an unquantized
    model, as the H100 benchmark measured); the torch route de-quantizes it again there, with the same gradient."""
    weight = torch.randn(128, 192)
    layer = layers.EetqTorchLinear.from_weight(weight)
    x = torch.randn(3, 192, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    assert (128, 192) not in saved and (192, 128) not in saved
    grad = torch.randn_like(out)
    out.backward(grad)
    dequantized = layer.dequantize().float()
    assert torch.allclose(out, x.detach() @ dequantized.t(), atol=1e-5)
    assert torch.allclose(x.grad, grad @ dequantized, atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "vera", "ia3", "adalora"])
def test_other_methods_train_through_the_linear_proxy(method):
    """PEFT's DoRA would read EETQ's preprocessed bytes as the weight, and VeRA/IA3/AdaLoRA have no custom-layer
    hook: these go through qadapt's nn.Linear proxy (tests/test_capabilities.py drives every cell)."""
    assert method in BACKEND.proxy_methods
    assert BACKEND.capabilities(BACKEND.validate_options({}))[(method, "train")]


# ------------------------------------------------------------------------------------------------ EETQ itself (GPU)
@pytest.mark.gpu
def test_layout_matches_eetq_library():
    """The only check of this plugin's layout against EETQ's own code: needs eetq built for this Python and a CUDA
    GPU of compute capability 7.5-8.9 (EETQ refuses SM90+)."""
    if eetq.library_problem() is not None:
        pytest.skip(eetq.library_problem())
    weight = torch.randn(256, 128, dtype=torch.float16)
    stored, scales = layers._eetq_quant_weights(weight)
    q, my_scales = layers.symmetric_quantize(weight)
    assert torch.equal(scales, my_scales)
    assert torch.equal(layers.unpreprocess_int8(stored), q)
    assert torch.equal(layers.preprocess_int8(q), stored)
    layer = layers.EetqTorchLinear.from_weight(weight.float().cuda(), kernel="eetq")
    x = torch.randn(4, 128, dtype=torch.float16, device="cuda")
    expected = x.float() @ layer.dequantize().float().t()
    assert torch.allclose(layer(x).float(), expected, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------ architectures
def test_every_layer_is_checked_before_any_is_converted():
    """EETQ's layout needs multiples of 64: the first bad layer's constructor raised a bare ValueError after the
    earlier layers of the caller's model were converted in place. Now the load is refused first, naming them all."""
    import qadapt

    model = toy.build_model(intermediate_size=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(qadapt.ArchitectureError, match="gate_proj") as refused:
        qadapt.load(model, backend="eetq")
    assert "6 of 15 matmul weights" in str(refused.value) and "multiples of 64" in str(refused.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model = qadapt.load(model, backend="eetq", allow_unquantized=["*.mlp.*"])
    report = qadapt.load_report(model)
    assert len(report.quantized) == 8 and sum(w.status.startswith("kept, allowed") for w in report.weights) == 6


def test_layers_allowed_in_full_precision_merge_and_reload(tmp_path):
    import qadapt

    model = qadapt.load(toy.build_model(intermediate_size=96), backend="eetq", allow_unquantized=["*.mlp.*"])
    model = qadapt.attach(model, "lora", init_lora_weights=False)
    model.eval()
    batch = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        before = model(input_ids=batch).logits
    report = qadapt.merge(model)
    assert all(layer.kept_error < 1e-6 for layer in report.layers if ".mlp." in layer.name)  # exact where unquantized
    qadapt.unmerge(model)
    qadapt.save(model, tmp_path / "kept")
    restored = qadapt.load(tmp_path / "kept")
    assert len(qadapt.load_report(restored).quantized) == 8
    with torch.no_grad():
        assert torch.allclose(restored(input_ids=batch).logits, before, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "mixtral"])
def test_conv1d_and_moe_experts(arch):
    """GPT-2's Conv1D (0 of 8 layers quantized before) and Mixtral's fused experts, split with defuser."""
    from qadapt.testing import check_backend

    results = check_backend("eetq", {}, methods=["lora"], architecture=arch)
    assert [r.outcome for r in results if r.operation not in ENGINE_CELLS] == ["passed"] * 5, [str(r) for r in results]
