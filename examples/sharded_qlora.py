"""Train a LoRA adapter on a quantized model sharded across processes (FSDP2 or DeepSpeed ZeRO-3), then save it once.

    torchrun --nproc-per-node 2 examples/sharded_qlora.py --model MODEL_DIR --backend bnb --out OUT
    torchrun --nproc-per-node 2 examples/sharded_qlora.py --model MODEL_DIR --backend hqq --stream --out OUT
    torchrun --nproc-per-node 2 examples/sharded_qlora.py --model MODEL_DIR --backend torchao --option scheme=nf4 --out OUT
    deepspeed --num_gpus 2 examples/sharded_qlora.py --model MODEL_DIR --backend bnb --engine zero3 --out OUT
    accelerate launch --num_processes 2 examples/sharded_qlora.py --model MODEL_DIR --backend bnb --out OUT   (GPUs)
    python examples/sharded_qlora.py --model MODEL_DIR --backend bnb --out OUT      (one process, the same code path)

MODEL_DIR is a full-precision transformers folder (safetensors). Each process joins the run (NCCL on GPUs, gloo on
CPUs), puts itself on ``cuda:LOCAL_RANK``, and either loads the model whole and shards it (default) or, with
``--stream``, loads it straight into its shards, quantizing one tensor at a time (a model larger than one process's
memory). qadapt checks before any work that the backend and adapter can be trained sharded by the engine and that the
launch is one run, and after sharding that every quantized layer survived (bytes, state, the gathered payload bit for
bit). The data are random tokens unless ``--text FILE`` is given (tokenized with the folder's tokenizer). The adapter
is written once, on rank 0: ``qadapt.load(OUT)`` in one process reads it back onto the same base.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a full-precision transformers folder")
    parser.add_argument("--backend", default="bnb")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="a backend option")
    parser.add_argument("--engine", choices=("fsdp2", "zero3"), default="fsdp2")
    parser.add_argument("--stream", action="store_true", help="load straight into the shards (FSDP2)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="global batch (split across ranks)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--text", help="a text file to train on (default: random tokens)")
    parser.add_argument("--out", help="where the adapter is written (rank 0); left out: not saved")
    parser.add_argument("--summary", help="rank 0 writes losses and per-rank memory here as JSON")
    parser.add_argument("--memory-history", help="CUDA: record allocations and dump the snapshot here (rank 0)")
    args = parser.parse_args(argv)
    if args.stream and args.engine != "fsdp2":
        parser.error("--stream loads into FSDP2 shards; with --engine zero3 the model is loaded whole, then sharded")
    return args


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def batches(args, vocab, world):
    import torch

    generator = torch.Generator().manual_seed(0)
    if args.text:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(args.model)(open(args.text).read(), return_tensors="pt").input_ids[0]
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.steps, args.batch), generator=generator)
        return [torch.stack([ids[s:s + args.seq] for s in row.tolist()]) for row in starts]
    return [torch.randint(4, vocab, (args.batch, args.seq), generator=generator) for _ in range(args.steps)]


def main(argv=None) -> int:
    args = parse(argv)
    import torch
    import torch.distributed as dist

    import qadapt
    import qadapt.distributed as qd
    from qadapt.hf import default_device

    rank, world = qd.init()
    device = default_device()
    options = {name: _value(value) for name, _, value in (item.partition("=") for item in args.option)}
    if args.memory_history and torch.cuda.is_available() and rank == 0:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    started = time.perf_counter()
    if args.stream:
        model = qd.load_sharded(args.model, args.backend, adapter={"r": args.r, "lora_alpha": 2 * args.r}, **options)
    else:
        model = qadapt.load(args.model, backend=args.backend, **options)
        if args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = qadapt.attach(model, "lora", r=args.r, lora_alpha=2 * args.r)
        qd.deterministic_lora_init(model)  # as load_sharded does: every rank, world size and mode starts equal
    loaded_s = time.perf_counter() - started
    optimizer = None
    if args.engine == "zero3" or not args.stream:
        if args.engine == "zero3":
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        model = qd.shard(model, args.engine, optimizer=optimizer)
    report = qd.last_report(model)
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before_train = torch.cuda.memory_allocated()
    per_rank = args.batch // world
    losses = []
    model.train()
    for batch in batches(args, qadapt_vocab(model), world):
        ids = batch[rank * per_rank:(rank + 1) * per_rank].to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if args.engine == "zero3":
            model.backward(loss)
            model.step()
        else:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(round(value.item(), 6))
        if rank == 0:
            print(f"step {len(losses)}: loss {losses[-1]:.4f}", flush=True)
    memory = {"payload_bytes": report.payload_bytes, "state_bytes": report.state_bytes}
    if torch.cuda.is_available():
        memory.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, before_train_gib=before_train / 2**30)
    everyone = [None] * world
    dist.all_gather_object(everyone, memory)
    if args.memory_history and torch.cuda.is_available() and rank == 0:
        torch.cuda.memory._dump_snapshot(args.memory_history)
    if args.out:
        qd.save(model, args.out, overwrite=True)
    if rank == 0:
        summary = {"world": world, "engine": args.engine, "backend": args.backend, "stream": args.stream,
                   "losses": losses, "load_s": round(loaded_s, 1), "ranks": everyone, "out": args.out}
        print(json.dumps(summary), flush=True)
        if args.summary:
            with open(args.summary, "w") as handle:
                json.dump(summary, handle, indent=2)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def qadapt_vocab(model) -> int:
    from qadapt.record import base_model

    return base_model(getattr(model, "module", model)).config.vocab_size


if __name__ == "__main__":
    raise SystemExit(main())
