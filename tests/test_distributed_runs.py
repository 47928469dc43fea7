"""The heavier multi-process runs (``nox -s distributed``; marked ``distributed``, not in the default suite): the
example under torchrun with each loading path, DeepSpeed ZeRO-3, accelerate's CPU fallback refused, and memory per
rank following the shard when loading straight into shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

import qadapt

from .conftest import backend_ready

pytestmark = pytest.mark.distributed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "sharded_qlora.py")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, processes=2, timeout=600, env=None):
    """``torchrun --nproc-per-node N`` of a script with arguments; its completed process (output in stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-port", str(_port()), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def summary(result) -> dict:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("backend,stream", [("bnb", False), ("bnb", True), ("hqq", True)])
def test_torchrun_example_trains_like_one_process_and_saves_once(tiny_dir, tmp_path, backend, stream):
    backend_ready(backend)
    flags = ["--stream"] if stream else []
    common = ["--model", str(tiny_dir), "--backend", backend, "--steps", "3", "--seq", "32", "--lr", "1e-2", *flags]
    two = summary(torchrun(EXAMPLE, *common, "--out", str(tmp_path / "two")))
    one = summary(torchrun(EXAMPLE, *common, "--out", str(tmp_path / "one"), processes=1))
    assert max(abs(a - b) for a, b in zip(two["losses"], one["losses"])) < 1e-5
    assert two["ranks"][0]["payload_bytes"] * 2 == one["ranks"][0]["payload_bytes"]
    assert two["ranks"][0]["state_bytes"] == one["ranks"][0]["state_bytes"]
    reloaded = qadapt.load(str(tmp_path / "two"))
    assert qadapt.get_backend(backend).is_quantized_layer(reloaded.get_base_model().model.layers[0].mlp.up_proj.base_layer)


@pytest.mark.parametrize("backend", ["bnb", "hqq"])
def test_zero3_trains_like_fsdp2(tiny_dir, tmp_path, backend):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (the `deepspeed` extra of qadapt-lm)")
    backend_ready(backend)
    common = ["--model", str(tiny_dir), "--backend", backend, "--steps", "3", "--seq", "32", "--lr", "1e-2"]
    zero3 = summary(torchrun(EXAMPLE, *common, "--engine", "zero3", "--out", str(tmp_path / "z3")))
    fsdp2 = summary(torchrun(EXAMPLE, *common, "--out", str(tmp_path / "f2")))
    assert max(abs(a - b) for a, b in zip(zero3["losses"], fsdp2["losses"])) < 1e-5
    assert zero3["ranks"][0]["payload_bytes"] == fsdp2["ranks"][0]["payload_bytes"]
    qadapt.load(str(tmp_path / "z3"))


def test_torchao_nf4_trains_sharded_like_one_unsharded_process_and_reloads(tmp_path, tokenizer):
    """torchao's NF4Tensor under FSDP2 from 2 processes (a 256-wide model: each weight's NF4 scale groups split in
    two); its reference is the same training in this process without an engine, since FSDP2 cannot shard NF4 in one
    process (torch 2.13; refused before any work, checked here too)."""
    import importlib.util

    import torch

    import qadapt.distributed as qd
    from qadapt.distributed.layers import tensor_bytes
    from qadapt.record import base_model
    from qadapt.testing import toy

    backend_ready("torchao")
    wide = toy.save_model(toy.build_model(hidden_size=256, intermediate_size=512), tmp_path / "wide", tokenizer)
    common = ["--model", wide, "--backend", "torchao", "--option", "scheme=nf4", "--steps", "3", "--seq", "32",
              "--lr", "1e-2"]
    two = summary(torchrun(EXAMPLE, *common, "--out", str(tmp_path / "two")))

    spec = importlib.util.spec_from_file_location("sharded_qlora", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse(common)
    model = qadapt.attach(qadapt.load(wide, backend="torchao", scheme="nf4"), "lora", r=args.r, lora_alpha=2 * args.r)
    qd.deterministic_lora_init(model)
    payload = sum(tensor_bytes(m.weight) for m in base_model(model).modules()
                  if qadapt.get_backend("torchao").is_quantized_layer(m))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for batch in example.batches(args, model.config.vocab_size, 1):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert max(abs(a - b) for a, b in zip(two["losses"], losses)) < 1e-5, (two["losses"], losses)
    # each rank holds half of the codes and scales (the 16-value NF4 table and the scale mean, 68 bytes a layer, whole)
    layers = 2 * 7
    assert two["ranks"][0]["payload_bytes"] == two["ranks"][1]["payload_bytes"] == (payload - 68 * layers) // 2 + 68 * layers

    reloaded = qadapt.load(str(tmp_path / "two"))  # the base quantized again from its source folder, the adapter put on
    ids = example.batches(args, model.config.vocab_size, 1)[0]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)

    one = torchrun(EXAMPLE, *common, processes=1)
    assert one.returncode != 0 and "ShardingError" in one.stderr and "in one process" in one.stderr, one.stderr[-3000:]


ACCELERATE_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""
ACCELERATE_SCRIPT = """
from accelerate import Accelerator
import qadapt.distributed as qd
accelerator = Accelerator()
print("accelerate says", accelerator.num_processes, "process(es)", flush=True)
qd.check_launch()
print("launch accepted", flush=True)
"""


def test_accelerate_on_cpu_that_would_train_apart_is_refused(tmp_path):
    """accelerate 1.15 with an FSDP config on a machine without a GPU: two processes, each told it is alone."""
    pytest.importorskip("accelerate")
    (tmp_path / "fsdp2.yaml").write_text(ACCELERATE_CONFIG)
    (tmp_path / "script.py").write_text(ACCELERATE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(tmp_path / "fsdp2.yaml"), "--main_process_port", str(_port()), str(tmp_path / "script.py")],
                            capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "launch accepted" not in output, output[-3000:]
    # the processes do share a process group, but accelerate tells each it is alone (and would not shard)
    assert "accelerate says 1 process(es)" in output, output[-3000:]
    assert "ShardingError" in output and "would have each process train alone" in output, output[-3000:]


MEMORY_SCRIPT = """
import json, os, sys, threading, time
import torch.distributed as dist
import qadapt, qadapt.distributed as qd

def anon_kib():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("RssAnon:"))

class Peak:
    def __enter__(self):
        self.start, self.peak, self.stop = anon_kib(), 0, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True); self.thread.start(); return self
    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, anon_kib()); self.stop.wait(0.003)
    def __exit__(self, *exc):
        self.stop.set(); self.thread.join(); self.peak = max(self.peak, anon_kib())

folder, mode, warm = sys.argv[1], sys.argv[2], sys.argv[3]
rank, world = qd.init()
# the same path on a tiny model first: what is measured is the model, not the first import of FSDP2 or PEFT
if mode == "whole":
    qadapt.attach(qadapt.load(warm, backend="bnb"), "lora", r=1)
else:
    qd.load_sharded(warm, "bnb", adapter={"r": 1})
with Peak() as peak:  # LoRA r=1: the adapter is not what is measured
    if mode == "whole":
        model = qadapt.attach(qadapt.load(folder, backend="bnb"), "lora", r=1)
    else:
        model = qd.load_sharded(folder, "bnb", adapter={"r": 1})
out = [None] * world
dist.all_gather_object(out, (peak.peak - peak.start) / 1024)
if rank == 0:
    print(json.dumps({"peak_mib": out}))
dist.destroy_process_group()
"""


def test_loading_into_shards_keeps_memory_per_rank_to_the_shard(tmp_path, tiny_dir):
    """16 layers of width 1024 (0.8 GB in float32): the peak of the load above what the process held (anonymous
    memory: the memory-mapped checkpoint pages are shared by the ranks of a host), per rank. What does not halve: one
    full-precision tensor and its quantization in flight (~2.5x the largest weight), and the Python objects of the
    modules (~0.7 MB a decoder layer, counted: the live tensor storages are exactly half at 2 ranks). Toy models show
    nothing for that reason. Measured here: qadapt.load 127 MiB; load_sharded 138 MiB in one rank, 89-90 MiB in each
    of two."""
    from qadapt.testing import toy

    backend_ready("bnb")
    folder = toy.save_model(toy.build_model(num_hidden_layers=16, hidden_size=1024, intermediate_size=2816,
                                            num_attention_heads=8, num_key_value_heads=8, vocab_size=512),
                            tmp_path / "wide")
    script = tmp_path / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    # glibc's dynamic mmap threshold keeps freed blocks of a few MB in the heap, so the resident set grows with every
    # FSDP2 all-gather even though the storages are freed (seen: +2 MB per unit gathered, sizes 0 after reshard); a
    # fixed threshold makes the resident set follow the live tensors
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    whole = summary(torchrun(str(script), folder, "whole", str(tiny_dir), processes=1, env=env))["peak_mib"][0]
    one = summary(torchrun(str(script), folder, "sharded", str(tiny_dir), processes=1, env=env))["peak_mib"][0]
    two = summary(torchrun(str(script), folder, "sharded", str(tiny_dir), processes=2, env=env))["peak_mib"]
    print(f"load peak above the start: qadapt.load {whole:.1f} MiB; load_sharded, 1 rank {one:.1f} MiB, "
          f"each of 2 ranks {two[0]:.1f} / {two[1]:.1f} MiB")
    # each rank: its half of the model plus one full-precision tensor and its quantized copy in flight
    assert max(two) < 0.75 * one, (two, one)
    assert max(two) < whole, (two, whole)  # a rank never needs what one whole process needs
