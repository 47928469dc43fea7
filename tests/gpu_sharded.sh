#!/usr/bin/env bash
# Issue 17's checks on one GPU: the sharded code path at world size 1 (NCCL), the GPU-only checks, and memory per
# rank at the Llama-3-8B shape against `qadapt plan`. Run from the repository root, qadapt and the backends
# importable (docs/gpu-runs.md):
#     bash tests/gpu_sharded.sh OUT            # all parts (about 8 minutes on an H200: more than one 10-minute call
#                                              # may allow; then run the parts in two calls)
#     PARTS="tests" bash tests/gpu_sharded.sh OUT
#     PARTS="8b" bash tests/gpu_sharded.sh OUT
#     PARTS="8b" MODES="stream" bash tests/gpu_sharded.sh OUT   # one of the 8B runs (whole, stream, checkpointing)
# Writes into OUT: device.txt, pytest.log (the `gpu` tests of tests/test_distributed.py: bfloat16-stored 4-bit bytes
# through FSDP2 bit for bit, FSDP2 CPU offload, device_map with CPU offload of parts), torchrun-1.json (the example,
# world 1, toy model), 8b-*.json (the example at the 8B shape: loaded whole and sharded, streamed into shards, with
# gradient checkpointing; peak and before-training memory per rank), plan-*.json (the predictions for the same
# settings) and memory-8b.txt (the largest allocations alive at the end of a forward, by where they were made).
# The 8B folder (16 GB, random weights) is built once under .cache/llama-8b (git-ignored). Exit status 0: all passed.
set -u
out=${1:-out/sharded}
parts=${PARTS:-tests 8b}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt" 2>&1
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)" >> "$out/device.txt" 2>&1
status=0
run() { echo "+ $*" >> "$out/commands.txt"; "$@" || status=1; }

if [[ " $parts " == *" tests "* ]]; then
    run python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" tests/test_distributed.py > "$out/pytest.log" 2>&1
    python3 -c "from qadapt.testing import toy; toy.save_model(toy.build_model(), '.cache/toy-llama')"
    run python3 -m torch.distributed.run --nproc-per-node 1 examples/sharded_qlora.py --model .cache/toy-llama \
        --backend bnb --steps 3 --seq 64 --out "$out/toy-adapter" --summary "$out/torchrun-1.json" > "$out/torchrun-1.log" 2>&1
fi

if [[ " $parts " == *" 8b "* ]]; then
    model=.cache/llama-8b
    if [ ! -f "$model/config.json" ]; then
        python3 - "$model" <<'EOF'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048, dtype="bfloat16")
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
EOF
    fi
    common=(--model "$model" --backend bnb --batch 4 --seq 512 --steps 3 --lr 1e-4)  # not saved: 16 GB to checksum
    for mode in ${MODES:-whole stream checkpointing}; do
        flags=()
        [ "$mode" = stream ] && flags=(--stream)
        [ "$mode" = checkpointing ] && flags=(--checkpointing)
        run python3 -m torch.distributed.run --nproc-per-node 1 examples/sharded_qlora.py "${common[@]}" "${flags[@]}" \
            --summary "$out/8b-$mode.json" > "$out/8b-$mode.log" 2>&1
    done
    python3 -m qadapt plan "$model" --backend bnb --batch 4 --seq 512 --engine fsdp2 --json > "$out/plan-fsdp2.json"
    python3 -m qadapt plan "$model" --backend bnb --batch 4 --seq 512 --engine fsdp2 --checkpointing --json \
        > "$out/plan-fsdp2-checkpointing.json"
    python3 -m qadapt plan "$model" --backend bnb --batch 4 --seq 512 --gpus 8 --json > "$out/plan-fsdp2-8gpus.json"
    # the largest allocations alive at the end of a forward (world 1, the same shard() path); not with MODES
    [ -n "${MODES:-}" ] || python3 - "$model" > "$out/memory-8b.txt" 2>&1 <<'EOF' || status=1
import collections, sys, torch
import qadapt, qadapt.distributed as qd
qd.init()
model = qd.shard(qadapt.attach(qadapt.load(sys.argv[1], backend="bnb"), "lora", r=16, lora_alpha=32))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(4, 128000, (4, 512), device="cuda")
for step in range(2):
    if step == 1:
        torch.cuda.memory._record_memory_history(max_entries=100000)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    if step == 1:
        snapshot = torch.cuda.memory._snapshot()
        print(f"allocated at the end of the forward: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
print(f"peak: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
where = collections.Counter()
for segment in snapshot["segments"]:
    for block in segment["blocks"]:
        if block["state"] == "active_allocated":
            frames = [f for f in block.get("frames", []) if "site-packages/torch/" not in f["filename"]]
            top = frames[0] if frames else {"filename": "?", "line": 0, "name": "?"}
            where[f"{top['filename'].split('site-packages/')[-1]}:{top['line']} {top['name']}"] += block["size"]
for place, size in where.most_common(20):
    print(f"{size / 2**30:8.3f} GiB  {place}")
EOF
fi
exit $status
