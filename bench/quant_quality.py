"""Quantization quality per backend on a small Llama trained here (CPU, a few minutes, local text only).

Random weights say nothing about quality (every format reconstructs Gaussian noise alike, and perplexity is the
vocabulary size), so this trains a small Llama on the Python standard library's sources (``qadapt.testing.toy.local_text``)
for ``--minutes``, then for every backend setting: per-layer relative reconstruction error
``||W - dequantize(quantize(W))||_F / ||W||_F`` (through each backend's ``dequantize``, i.e. what the layer computes
with) and held-out perplexity against the full-precision model.

    python bench/quant_quality.py --minutes 12 --out out/quality
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=1024, max_position_embeddings=256)
SEQ = 128

#: name -> (backend, options); CPU-capable settings (AWQ quantization needs CUDA)
SETTINGS = {
    "bnb-nf4-dq": ("bnb", dict(bits=4, quant_type="nf4", double_quant=True)),
    "bnb-fp4": ("bnb", dict(bits=4, quant_type="fp4", double_quant=False)),
    "bnb-int8": ("bnb", dict(bits=8)),
    "torchao-int8wo": ("torchao", dict(scheme="int8_weight_only")),
    "hqq-4bit-g64": ("hqq", dict(bits=4, group_size=64)),
    "hqq-3bit-g64": ("hqq", dict(bits=3, group_size=64)),
    "hqq-2bit-g16": ("hqq", dict(bits=2, group_size=16)),
    "gptq-4bit-g128": ("gptq", dict(bits=4, group_size=128)),
    "gptq-3bit-g128": ("gptq", dict(bits=3, group_size=128)),
    "inc-rtn-4bit-g64": ("inc", dict(algorithm="rtn", bits=4, group_size=64)),
    "eetq-int8": ("eetq", {}),
    "aqlm-2x8": ("aqlm", dict(num_codebooks=2, nbits_per_codebook=8, in_group_size=8)),
    # not aqlm-1x16: its 65,536-entry codebook outnumbers this model's weight groups (at most 24,576 per layer), so
    # every group gets its own entry and the "quantized" layer is exact (and larger than the original)
}


def log(*args):
    print(*args, flush=True)


def train_model(tokenizer, ids, minutes, eval_ids=None, seed=0):
    import torch

    from qadapt.testing import toy

    model = toy.build_model(seed=seed, **MODEL).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    deadline = time.perf_counter() + 60 * minutes
    step, losses, curve = 0, [], []
    while time.perf_counter() < deadline:
        starts = torch.randint(0, len(ids) - SEQ - 1, (8,), generator=generator)
        batch = torch.stack([ids[s : s + SEQ] for s in starts.tolist()])
        frac = min(1.0, (time.perf_counter() - (deadline - 60 * minutes)) / (60 * minutes))
        for group in optimizer.param_groups:  # warm-up then cosine, by elapsed time
            group["lr"] = 4e-3 * min(1.0, step / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % 25 == 0:
            log(f"[train] step {step} loss {sum(losses[-25:]) / 25:.3f}")
        if eval_ids is not None and step % 500 == 0:  # held-out perplexity along the way: is it still falling?
            curve.append((step, perplexity(model.eval(), eval_ids)))
            model.train()
            log(f"[train] step {step} held-out perplexity {curve[-1][1]:.2f}")
    return model.eval(), step, sum(losses[-20:]) / 20, curve


def perplexity(model, eval_ids):
    import torch

    chunks = eval_ids[: (len(eval_ids) // SEQ) * SEQ].view(-1, SEQ)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(chunks), 8):
            batch = chunks[i : i + 8]
            loss = model(input_ids=batch, labels=batch).loss
            n = batch.numel() - batch.shape[0]
            total += loss.item() * n
            count += n
    return math.exp(total / count)


def layer_errors(quantized, reference, backend):
    import torch

    ref = dict(reference.named_modules())
    errors = {}
    for name, module in quantized.named_modules():
        if name and backend.is_quantized_layer(module):
            w = ref[name].weight.detach().float()
            d = backend.dequantize(module).float().to(w.device)
            errors[name] = (torch.linalg.norm(w - d) / torch.linalg.norm(w)).item()
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="training time of the small model")
    parser.add_argument("--chars", type=int, default=2_000_000,
                        help="characters of Python standard-library source to train and evaluate on (last 10 %% held out)")
    parser.add_argument("--settings", help="comma-separated subset of: " + ", ".join(SETTINGS))
    parser.add_argument("--model", help="reuse a model folder saved by an earlier run (skips training)")
    parser.add_argument("--out", default="out/quality")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(2, os.cpu_count() or 1)))
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import qadapt
    from qadapt.testing import toy
    from train_throughput import ensure_backends

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    names = args.settings.split(",") if args.settings else list(SETTINGS)
    ensure_backends({SETTINGS[n][0] for n in names})

    text = toy.local_text(args.chars)
    tokenizer = toy.build_tokenizer(vocab_size=MODEL["vocab_size"], text=text)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    split = int(len(ids) * 0.9)
    train_ids, eval_ids = ids[:split], ids[split:]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": MODEL, "seq": SEQ,
            "tokens_train": len(train_ids), "tokens_eval": len(eval_ids),
            "command": " ".join([sys.executable] + sys.argv), "torch": torch.__version__}
    folder = args.model or os.path.join(args.out, "model")
    if args.model is None:
        started = time.perf_counter()
        model, steps, loss, curve = train_model(tokenizer, train_ids, args.minutes, eval_ids=eval_ids)
        meta.update(train_steps=steps, train_loss=loss, train_s=time.perf_counter() - started,
                    heldout_perplexity_by_step=curve)
        toy.save_model(model, folder, tokenizer)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base_ppl = perplexity(reference, eval_ids)
    meta["perplexity_full"] = base_ppl
    log(f"[full] held-out perplexity {base_ppl:.3f}")
    calibration = [train_ids[i * SEQ : (i + 1) * SEQ].unsqueeze(0) for i in range(32)]
    rows = []
    for name in names:
        backend_name, options = SETTINGS[name]
        row = {"setting": name, "backend": backend_name, "options": options}
        try:
            backend = qadapt.get_backend(backend_name)
            env = backend.check_environment()
            if not env.ok:
                raise RuntimeError(f"backend unavailable: {env.reason}")
            started = time.perf_counter()
            quantized = qadapt.load(folder, backend=backend_name,
                                    calibration=calibration if backend.needs_calibration(backend.validate_options(options)) else None,
                                    **options)
            row["quantize_s"] = time.perf_counter() - started
            quantized.eval()
            errors = layer_errors(quantized, reference, backend)
            worst = max(errors, key=errors.get)
            by_kind = {}
            for layer, err in errors.items():
                by_kind.setdefault(layer.rsplit(".", 1)[-1], []).append(err)
            row.update(
                layers=len(errors), rel_error_mean=sum(errors.values()) / len(errors), rel_error_max=errors[worst],
                worst_layer=worst, rel_error_by_kind={k: sum(v) / len(v) for k, v in by_kind.items()},
                perplexity=perplexity(quantized, eval_ids),
            )
            row["perplexity_ratio"] = row["perplexity"] / base_ppl
            log(f"[{name}] ppl {row['perplexity']:.3f} (x{row['perplexity_ratio']:.4f}), layer error mean "
                f"{row['rel_error_mean']:.4f} max {row['rel_error_max']:.4f} ({worst}), {row['quantize_s']:.1f} s")
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            log(f"[{name}] FAILED: {row['error']}")
        rows.append(row)
        with open(os.path.join(args.out, "quality.json"), "w") as handle:
            json.dump({"meta": meta, "rows": rows}, handle, indent=1)
    log("| setting | perplexity | x full | layer rel. error mean | max (layer) |")
    log("|---|---|---|---|---|")
    log(f"| full precision (float32) | {base_ppl:.3f} | 1.000 | 0 | 0 |")
    for r in rows:
        if "error" in r:
            log(f"| {r['setting']} | failed: {r['error'][:100]} |")
        else:
            log(f"| {r['setting']} | {r['perplexity']:.3f} | {r['perplexity_ratio']:.3f} | {r['rel_error_mean']:.4f} | "
                f"{r['rel_error_max']:.4f} ({r['worst_layer'].replace('model.layers.', 'L')}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
