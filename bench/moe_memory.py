"""Memory of MoE models before and after qadapt.load, on the GPU: Mixtral- and Qwen3-MoE-shaped models large enough
for the experts to dominate (about 1.2B parameters each, 4 layers), quantized with bnb 4-bit and HQQ 4-bit.

    python bench/moe_memory.py --output docs/bench-results/moe-memory-h200.json          # ~2 minutes on an H200
    python bench/moe_memory.py --tiny --output /tmp/moe.json                             # the panel's sizes, CPU

Per architecture x backend it records the matmul weights' storage (MiB) and bits per weight before (bfloat16) and
after (``qadapt.load_report``: every matmul weight, fused experts included, with what the backend stores for it), the
share of matmul weights quantized, what stayed in full precision and why, the logits' relative error against the
bfloat16 model, LoRA on the experts (adapter layers, two training steps, their loss) and the peak GPU memory of the
training steps; then the conformance kit's checks at that size: a re-quantizing merge (policy "fresh": one
candidate, to bound the time) measured against the adapter model, unmerge bit-exact, save and reload identical
(``--no-merge`` skips them). Random weights (built from the configs): the numbers are about storage and plumbing, not
quality.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

SHAPES = {
    # Mixtral-8x7B's expert layout (8 experts, top-2) at hidden 2048: experts are 92% of the matmul weights
    "mixtral": ("MixtralConfig", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                                      num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                                      num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=4096)),
    # Qwen3-30B-A3B's layout (hidden 2048, many small experts, top-8) with 64 experts instead of 128
    "qwen3-moe": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                         num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4,
                                         head_dim=128, num_experts=64, num_experts_per_tok=8, vocab_size=32000,
                                         max_position_embeddings=4096)),
}
BACKENDS = {"bnb-nf4": ("bnb", {"bits": 4, "quant_type": "nf4", "double_quant": True}),
            "hqq-4bit": ("hqq", {"bits": 4, "group_size": 64})}


def build(arch: str, tiny: bool, device: str):
    import torch
    import transformers

    if tiny:
        from qadapt.testing import panel

        return panel.build(arch).to(device)
    class_name, keywords = SHAPES[arch]
    config = getattr(transformers, class_name)(**keywords)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def matmul_storage(model) -> tuple[int, int]:
    """(bytes, weights) of the matmul weights of a full-precision model."""
    from qadapt.inventory import matmul_weights

    total_bytes = total = 0
    parameters = dict(model.named_parameters())
    for weight in matmul_weights(model):
        tensor = parameters.get(weight.name if weight.kind == "experts" else f"{weight.name}.weight")
        total += weight.elements
        total_bytes += weight.elements * (tensor.element_size() if tensor is not None else 2)
    return total_bytes, total


def relative(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def merge_cycle(peft_model, batch, folder):
    """Merge (re-quantize, measured), unmerge (exact?), save and reload (identical?): the kit's checks."""
    import torch

    import qadapt

    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=batch).logits
    started = time.perf_counter()
    report = qadapt.merge(peft_model, policy="fresh", calibration=batch)
    merge_seconds = time.perf_counter() - started
    with torch.no_grad():
        merged_error = relative(peft_model(input_ids=batch).logits, adapted)
    qadapt.unmerge(peft_model)
    with torch.no_grad():
        exact = torch.equal(peft_model(input_ids=batch).logits, adapted)
    started = time.perf_counter()
    qadapt.save(peft_model, folder, overwrite=True)
    reloaded = qadapt.load(folder)
    with torch.no_grad():
        reload_error = relative(reloaded(input_ids=batch).logits, adapted)
    return {"merge_output_error": round(merged_error, 4), "merge_report_error": round(report.output_error, 4),
            "merged_layers": len(report.layers), "merge_seconds": round(merge_seconds, 1), "unmerge_exact": exact,
            "reload_error": reload_error, "save_reload_seconds": round(time.perf_counter() - started, 1)}


def run_one(arch, label, tiny, device, steps, merge=True):
    import torch

    import qadapt

    backend, options = BACKENDS[label]
    model = build(arch, tiny, device)
    before_bytes, weights = matmul_storage(model)
    batch = torch.randint(0, model.config.vocab_size, (2, 256 if not tiny else 16), device=device)
    with torch.no_grad():
        reference = model(input_ids=batch).logits.float()
    started = time.perf_counter()
    quantized = qadapt.load(model, backend=backend, **options)
    load_seconds = time.perf_counter() - started
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    report = qadapt.load_report(quantized)
    with torch.no_grad():
        logits = quantized(input_ids=batch).logits.float()
    error = ((logits - reference).norm() / reference.norm()).item()
    del reference, logits
    peft_model = qadapt.attach(quantized, "lora", r=16)
    experts = sorted({n for n, p in peft_model.named_parameters() if p.requires_grad and ".experts" in n})
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    peft_model.train()
    losses, started = [], time.perf_counter()
    for _ in range(steps):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - started
    row = {
        "architecture": arch, "backend": label, "options": options, "matmul_weights": weights,
        "before": {"weights_mib": round(before_bytes / 2**20, 1), "bits_per_weight": round(8 * before_bytes / weights, 2)},
        "after": {"weights_mib": round(report.weight_bytes / 2**20, 1), "bits_per_weight": round(report.bits_per_weight, 2),
                  "quantized_share": round(report.quantized_share, 4)},
        "full_precision": sorted({f"{w.status}: {w.kind} ({w.reason})" for w in report.full_precision}),
        "conversions": {k: len(v.get("modules", v)) if isinstance(v, dict) else len(v) for k, v in report.conversions.items()},
        "logits_relative_error": round(error, 4), "load_seconds": round(load_seconds, 1),
        "lora_trainable_expert_tensors": len(experts), "losses": losses, "train_seconds": round(train_seconds, 2),
        "peak_train_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
    }
    if merge:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qadapt-moe-") as folder:
            row.update(merge_cycle(peft_model, batch, folder + "/saved"))
    del peft_model, quantized, optimizer
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--tiny", action="store_true", help="the panel's tiny models, on the CPU (a smoke run)")
    parser.add_argument("--architecture", action="append", choices=sorted(SHAPES))
    parser.add_argument("--backend", action="append", choices=sorted(BACKENDS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-merge", action="store_true", help="skip merge / unmerge / save-reload")
    args = parser.parse_args(argv)
    device = "cuda:0" if torch.cuda.is_available() and not args.tiny else "cpu"
    rows = []
    started = time.perf_counter()
    for arch in args.architecture or sorted(SHAPES):
        for label in args.backend or sorted(BACKENDS):
            try:
                rows.append(run_one(arch, label, args.tiny, device, args.steps, merge=not args.no_merge))
            except Exception as exc:  # noqa: BLE001 - recorded, the other cells still run
                rows.append({"architecture": arch, "backend": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(json.dumps(rows[-1]), flush=True)
    import importlib.metadata as metadata

    record = {"command": "python bench/moe_memory.py " + " ".join(argv or __import__("sys").argv[1:]),
              "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
              "seconds": round(time.perf_counter() - started, 1),
              "versions": {p: metadata.version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "hqq",
                                                            "defuser")},
              "results": rows}
    with open(args.output, "w") as handle:
        json.dump(record, handle, indent=2)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
