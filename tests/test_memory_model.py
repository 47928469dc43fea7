"""The memory model (qadapt plan) against every measured run recorded in docs/bench-results: within 15 %."""

from __future__ import annotations

import json

import pytest

from qadapt.memory_model import GiB, Shape, predict

from .conftest import backend_ready

TINYLLAMA = Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, head_dim=64)
LLAMA3_8B = Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, head_dim=128)
NF4 = {"bits": 4}
INT8 = {"scheme": "int8_weight_only"}
G64 = {"bits": 4, "group_size": 64}
#: measured peaks (``torch.cuda.max_memory_allocated``; H100, one process, LoRA r=16 on every linear layer, AdamW,
#: batch 4 x 512, bfloat16, ``use_cache=False``) with what the process held when training started
#: (``allocated_before_train_gib``): (label, shape, backend, options, checkpointing, peak GiB, before GiB, source).
#: The benchmark's sequential runs hold more than the model before training (8B: nf4 weights 5.31 GiB, allocated
#: 20.65: the full-precision model it was quantized from stays resident), its tuning runs do not; the prediction is
#: what training adds to what the process held.
MEASURED = [
    ("1.1B bf16", TINYLLAMA, None, {}, False, 8.51, 2.16, "tune-h100-compile.json full"),
    ("1.1B bnb nf4+dq", TINYLLAMA, "bnb", NF4, False, 7.19, 0.84, "tune-h100-compile.json bnb-nf4-dq"),
    ("1.1B torchao int8", TINYLLAMA, "torchao", INT8, False, 9.41, 1.26, "tune-h100-compile-rest.json torchao-int8wo"),
    ("1.1B bnb nf4+dq (sequential)", TINYLLAMA, "bnb", NF4, False, 9.28, 2.93, "throughput-h100-full.json bnb-nf4-dq"),
    ("1.1B torchao int8 (sequential)", TINYLLAMA, "torchao", INT8, False, 11.50, 3.36,
     "throughput-h100-full.json torchao-int8wo"),
    ("1.1B hqq 4-bit g64 (sequential)", TINYLLAMA, "hqq", G64, False, 10.13, 2.97,
     "throughput-h100-full.json hqq-4bit-g64"),
    ("1.1B bf16 + checkpointing", TINYLLAMA, None, {}, True, 5.36, 4.35, "throughput-h100-interleaved.json full:ckpt"),
    ("1.1B bnb nf4+dq + checkpointing", TINYLLAMA, "bnb", NF4, True, 4.04, 3.03,
     "throughput-h100-interleaved.json bnb-nf4-dq:ckpt"),
    ("1.1B bf16, batch 16", TINYLLAMA, None, {}, False, 29.47, 4.35, "throughput-h100-interleaved.json full:batch=16"),
    ("1.1B bnb nf4+dq, batch 16", TINYLLAMA, "bnb", NF4, False, 28.15, 3.03,
     "throughput-h100-interleaved.json bnb-nf4-dq:batch=16"),
    ("8B bf16", LLAMA3_8B, None, {}, False, 36.46, 15.18, "throughput-h100-8b.json full"),
    ("8B bnb nf4+dq", LLAMA3_8B, "bnb", NF4, False, 41.93, 20.65, "throughput-h100-8b.json bnb-nf4-dq"),
    ("8B torchao int8", LLAMA3_8B, "torchao", INT8, False, 58.04, 23.80, "throughput-h100-8b.json torchao-int8wo"),
    ("8B hqq 4-bit g64", LLAMA3_8B, "hqq", G64, False, 44.99, 20.97, "throughput-h100-8b.json hqq-4bit-g64"),
]


def _on_top_of(before, plan) -> float:
    """GiB: what the process held before training plus what ``plan`` says training adds to the model's weights and
    adapter parameters (resident before the first step)."""
    held = plan.weights_sharded + plan.weights_replicated + 4 * plan.lora_parameters
    return before + (plan.peak - held) / GiB


def calibration() -> list[dict]:
    """Every run of :data:`MEASURED` (``docs/bench-results/``) against the prediction: what the process held before
    training plus what :func:`predict` says training adds to the model's weights and adapter parameters."""
    rows = []
    for label, shape, backend, options, checkpointing, measured, before, source in MEASURED:
        batch = 16 if "batch 16" in label else 4
        plan = predict(shape, backend, options, batch=batch, seq=512, checkpointing=checkpointing, dtype_bytes=2)
        predicted = _on_top_of(before, plan)
        rows.append({"label": label, "measured_gib": measured, "predicted_gib": round(predicted, 2),
                     "model_alone_gib": round(plan.peak / GiB, 2), "error": round((predicted - measured) / measured, 4),
                     "source": "docs/bench-results/" + source})
    return rows


@pytest.mark.parametrize("row", MEASURED, ids=[row[0] for row in MEASURED])
def test_prediction_within_15_percent_of_the_measured_run(row):
    for backend in {row[2]} - {None}:
        backend_ready(backend)
    label, shape, backend, options, checkpointing, measured, before, _ = row
    found = next(r for r in calibration() if r["label"] == label)
    assert abs(found["error"]) < 0.15, found

#: qadapt.prepare's modes (H200, bench/peers.py, 2026-12-01/02; bnb nf4 + double quant, LoRA r=16 on every linear
#: layer, AdamW, 4 x 512, bfloat16): (label, shape, prepare, MLPs recomputing, peak GiB, GiB allocated once loaded,
#: attached and prepared, source)
MEASURED_PREPARED = [
    ("8B fast", LLAMA3_8B, "fast", 0, 12.82, 5.50, "peers-h200-8b.json qadapt-nf4-fast"),
    ("8B fast, eager", LLAMA3_8B, "fast", 0, 12.90, 5.50, "peers-h200-8b.json qadapt-nf4-fast-eager"),
    ("8B fast, mlp='recompute' everywhere", LLAMA3_8B, "fast", 32, 9.65, 5.50,
     "peers-h200-8b-mlp.json qadapt-nf4-fast-mlprecompute"),
    ("8B fast, mlp_layers=10", LLAMA3_8B, "fast", 10, 11.73, 5.50, "peers-h200-8b-target.json qadapt-nf4-fast-mlp10"),
    ("8B lean, replayed graphs", LLAMA3_8B, "lean", 0, 6.29, 5.47, "peers-h200-8b-lean-graphs.json qadapt-nf4-lean"),
    ("8B lean, regional compile", LLAMA3_8B, "lean", 0, 6.48, 5.50, "peers-h200-8b.json qadapt-nf4-lean-compile"),
    ("1.1B fast", TINYLLAMA, "fast", 0, 3.03, 0.81, "peers-h200-1.1b.json qadapt-nf4-fast"),
]


@pytest.mark.parametrize("row", MEASURED_PREPARED, ids=[row[0] for row in MEASURED_PREPARED])
def test_prepared_prediction_within_15_percent_of_the_measured_run(row):
    """``qadapt plan --prepare fast|lean``: what training adds to the loaded, prepared model (docs/bench-results)."""
    backend_ready("bnb")
    label, shape, prepare, recomputing, measured, before, _ = row
    plan = predict(shape, "bnb", NF4, batch=4, seq=512, dtype_bytes=2, prepare=prepare,
                   mlp_recompute_layers=recomputing)
    predicted = _on_top_of(before, plan)
    assert abs(predicted - measured) / measured < 0.15, (label, predicted, measured)


def test_the_fast_path_keeps_what_the_memory_model_counts():
    """The per-token formula of ``prepare="fast"`` against autograd's saved tensors of a prepared toy (bfloat16 and
    float32, two widths): the bytes a second decoder layer adds are the formula's, exactly."""
    import torch

    import qadapt
    from qadapt.memory_model import _fused_activations
    from qadapt.testing import toy

    from .test_training import saved_bytes

    for dtype, width in ((torch.bfloat16, 256), (torch.float32, 384)):
        kept = []
        for layers in (1, 2):
            model = toy.build_model(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, dtype=dtype)
            peft_model = qadapt.attach(model, "lora", r=8, lora_dropout=0.0)
            qadapt.prepare(peft_model, "fast", compile="off", loss="torch")
            kept.append(saved_bytes(peft_model, torch.randint(0, 512, (1, 64))))
        shape = Shape(hidden=width, intermediate=2 * width, layers=1, heads=4, kv_heads=2, vocab=512,
                      head_dim=width // 4)
        assert kept[1] - kept[0] == _fused_activations(shape, 64, 8, torch.finfo(dtype).bits // 8), dtype


def test_plan_refuses_a_prepare_mode_it_does_not_count():
    import qadapt

    with pytest.raises(qadapt.InvalidOptionError, match="counts prepare's 'fast' and 'lean'"):
        predict(LLAMA3_8B, prepare="default")
    with pytest.raises(qadapt.InvalidOptionError, match="Leave checkpointing out"):
        predict(LLAMA3_8B, prepare="lean", checkpointing=True)
    with pytest.raises(qadapt.InvalidOptionError, match="Pass prepare='fast'"):
        predict(LLAMA3_8B, mlp_recompute_layers=4)


#: FSDP2 runs through qadapt.distributed at world size 1 (H200, tests/gpu_sharded.sh, 2026-12-01): the process held
#: the quantized model only, so the prediction of the whole peak is compared as it is: (label, checkpointing, peak GiB)
MEASURED_SHARDED = [
    ("8B bnb nf4+dq, FSDP2, loaded whole or streamed into shards", False, 28.77),
    ("8B bnb nf4+dq, FSDP2, gradient checkpointing", True, 11.27),
]


@pytest.mark.parametrize("row", MEASURED_SHARDED, ids=[row[0] for row in MEASURED_SHARDED])
def test_sharded_prediction_within_15_percent_of_the_measured_run(row):
    """docs/bench-results/sharded-8b-h200.json"""
    label, checkpointing, measured = row
    plan = predict(LLAMA3_8B, "bnb", NF4, batch=4, seq=512, world_size=1, engine="fsdp2",
                   checkpointing=checkpointing, dtype_bytes=2)
    assert plan.unsharded_units > 0  # the gathered units are part of this prediction
    assert abs(plan.peak / GiB - measured) / measured < 0.15, (label, plan.peak / GiB)


def test_sharding_divides_what_is_sharded_and_keeps_the_state_whole():
    backend_ready("bnb")
    one = predict(LLAMA3_8B, "bnb", NF4, batch=1, seq=2048, engine="fsdp2", checkpointing=True)
    eight = predict(LLAMA3_8B, "bnb", NF4, batch=1, seq=2048, world_size=8, engine="fsdp2", checkpointing=True)
    assert eight.weights_sharded == pytest.approx(one.weights_sharded / 8)
    assert eight.adapter_and_optimizer == pytest.approx(one.adapter_and_optimizer / 8)
    assert eight.weights_replicated == one.weights_replicated > 0  # bitsandbytes' quant_state on every rank
    offloaded = predict(LLAMA3_8B, "bnb", NF4, batch=1, seq=2048, world_size=8, engine="fsdp2", checkpointing=True,
                        offload=True)
    assert offloaded.peak < eight.peak and offloaded.host == pytest.approx(eight.weights_sharded
                                                                          + eight.adapter_and_optimizer)


def test_plan_refuses_what_it_does_not_model():
    import qadapt

    with pytest.raises(qadapt.IncompatibleError, match="counted for LoRA"):
        predict(LLAMA3_8B, method="dora")
    with pytest.raises(qadapt.InvalidOptionError, match="need a sharding engine"):
        predict(LLAMA3_8B, world_size=2)
    with pytest.raises(qadapt.InvalidOptionError, match="Llama-like"):
        predict({"hidden_size": 8})


def test_qadapt_plan_prints_json(tiny_dir, capsys):
    from qadapt.cli import main

    backend_ready("bnb")
    assert main(["plan", str(tiny_dir), "--backend", "bnb", "--gpus", "2", "--batch", "4", "--seq", "2048", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["engine"] == "fsdp2" and plan["settings"]["world_size"] == 2
    assert plan["peak"] > plan["logits"] > 0 and plan["gib"]["peak"] == round(plan["peak"] / GiB, 3)
    assert main(["plan", str(tiny_dir), "--backend", "eetq-not-there"]) == 2
    assert main(["plan", str(tiny_dir), "--backend", "bnb", "--prepare", "lean", "--json"]) == 0
    lean = json.loads(capsys.readouterr().out)
    assert lean["settings"]["prepare"] == "lean" and lean["activations"] == 0 < lean["host"] and lean["recompute"] > 0


def test_qadapt_plan_says_when_the_engine_would_refuse_what_it_predicts(tiny_dir, capsys):
    from qadapt.cli import main

    backend_ready("torchao")
    assert main(["plan", str(tiny_dir), "--backend", "torchao", "--gpus", "2"]) == 0
    assert "note: a prediction only; qadapt.distributed.shard refuses this (torchao 0.18's Int8Tensor" in capsys.readouterr().out
    assert main(["plan", str(tiny_dir), "--backend", "torchao", "-o", "scheme=nf4", "--gpus", "2"]) == 0
    assert "note:" not in capsys.readouterr().out
