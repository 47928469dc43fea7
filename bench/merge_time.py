"""How long `qadapt.merge` takes per backend, against the training steps of the same model.

    python bench/merge_time.py --size tiny                     # CPU, seconds
    python bench/merge_time.py --size 1b --backends bnb,hqq,torchao --json docs/bench-results/merge-time-h200.json

For each backend: a randomly initialised Llama of the size's shape is quantized, LoRA (r=16, every linear layer, a
non-zero start so the merge has something to keep) is attached, a few AdamW steps on a batch of ``--batch`` x
``--seq`` tokens are timed (median), then the default merge (``qadapt.merge(model, calibration=...)``: fresh and
best+inputs candidates, measured on one calibration row) and the de-quantizing merge are timed. The figure to read is
merge seconds over training-step seconds: how many steps of training a merge costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(1, os.path.dirname(HERE))  # the repo root, where qadapt is not installed

SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=4096),
    # TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
OPTIONS = {"bnb": {"bits": 4, "double_quant": True}, "bnb8": {"bits": 8}, "hqq": {"bits": 4, "group_size": 64},
           "torchao": {"scheme": "int8_weight_only"}}


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_backend(name, folder, args):
    import torch

    import qadapt

    backend = "bnb" if name == "bnb8" else name
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    row = {"backend": name, "options": OPTIONS.get(name, {})}
    started = time.perf_counter()
    model = qadapt.load(folder, backend=backend, **OPTIONS.get(name, {}))
    row["quantize_s"] = round(time.perf_counter() - started, 2)
    model = qadapt.attach(model, "lora", r=16, init_lora_weights=False)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
    calibration = torch.randint(0, vocab, (1, args.seq), generator=generator).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for _ in range(args.steps + 1):
        synchronize()
        t = time.perf_counter()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        synchronize()
        times.append(time.perf_counter() - t)
    row["step_s"] = round(statistics.median(times[1:]), 4)
    model.eval()
    for strategy in ("requantize", "dequantize"):
        synchronize()
        t = time.perf_counter()
        try:
            report = qadapt.merge(model, strategy, calibration=calibration)
            synchronize()
            row[f"{strategy}_s"] = round(time.perf_counter() - t, 2)
            row[f"{strategy}_error"] = report.output_error
            row[f"{strategy}_candidates"] = report.candidates
            row[f"{strategy}_seconds"] = report.seconds  # per candidate policy
            qadapt.unmerge(model)
        except qadapt.QadaptError as exc:
            row[f"{strategy}_s"] = None
            row[f"{strategy}_refused"] = str(exc)
    if row.get("requantize_s"):
        row["requantize_in_steps"] = round(row["requantize_s"] / row["step_s"], 1)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--backends", default="bnb,bnb8,hqq,torchao")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    rows = []
    with tempfile.TemporaryDirectory(prefix="qadapt-merge-time-") as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SIZES[args.size])).to(dtype)
        model.save_pretrained(tmp)
        del model
        for name in args.backends.split(","):
            try:
                rows.append(run_backend(name, tmp, args))
            except Exception as exc:  # one backend's failure is a row, the others still run
                rows.append({"backend": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            print(json.dumps(rows[-1], default=str), flush=True)
    record = {"size": args.size, "shape": SIZES[args.size], "batch": args.batch, "seq": args.seq,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "rows": rows}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2, default=str)
    print("\n| backend | quantize s | train step s | merge (requantize) s | = steps | s per policy | output error | merge (dequantize) s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | error: {r['error'][:80]} | | | | | | |")
            continue
        per_policy = ", ".join(f"{name} {sec:.1f}" for name, sec in (r.get("requantize_seconds") or {}).items())
        print(f"| {r['backend']} | {r['quantize_s']} | {r['step_s']} | {r.get('requantize_s')} | "
              f"{r.get('requantize_in_steps', '-')} | {per_policy} | {r.get('requantize_error', float('nan')):.3g} | "
              f"{r.get('dequantize_s')} |")


if __name__ == "__main__":
    main()
