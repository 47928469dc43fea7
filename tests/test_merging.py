"""Merges: the report's numbers, the re-quantization policy against fresh quantization (PEFT's), exact unmerge."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import qadapt  # noqa: E402
from qadapt.testing import toy  # noqa: E402
from qadapt.plugins import get_backend  # noqa: E402

from .conftest import backend_ready  # noqa: E402

CASES = [
    pytest.param("bnb", {"bits": 4}, id="bnb-nf4"),
    pytest.param("bnb", {"bits": 4, "double_quant": False}, id="bnb-nf4-single"),
    pytest.param("bnb", {"bits": 8}, id="bnb-int8"),
    pytest.param("hqq", {"bits": 4, "group_size": 64}, id="hqq-4bit"),
    pytest.param("torchao", {}, id="torchao-int8"),
]
LIBRARY = {"bnb": "bitsandbytes", "hqq": "hqq.core.quantize", "torchao": "torchao"}


def _quantized(backend, options):
    pytest.importorskip(LIBRARY[backend])
    return qadapt.load(toy.build_model(seed=0), backend, **options)


def _layers(model, backend):
    quant = get_backend(backend)
    return [(name, module) for name, module in model.named_modules() if quant.is_quantized_layer(module)]


def _delta(weight, seed, size):
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(weight.shape[0], 4, generator=generator) @ torch.randn(4, weight.shape[1], generator=generator)
    return low * (size * weight.norm() / low.norm())


@pytest.mark.parametrize("backend,options", CASES)
def test_requantize_never_worse_than_fresh(backend, options):
    """Per layer and per size of change: the default policy's weight error is <= fresh quantization's (PEFT's), the
    original grid alone never loses more than the change itself, and the layer still computes with its weight."""
    model = _quantized(backend, options)
    quant = get_backend(backend)
    better = 0
    for index, (name, module) in enumerate(_layers(model, backend)):
        weight = quant.dequantize(module)
        for size in (0.005, 0.05):
            delta = _delta(weight, index, size)
            target = weight + delta
            errors = {
                policy: (quant.dequantize(quant.requantize(module, target, policy=policy)) - target).norm().item()
                for policy in ("fresh", "grid", "best")
            }
            assert errors["best"] <= errors["fresh"] * (1 + 1e-6), (name, size, errors)
            assert errors["best"] <= errors["grid"] * (1 + 1e-6), (name, size, errors)
            assert errors["grid"] <= delta.norm().item() * (1 + 1e-5), (name, size, errors)
            better += errors["best"] < errors["fresh"] * 0.99
        assert torch.equal(quant.dequantize(module), weight), "requantize changed the original layer"
    assert better > 0, "the policy never improved on fresh quantization"
    new = quant.requantize(module, target)
    x = torch.randn(3, target.shape[1])
    reference = x @ quant.dequantize(new).T + (new.bias if getattr(new, "bias", None) is not None else 0)
    assert torch.allclose(new(x).float(), reference, rtol=0, atol=0.05 * reference.abs().max().item())


@pytest.mark.parametrize("backend,options", [CASES[3], CASES[4]])
def test_requantize_with_inputs_lowers_output_error(backend, options):
    """Given a layer's input statistics, the chosen layer's output error is <= fresh quantization's on them."""
    from qadapt.merging.requant import output_error

    model = _quantized(backend, options)
    quant = get_backend(backend)
    name, module = _layers(model, backend)[0]
    weight = quant.dequantize(module)
    target = weight + _delta(weight, 1, 0.05)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(256, weight.shape[1], generator=generator) * torch.linspace(0.1, 3, weight.shape[1])
    hessian = x.T @ x / x.shape[0]
    errors = {
        label: output_error(quant.dequantize(quant.requantize(module, target, **kwargs)), target, hessian)
        for label, kwargs in {"fresh": {"policy": "fresh"}, "inputs": {"hessian": hessian}}.items()
    }
    assert errors["inputs"] <= errors["fresh"], errors


def _adapter_model(backend, options):
    model = qadapt.attach(_quantized(backend, options), "lora", r=4, init_lora_weights=False)
    return model


@pytest.mark.parametrize("backend,options", [CASES[3], CASES[4]])
def test_merge_report_numbers(backend, options):
    """The report's kept fraction and output error, recomputed independently for one layer and the whole model."""
    model = _adapter_model(backend, options)
    quant = get_backend(backend)
    inner = model.base_model.model
    name = "model.layers.0.self_attn.q_proj"
    layer = inner.get_submodule(name)
    base = layer.get_base_layer()
    weight = quant.dequantize(base)
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).float() * layer.scaling["default"]
    batch = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(input_ids=batch).logits
    report = qadapt.merge(model, calibration=batch)
    stored = quant.dequantize(inner.get_submodule(name))
    kept_error = ((stored - weight - delta).norm() / delta.norm()).item()
    (entry,) = [layer_merge for layer_merge in report.layers if layer_merge.name == name]
    assert entry.kept_error == pytest.approx(kept_error, rel=1e-5, abs=1e-7)
    assert entry.kept == pytest.approx(max(0.0, 1 - kept_error), abs=1e-6)
    assert entry.delta_norm == pytest.approx(delta.norm().item(), rel=1e-5)
    assert 0 <= report.mean_kept <= 1
    with torch.no_grad():
        merged = model(input_ids=batch).logits
    assert report.output_error == pytest.approx(((merged - reference).norm() / reference.norm()).item(), rel=1e-4)
    qadapt.unmerge(model)


@pytest.mark.parametrize("backend,options", CASES)
def test_merge_unmerge_bit_exact(backend, options):
    model = _adapter_model(backend, options)
    inner = model.base_model.model
    batch = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        before = model(input_ids=batch).logits
    qadapt.merge(model)
    with torch.no_grad():
        merged = model(input_ids=batch).logits
    assert not torch.equal(merged, before), "the merge changed nothing"
    qadapt.unmerge(model)
    with torch.no_grad():
        after = model(input_ids=batch).logits
    assert torch.equal(after, before)
    restored = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    assert restored.keys() == state.keys()
    assert all(_same(restored[k], state[k]) for k in state)
    del inner


def _same(a, b):
    """Bit-for-bit equality, through tensor subclasses (torchao) to their inner tensors."""
    # (a snapshot's detach().clone() of a Parameter is a plain Tensor: only tensor subclasses compare by parts)
    if hasattr(a, "__tensor_flatten__") or hasattr(b, "__tensor_flatten__"):
        if type(a) is not type(b):
            return False
        names, attributes = a.__tensor_flatten__()
        return attributes == b.__tensor_flatten__()[1] and all(_same(getattr(a, n), getattr(b, n)) for n in names)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    # bytes, not values: bitsandbytes' packed codes stored as floats hold NaN patterns, unequal to themselves
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


@pytest.mark.parametrize("backend,options", [("bnb", {"bits": 4}), ("hqq", {}), ("torchao", {})])
def test_default_merge_keeps_the_policy_with_the_lowest_output_error(backend, options, tiny_dir, batches):
    """qadapt tries PEFT's arithmetic ("fresh") and its own ("best"; with calibration text "best+inputs") and keeps
    the lowest output error on the calibration batch: never worse there than PEFT's merge."""
    backend_ready(backend)
    model = qadapt.attach(qadapt.load(tiny_dir, backend=backend, **options), "lora", init_lora_weights=False)
    model.eval()
    report = qadapt.merge(model, calibration=batches[0])
    assert set(report.candidates) == {"fresh", "best+inputs"}
    assert report.output_error == min(report.candidates.values()) <= report.candidates["fresh"]
    assert report.policy == min(report.candidates, key=report.candidates.get)
    assert set(report.seconds) == set(report.candidates) and all(s > 0 for s in report.seconds.values())
    qadapt.unmerge(model)
    forced = qadapt.merge(model, calibration=batches[0], policy="fresh")
    assert forced.policy == "fresh" and forced.candidates == {} and set(forced.seconds) == {"fresh"}
    assert forced.output_error == pytest.approx(report.candidates["fresh"])


def test_policy_is_refused_where_the_backend_has_no_choice(tiny_dir):
    from qadapt.testing import toy

    model = qadapt.attach(toy.build_model(), "lora")
    with pytest.raises(qadapt.InvalidOptionError, match="no re-quantization policy"):
        qadapt.merge(model, policy="best")
