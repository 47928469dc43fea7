"""qadapt.distributed: training with the quantized base sharded by FSDP2 (and DeepSpeed ZeRO-3), on CPU with gloo.

Two processes run the same code path a GPU run does (NCCL there). What must hold: the capability table and the
launch are checked before any work; after sharding the quantized state is proven intact (types, state, bytes per
rank, the gathered payload bit for bit) or training is refused; a short sharded run's losses equal one process's; the
adapter is written once and a one-process qadapt.load reads it back. The heavier runs (ZeRO-3, torchrun, accelerate,
memory) are marked ``distributed`` and run in ``nox -s distributed``.
"""

from __future__ import annotations

import os

import pytest

import qadapt
import qadapt.distributed as qd
from qadapt.errors import IncompatibleError, InvalidOptionError, ShardingError

from ._processes import spawn
from .conftest import backend_ready

GLOBAL_BATCH, SEQ, STEPS = 4, 16, 3
#: float32 reductions in another order (measured 4.8e-7 on the loss after 3 steps)
LOSS_TOLERANCE = 1e-5


def batches(vocab=512, steps=STEPS, seed=0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(steps)]


def train(model, rank=0, world=1, lr=1e-2):
    """AdamW on the adapter; per step the loss of the global batch (each rank takes its slice; the ranks' mean)."""
    import torch
    import torch.distributed as dist

    from qadapt.hf import default_device

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    per = GLOBAL_BATCH // world
    for batch in batches():
        ids = batch[rank * per:(rank + 1) * per].to(default_device())
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
    return losses


def eval_loss(model, rank=0, world=1):
    import torch
    import torch.distributed as dist

    from qadapt.hf import default_device

    ids = batches(steps=1, seed=1)[0].to(default_device())
    per = GLOBAL_BATCH // world
    with torch.no_grad():
        value = model(input_ids=ids[rank * per:(rank + 1) * per], labels=ids[rank * per:(rank + 1) * per]).loss
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value.item()


def one_process(folder, backend, **options):
    """The reference: the same model, adapter initialisation and data in one process."""
    model = qadapt.attach(qadapt.load(folder, backend=backend, **options), "lora", r=8)
    qd.deterministic_lora_init(model)
    return model, train(model), eval_loss(model)


# ---------------------------------------------------------------------------------------------- two processes
def _two_ranks(rank, world, folder, out):
    """Every rank: bnb loaded whole then sharded, trained, saved; bnb streamed into shards; hqq sharded."""
    from qadapt.distributed.layers import snapshot

    found = {}
    model = qadapt.attach(qadapt.load(folder, backend="bnb"), "lora", r=8)
    qd.deterministic_lora_init(model)
    whole = {name: {p: facts.fingerprint for p, facts in layer.payload.items()}
             for name, layer in snapshot(model, qadapt.get_backend("bnb")).items()}
    model = qd.shard(model)
    found["bnb"] = {"report": qd.last_report(model).to_dict(), "losses": train(model, rank, world),
                    "eval": eval_loss(model, rank, world)}
    qd.save(model, out)

    streamed = qd.load_sharded(folder, "bnb", adapter={"r": 8})
    from qadapt.distributed.fsdp2 import gathered_fingerprints

    gathered = gathered_fingerprints(streamed, qadapt.get_backend("bnb"))
    found["streamed"] = {"same_payload_as_load": all(gathered[(n, p)] == fp for n, layer in whole.items()
                                                     for p, fp in layer.items()),
                         "report": qd.last_report(streamed).to_dict(), "losses": train(streamed, rank, world)}

    hqq = qadapt.attach(qadapt.load(folder, backend="hqq"), "lora", r=8)
    qd.deterministic_lora_init(hqq)
    hqq = qd.shard(hqq)
    found["hqq"] = {"report": qd.last_report(hqq).to_dict(), "losses": train(hqq, rank, world)}
    return found


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    backend_ready("bnb")
    backend_ready("hqq")
    out = str(tmp_path_factory.mktemp("sharded") / "adapter")
    return spawn(_two_ranks, 2, str(tiny_dir), out), out


def test_two_ranks_train_like_one_process(two_ranks, tiny_dir):
    ranks, _ = two_ranks
    _, losses, _ = one_process(str(tiny_dir), "bnb")
    for rank in ranks:
        assert max(abs(a - b) for a, b in zip(rank["bnb"]["losses"], losses)) < LOSS_TOLERANCE
        assert max(abs(a - b) for a, b in zip(rank["streamed"]["losses"], losses)) < LOSS_TOLERANCE
    _, hqq_losses, _ = one_process(str(tiny_dir), "hqq")
    assert max(abs(a - b) for a, b in zip(ranks[0]["hqq"]["losses"], hqq_losses)) < LOSS_TOLERANCE


def test_each_rank_holds_its_share_and_the_state_whole(two_ranks):
    ranks, _ = two_ranks
    for case in ("bnb", "hqq", "streamed"):
        reports = [rank[case]["report"] for rank in ranks]
        for report in reports:
            assert report["problems"] == [] and report["layers"] == 14 and report["world_size"] == 2
            assert report["payload_checked"] == 14  # every payload gathered and compared bit for bit
        assert sum(r["payload_bytes"] for r in reports) == reports[0]["global_payload_bytes"]
        assert reports[0]["payload_bytes"] == reports[0]["global_payload_bytes"] // 2
        assert reports[0]["state_bytes"] == reports[1]["state_bytes"] > 0  # replicated: every rank has all of it


def test_streaming_load_gives_the_bytes_of_a_whole_load(two_ranks):
    ranks, _ = two_ranks
    assert all(rank["streamed"]["same_payload_as_load"] for rank in ranks)


def test_adapter_saved_once_loads_in_one_process_and_merges(two_ranks, tiny_dir):
    ranks, out = two_ranks
    assert sorted(os.listdir(out)) == ["adapter", "qadapt.json"]  # no copy of the base: a reference to its folder
    reloaded = qadapt.load(out)
    assert abs(eval_loss(reloaded) - ranks[0]["bnb"]["eval"]) < LOSS_TOLERANCE
    report = qadapt.merge(reloaded, "dequantize")
    assert report.output_error < 1e-4


def _nf4_two_ranks(rank, world, folder, out):
    """Every rank: torchao's NF4 loaded whole, sharded, trained, saved."""
    model = qadapt.attach(qadapt.load(folder, backend="torchao", scheme="nf4"), "lora", r=8)
    qd.deterministic_lora_init(model)
    model = qd.shard(model)
    found = {"report": qd.last_report(model).to_dict(), "losses": train(model, rank, world),
             "eval": eval_loss(model, rank, world)}
    qd.save(model, out)
    return found


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory, tokenizer):
    """A 256-wide tiny Llama: every weight's NF4 scale groups (64 x 256 weights each) split between 2 ranks."""
    from qadapt.testing import toy

    return toy.save_model(toy.build_model(hidden_size=256, intermediate_size=512),
                          tmp_path_factory.mktemp("wide") / "llama", tokenizer)


def test_torchao_nf4_trains_sharded_from_two_ranks_like_one_unsharded_process(wide_dir, tmp_path):
    """The reference trains without an engine: FSDP2 cannot shard NF4 in one process (refused, the next test)."""
    backend_ready("torchao")
    out = str(tmp_path / "adapter")
    ranks = spawn(_nf4_two_ranks, 2, wide_dir, out)
    from qadapt.distributed.layers import quantized_layers, tensor_bytes

    reference, losses, final = one_process(wide_dir, "torchao", scheme="nf4")
    whole = sum(tensor_bytes(m.weight) for m in quantized_layers(reference, qadapt.get_backend("torchao")).values())
    for rank in ranks:
        assert max(abs(a - b) for a, b in zip(rank["losses"], losses)) < LOSS_TOLERANCE
        report = rank["report"]
        assert report["problems"] == [] and report["layers"] == 14 and report["payload_checked"] == 14
        # the codes and scales halve; NF4Tensor's 16-value table and scale mean (68 bytes a layer) are on both ranks
        assert report["payload_bytes"] == (whole - 68 * 14) // 2 + 68 * 14
        assert report["global_payload_bytes"] == 2 * report["payload_bytes"]  # the ranks' shares together
    reloaded = qadapt.load(out)  # one process: the base quantized again from its folder, the adapter put on it
    assert abs(eval_loss(reloaded) - ranks[0]["eval"]) < LOSS_TOLERANCE
    assert abs(eval_loss(reloaded) - final) < LOSS_TOLERANCE


def test_torchao_nf4_is_refused_in_one_process_and_on_shapes_that_do_not_split(tiny_dir, wide_dir):
    backend_ready("torchao")
    from qadapt.testing.conformance import _same, _snapshot

    torchao = qadapt.get_backend("torchao")
    options = torchao.validate_options({"scheme": "nf4"})
    model = qadapt.attach(qadapt.load(str(tiny_dir), backend="torchao", scheme="nf4"), "lora", r=8)
    before = _snapshot(model)
    with qd.one_process_group():
        with pytest.raises(ShardingError, match="cannot be sharded by FSDP2 in one process"):
            qd.shard(model)
    assert _same(before, _snapshot(model)) and qadapt.distributed.last_report(model) is None
    # the attention's 128 x 128 weights are one NF4 scale group each (no two equal shares; the MLP's are two); the
    # 256-wide model's split in 2 and 4
    problems = torchao.sharding_problems(model, options, "fsdp2", 2)
    assert len(problems) == 8 and all("_proj" in p and "attn" in p for p in problems), problems
    wide = qadapt.attach(qadapt.load(wide_dir, backend="torchao", scheme="nf4"), "lora", r=8)
    assert torchao.sharding_problems(wide, options, "fsdp2", 2) == []
    assert torchao.sharding_problems(wide, options, "fsdp2", 4) == []
    assert "do not divide into 3" in torchao.sharding_problems(wide, options, "fsdp2", 3)[0]
    # NF4 loads whole, then shards: FSDP2 reads NF4Tensor's scale mean and code table from the tensor it sharded, so
    # a skeleton filled later would all-gather the skeleton's (tried: meta tensors, caught by the payload check)
    with pytest.raises(IncompatibleError, match="cannot build empty layers"):
        qd.load_sharded(wide_dir, "torchao", scheme="nf4")


# ---------------------------------------------------------------------------------------------- refusals (one process)
def test_a_folder_missing_a_weight_is_refused_before_any_rank_streams(tmp_path, tiny_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    backend_ready("bnb")
    folder = tmp_path / "weight-missing"
    shutil.copytree(tiny_dir, folder)
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.self_attn.o_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidOptionError, match="1 of the model's weights are missing .*layers.1.self_attn.o_proj"):
        qd.load_sharded(folder, "bnb", adapter={"r": 8})  # before the launch is checked: no process group needed


@pytest.fixture
def bnb_lora(tiny_dir):
    backend_ready("bnb")
    return qadapt.attach(qadapt.load(str(tiny_dir), backend="bnb"), "lora", r=8)


def test_the_table_is_read_before_any_work(tiny_dir, bnb_lora):
    backend_ready("torchao")
    with qd.one_process_group():
        int8 = qadapt.attach(qadapt.load(str(tiny_dir), backend="torchao"), "lora", r=8)
        with pytest.raises(IncompatibleError, match="aten.split"):
            qd.shard(int8)
        eight = qadapt.attach(qadapt.load(str(tiny_dir), backend="bnb", bits=8), "lora", r=8)
        with pytest.raises(IncompatibleError, match="SCB"):
            qd.shard(eight)
        vera = qadapt.attach(qadapt.load(str(tiny_dir), backend="bnb"), "vera", r=8)
        with pytest.raises(IncompatibleError, match="not verified under fsdp2"):
            qd.shard(vera)
        with pytest.raises(InvalidOptionError, match="no adapter"):
            qd.shard(qadapt.load(str(tiny_dir), backend="bnb"))
        with pytest.raises(InvalidOptionError, match="unknown engine"):
            qd.shard(bnb_lora, "fsdp1")
    assert type(int8).__name__ == "PeftModelForCausalLM"  # not wrapped: refused before the engine ran


def test_a_launch_that_would_train_apart_is_refused(bnb_lora, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ShardingError, match="each process would train alone"):
        qd.shard(bnb_lora)
    with pytest.raises(ShardingError, match="each process would train alone"):
        qd.check_launch()


def test_mixed_precision_that_casts_packed_bytes_is_refused_before_sharding(bnb_lora):
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    with qd.one_process_group():
        with pytest.raises(ShardingError, match="cast the packed quantized bytes of 14 layer"):
            qd.shard(bnb_lora, mixed_precision=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        assert qadapt.distributed.last_report(bnb_lora) is None and type(bnb_lora).__name__ == "PeftModelForCausalLM"


def test_the_payload_check_catches_an_engine_that_changes_the_bytes(bnb_lora):
    """What the checks are for: the same cast let through (accelerate's mixed precision does it) is caught after
    sharding, before training: from the units' policy, and in the gathered bytes of every layer."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from qadapt.distributed import fsdp2, sharding
    from qadapt.distributed.layers import ShardReport, snapshot

    with qd.one_process_group():
        before = snapshot(bnb_lora, qadapt.get_backend("bnb"))
        fsdp2.wrap(bnb_lora, mixed_precision=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        with pytest.raises(ShardingError, match="casts it to torch.bfloat16 in every all-gather"):
            qd.verify(bnb_lora)  # a model sharded elsewhere: the policy itself is read
        report = ShardReport(engine="fsdp2", world_size=1)  # and the gathered bytes, compared with those before
        sharding._compare_payloads(bnb_lora, qadapt.get_backend("bnb"), "fsdp2", before, report)
        assert len(report.problems) == 14 and "differs from the one before sharding" in report.problems[0]


def test_a_model_each_rank_holds_whole_is_refused(bnb_lora):
    """accelerate 1.15 on CPU wraps the model in DDP even with an FSDP config."""
    from torch.nn.parallel import DistributedDataParallel

    with qd.one_process_group():
        with pytest.raises(ShardingError, match="DistributedDataParallel"):
            qd.verify(DistributedDataParallel(bnb_lora))


def test_a_stale_quant_state_is_refused(bnb_lora):
    """FSDP2 drops the weight's quant_state and bitsandbytes' forward takes the module's: a module whose
    quant_state is not its weight's would run new codes with old scales."""
    import copy

    import bitsandbytes as bnb

    layer = next(m for m in bnb_lora.modules() if isinstance(m, bnb.nn.Linear4bit))
    stale = copy.deepcopy(layer.weight.quant_state)
    stale.absmax = stale.absmax + 1
    layer.quant_state = stale
    with qd.one_process_group():
        with pytest.raises(ShardingError, match="differs from the one its weight had"):
            qd.shard(bnb_lora)


def test_requantized_layers_keep_module_and_weight_state_the_same(bnb_lora):
    """The root of the stale state: a merge re-quantizing onto the original grid built a Params4bit whose module
    kept the old layer's quant_state (qadapt_plugins/bnb.py)."""
    from qadapt.record import get_record

    for policy in ("grid", "best"):
        qadapt.merge(bnb_lora, "requantize", policy=policy)
        merged = [m for m in get_record(bnb_lora).merge.originals.values()]
        assert merged
        inner = bnb_lora.get_base_model()
        layers = [inner.get_submodule(name) for name in get_record(bnb_lora).merge.originals]
        assert all(layer.quant_state is layer.weight.quant_state for layer in layers), policy
        qadapt.unmerge(bnb_lora)


def test_bnb_stores_packed_bytes_in_the_model_dtype(tiny_dir, tmp_path):
    """FSDP2 and accelerate shard them like weights then (accelerate 1.15 leaves uint8 Params4bit unsharded)."""
    import torch

    from qadapt.testing import toy

    backend_ready("bnb")
    for dtype, folder in ((torch.float32, str(tiny_dir)),
                          (torch.bfloat16, toy.save_model(toy.build_model(dtype=torch.bfloat16), tmp_path / "bf16"))):
        import bitsandbytes as bnb

        model = qadapt.load(folder, backend="bnb")
        assert {m.weight.dtype for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)} == {dtype}


def test_a_sharded_model_is_saved_and_merged_only_through_the_distributed_path(bnb_lora, tmp_path):
    with qd.one_process_group():
        model = qd.shard(bnb_lora)
        with pytest.raises(qadapt.CheckpointError, match="qadapt.distributed.save"):
            qadapt.save(model, tmp_path / "whole")
        with pytest.raises(IncompatibleError, match="a merge needs whole layers"):
            qadapt.merge(model)
    assert not (tmp_path / "whole").exists()


def test_a_changed_base_folder_is_refused_when_loading(two_ranks, tiny_dir, tmp_path):
    import json
    import shutil

    _, out = two_ranks
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "qadapt.json").read_text())
    manifest["base_source"]["files"]["config.json"] = "0" * 64
    (copy / "qadapt.json").write_text(json.dumps(manifest))
    with pytest.raises(qadapt.CheckpointError, match="changed since the adapter was saved"):
        qadapt.load(str(copy))


def test_default_device_follows_the_local_rank(monkeypatch):
    import torch

    from qadapt.hf import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == "cuda:3"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the launcher shows each process its own GPU
    assert default_device() == "cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(qadapt.QadaptError, match="none numbered 3"):
        default_device()


# ---------------------------------------------------------------------------------------------- placement (one GPU)
def test_placement_is_refused_by_backends_that_place_the_whole_model(tiny_dir):
    backend_ready("hqq")
    with pytest.raises(IncompatibleError, match="places the whole model on one device"):
        qadapt.load(str(tiny_dir), backend="hqq", device_map="auto")
    backend_ready("torchao")
    with pytest.raises(IncompatibleError, match="CPU offload of torchao"):
        qadapt.load(str(tiny_dir), backend="torchao", device_map={"": "cpu"}, cpu_offload=True)
    with pytest.raises(InvalidOptionError, match="nothing says which modules"):
        qadapt.load(str(tiny_dir), backend="bnb", cpu_offload=True)
    with pytest.raises(IncompatibleError, match="does not offload weights to disk"):
        qadapt.load(str(tiny_dir), backend="bnb", device_map={"model": "cpu", "lm_head": "disk"})


def test_device_map_and_max_memory_are_honoured_through_from_pretrained(tiny_dir):
    from qadapt.placement import placement_of

    backend_ready("bnb")
    model = qadapt.load(str(tiny_dir), backend="bnb", device_map="auto", max_memory={"cpu": "1GiB"})
    assert placement_of(model)["device_map"] == {"": "cpu"} and placement_of(model)["not_quantized"] == []
    with pytest.raises(IncompatibleError, match="transformers refused the placement"):
        qadapt.load(str(tiny_dir), backend="bnb", max_memory={"cpu": "100KiB"})  # would spill to disk
    assert placement_of(qadapt.load(str(tiny_dir), backend="bnb")) is None  # the default: recorded as such


@pytest.mark.gpu
def test_cpu_offload_of_parts_with_a_custom_map(tiny_dir):
    """bitsandbytes keeps CPU-mapped layers in full precision (llm_int8_enable_fp32_cpu_offload): done only when
    asked, and recorded."""
    from qadapt.placement import placement_of

    layout = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0,
              "model.rotary_emb": 0, "lm_head": "cpu"}
    with pytest.raises(InvalidOptionError, match="stay in full precision"):
        qadapt.load(str(tiny_dir), backend="bnb", device_map=layout)
    model = qadapt.load(str(tiny_dir), backend="bnb", device_map=layout, cpu_offload=True)
    placed = placement_of(model)
    assert set(placed["on_cpu"]) == {"model.layers.1", "lm_head"}
    assert placed["not_quantized"] and all(name.startswith("model.layers.1.") for name in placed["not_quantized"])
    peft_model = qadapt.attach(model, "lora", r=8)
    ids = batches(steps=1)[0].to("cuda:0")
    assert peft_model(input_ids=ids, labels=ids).loss.isfinite()
    auto = qadapt.load(str(tiny_dir), backend="bnb", max_memory={0: "300KiB", "cpu": "1GiB"}, cpu_offload=True)
    assert placement_of(auto)["on_cpu"]



def test_fsdp2_still_cannot_shard_nf4_in_one_process(tiny_dir):
    """The upstream limit behind qadapt's refusal of NF4 in one process (torchao.sharding_problems): torch 2.13's
    FSDP2 skips the all-gather at world size 1 and passes only the first of NF4Tensor's three inner tensors. When this
    fails (a fixed torch), lift the refusal and let the conformance kit run the cell in one process."""
    backend_ready("torchao")
    from torch.distributed.fsdp import fully_shard
    from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), quantization_config=TorchAoConfig(NF4WeightOnlyConfig()))
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "NF4Tensor"
    ids = batches(steps=1)[0]
    with qd.one_process_group():
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        with pytest.raises(ValueError, match="not enough values to unpack"):
            model(input_ids=ids, labels=ids)

# ---------------------------------------------------------------------------------------------- the GPU checks
@pytest.mark.gpu
def test_bf16_storage_survives_sharding_on_cuda_bit_for_bit(tmp_path):
    """bitsandbytes issue 1945: FSDP2's parameter swap canonicalising bfloat16 NaN patterns on CUDA would change
    packed codes stored as bfloat16. The bytes must equal a uint8-storage quantization's, before and after FSDP2."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qadapt.testing import toy

    folder = toy.save_model(toy.build_model(dtype=torch.bfloat16), tmp_path / "bf16")
    reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda:0", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8))
    expected = {n: m.weight.data.view(torch.uint8).reshape(-1).clone() for n, m in reference.named_modules()
                if isinstance(m, bnb.nn.Linear4bit)}
    model = qadapt.load(folder, backend="bnb")
    stored = {n: m.weight.data for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert all(torch.equal(stored[n].view(torch.uint8).reshape(-1), expected[n]) for n in expected)
    with qd.one_process_group():
        sharded = qd.shard(qadapt.attach(model, "lora", r=8))
        report = qd.last_report(sharded)
        assert report.ok and report.payload_checked == len(expected)
        ids = batches(steps=1)[0].to("cuda:0")
        assert sharded(input_ids=ids, labels=ids).loss.isfinite()


@pytest.mark.gpu
def test_streaming_into_shards_on_cuda_gives_the_bytes_and_losses_of_a_whole_load(tiny_dir):
    """The skeleton's buffers (rotary inv_freq) are made on the host: they must reach the rank's GPU before sharding
    (the 8B run of 2026-12-01 found load_sharded refused on CUDA for that)."""
    backend_ready("bnb")
    from qadapt.distributed.fsdp2 import gathered_fingerprints
    from qadapt.distributed.layers import snapshot

    with qd.one_process_group():
        whole = qadapt.attach(qadapt.load(str(tiny_dir), backend="bnb"), "lora", r=8)
        expected = {(n, p): facts.fingerprint for n, layer in snapshot(whole, qadapt.get_backend("bnb")).items()
                    for p, facts in layer.payload.items()}
        streamed = qd.load_sharded(str(tiny_dir), "bnb", adapter={"r": 8})
        assert {t.device.type for t in streamed.buffers()} == {"cuda"}
        gathered = gathered_fingerprints(streamed, qadapt.get_backend("bnb"))
        assert expected and all(gathered[key] == fingerprint for key, fingerprint in expected.items())
        losses = train(streamed)
    _, reference, _ = one_process(str(tiny_dir), "bnb")
    assert all(abs(a - b) < 1e-4 for a, b in zip(losses, reference)), (losses, reference)


@pytest.mark.gpu
def test_fsdp2_cpu_offload_keeps_the_quantized_state(tiny_dir):
    backend_ready("bnb")
    with qd.one_process_group():
        model = qadapt.attach(qadapt.load(str(tiny_dir), backend="bnb"), "lora", r=8)
        qd.deterministic_lora_init(model)  # the reference's initialisation (one_process)
        model = qd.shard(model, offload=True)
        assert qd.last_report(model).ok
        losses = train(model)
    _, reference, _ = one_process(str(tiny_dir), "bnb")
    assert all(abs(a - b) < 1e-4 for a, b in zip(losses, reference)), (losses, reference)
