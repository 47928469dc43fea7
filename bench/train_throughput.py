"""LoRA training throughput per backend: qadapt against the same training wired by hand (transformers + PEFT).

For every backend setting, in one process: quantization time, true weight memory, bits per weight of the quantized
linears against the format's theory, and LoRA (r=16, alpha=32, all linear layers) training tokens/s and peak GPU
memory with AdamW. The same model is then built and trained by hand (BitsAndBytesConfig / TorchAoConfig /
HQQLinear + ``peft.get_peft_model``), giving the qadapt/raw ratio, and every setting's ratio to full-precision LoRA.

    # the GPU run documented in docs/benchmarks.md (TinyLlama-1.1B's shape, random weights, batch 4 x 512)
    python bench/train_throughput.py --size full --out out/throughput
    # the qadapt/raw ratio alone, with the least noise: both models resident, training steps alternating
    python bench/train_throughput.py --size full --interleave --steps 60 --out out/interleaved
    # the 4-bit tuning experiments (torch.compile, gradient checkpointing, compute dtype, HQQ backends)
    python bench/train_throughput.py --size full --tune --out out/tune
    # anyone, on a CPU, in a couple of minutes (report ratios only: CPU timings say little about GPUs)
    python bench/train_throughput.py --size tiny --out out/throughput-cpu
    # Llama-3-8B's shape, where memory and time allow (16 GB in bf16)
    python bench/train_throughput.py --size 8b --settings full,bnb-nf4-dq,torchao-int8wo,hqq-4bit-g64 --out out/8b
    # reprint a saved run's table (with the 95 % interval of qadapt/raw)
    python bench/train_throughput.py --summarize docs/bench-results/throughput-h100-interleaved-b16.json

Nothing is downloaded: the model is a randomly initialised Llama built from a config, saved once to a temporary
folder, and every backend quantizes that folder (HQQ an in-memory copy: it converts layers in place).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repo root: qadapt (and qadapt_plugins/) when qadapt is not installed

from _storage import quantized_bits_per_weight, storage_bytes, theory_bits_for  # noqa: E402

SIZES = {
    # TinyLlama-1.1B's shape (1,100,048,384 parameters)
    "full": dict(
        model=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
        batch=4, seq=512, warmup=3, steps=10, calib=8,
    ),
    # same architecture, small enough for two CPU cores (intermediate divisible by 128 for GPTQ/AWQ groups)
    "tiny": dict(
        model=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256),
        batch=4, seq=128, warmup=2, steps=8, calib=4,
    ),
    # Llama-3-8B's shape (8,030,261,248 parameters): the GPU run "where memory and time allow" (no GPTQ/AWQ: their
    # calibration passes would take most of an hour at this size)
    "8b": dict(
        model=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048),
        batch=4, seq=512, warmup=2, steps=8, calib=8,
    ),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)

#: the main table: name -> (qadapt backend or None, qadapt options, theory kind, has a hand-wired twin)
SETTINGS = {
    "full": (None, {}, "none", True),
    "bnb-nf4-dq": ("bnb", dict(bits=4, quant_type="nf4", double_quant=True), "nf4-dq", True),
    "bnb-int8": ("bnb", dict(bits=8), "int8-row", True),
    "torchao-int8wo": ("torchao", dict(scheme="int8_weight_only"), "torchao-int8", True),
    "hqq-4bit-g64": ("hqq", dict(bits=4, group_size=64), "hqq", True),
    "gptq-4bit-g128": ("gptq", dict(bits=4, group_size=128), "gptq", False),
    "awq-4bit-g128": ("awq", dict(bits=4, group_size=128), "awq", False),
    # no hand-wired twin: transformers has no loader for these formats that PEFT trains on (AQLM: qadapt's own
    # quantizer; EETQ: its torch route where EETQ's kernels cannot run; INC: neural-compressor's weight-only layers)
    "aqlm-2x8": ("aqlm", dict(num_codebooks=2, nbits_per_codebook=8, in_group_size=8), "aqlm", False),
    "eetq-int8": ("eetq", {}, "eetq", False),
    "inc-rtn-4bit-g64": ("inc", dict(algorithm="rtn", bits=4, group_size=64), "inc-rtn", False),
}
#: flags that change only the training loop (applied to both sides), so a flagged setting still has a hand-wired twin
TWIN_FLAGS = {"batch", "compile"}
#: --tune: the fastest 4-bit paths, one change at a time (qadapt side only; flags after ":", joined by "+")
#: compile = regional compilation (each decoder layer compiled on its own, as PyTorch recommends for repeated
#: blocks: one layer's compile time, not the whole model's); hqq=NAME picks HQQ's training backend (HQQBackend.NAME):
#: pytorch (default: de-quantize in the forward and again in the backward), pytorch_compile (the same, de-quantization
#: compiled), pytorch_forward (plain autograd through the de-quantization: the de-quantized weight is kept for the
#: backward, i.e. de-quantization cached at bf16 memory cost)
TUNE = [
    "full", "full:ckpt", "full:batch=16",
    "bnb-nf4-dq:compute=float32", "bnb-nf4-dq", "bnb-nf4-dq:nodq", "bnb-nf4-dq:ckpt", "bnb-nf4-dq:batch=16",
    "hqq-4bit-g64", "hqq-4bit-g64:hqq=pytorch_compile", "hqq-4bit-g64:hqq=pytorch_forward",
    "torchao-int8wo",
    # compiled (slow to start: kept together at the end)
    "full:compile", "bnb-nf4-dq:compile", "bnb-nf4-dq:nodq+compile", "hqq-4bit-g64:compile",
    "hqq-4bit-g64:hqq=pytorch_forward+compile", "torchao-int8wo:compile",
]


# ---------------------------------------------------------------------------------------------------- helpers
def log(*args):
    print(*args, flush=True)


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def free(device):
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def ensure_backends(names):
    """Register repo plugins by hand where qadapt is not pip-installed (the GPU machine runs from a checkout)."""
    import importlib

    from qadapt.plugins import registrations, registry

    have = registrations()
    for name in names:
        if name and name not in have:
            try:
                registry().add(importlib.import_module(f"qadapt_plugins.{name}"), name)
            except Exception as exc:  # recorded per setting when it is used
                log(f"[setup] plugin {name} not importable: {type(exc).__name__}: {exc}")


def build_base(size, dtype, folder, device):
    """A randomly initialised Llama of ``size``'s shape, saved with safetensors in ``dtype``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size]["model"], dtype=dtype_name(dtype))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    count = sum(p.numel() for p in model.parameters())
    del model
    free(device)
    return count


def load_full(folder, dtype, device):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)


def set_hqq_backend(name):
    from hqq.core.quantize import HQQBackend, HQQLinear

    HQQLinear.set_backend(getattr(HQQBackend, name.upper()))


def compile_layers(model):
    """Regional compilation: each decoder layer compiled on its own (identical layers share the compiled code)."""
    import torch

    torch._dynamo.reset()  # each setting compiles afresh (and within the recompile limit)
    for layer in [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]:
        layer.compile()


def flags_of(spec):
    name, _, rest = spec.partition(":")
    flags = {}
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        flags[key] = value or True
    return name, flags


# ---------------------------------------------------------------------------------------------------- building
def build_qadapt(name, flags, ctx):
    """(model with LoRA attached, quantization seconds) through qadapt."""
    import qadapt

    backend, options, _, _ = SETTINGS[name]
    options = dict(options)
    dtype, device, folder = ctx["dtype"], ctx["device"], ctx["folder"]
    if backend in ("bnb", "hqq") and (options.get("bits") == 4 or backend == "hqq"):
        options["compute_dtype"] = flags.get("compute", dtype_name(dtype))
    if flags.get("nodq"):
        options["double_quant"] = False
    if flags.get("kmeans"):  # AQLM: a short k-means and no refinement (speed and memory do not depend on code values;
        # at the 1.1B shape the default fit takes ~50 s per 2048 x 5632 layer on two CPU cores, this one ~6 s)
        options.update(kmeans_iterations=int(flags["kmeans"]), refine_passes=0)
    if backend in ("gptq", "awq"):
        options["dtype"] = dtype_name(dtype)
        options["kernel"] = "torch"  # the trainable kernel (gptqmodel's Marlin layers refuse training mode)
    if backend is None:
        sync(device)
        start = time.perf_counter()
        model = load_full(folder, dtype, device)
    elif backend == "hqq":
        source = load_full(folder, dtype, "cpu")
        sync(device)
        start = time.perf_counter()
        model = qadapt.load(source, backend="hqq", **options)
    else:
        sync(device)
        start = time.perf_counter()
        model = qadapt.load(folder, backend=backend, calibration=ctx["calibration"] if backend in ("gptq", "awq") else None,
                            **options)
    sync(device)
    seconds = time.perf_counter() - start
    if backend == "hqq":  # a class-wide setting: set for every HQQ setting, so one experiment's choice does not leak
        set_hqq_backend(flags.get("hqq", "pytorch"))
    if flags.get("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stats = weight_stats(model, backend, name, ctx, kind="nf4" if flags.get("nodq") else None)
    peft_model = qadapt.attach(model, "lora", **LORA)
    return peft_model, seconds, stats


def build_raw(name, flags, ctx):
    """The same model and adapter wired by hand: transformers' quantization configs (or HQQLinear) + PEFT."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    dtype, device, folder = ctx["dtype"], ctx["device"], ctx["folder"]
    config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **LORA)
    sync(device)
    start = time.perf_counter()
    if name == "full":
        model = load_full(folder, dtype, device)
    elif name in ("bnb-nf4-dq", "bnb-int8"):
        from transformers import BitsAndBytesConfig

        if name == "bnb-int8":
            quant = BitsAndBytesConfig(load_in_8bit=True)
        else:
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device, quantization_config=quant)
    elif name == "torchao-int8wo":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device,
                                                     quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    elif name == "hqq-4bit-g64":
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        sync(device)
        model = load_full(folder, dtype, "cpu")
        start = time.perf_counter()  # like the qadapt side: the conversion of an in-memory model
        head = model.get_output_embeddings()
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
        for n in names:
            parent, _, child = n.rpartition(".")
            layer = HQQLinear(model.get_submodule(n), quant_config=BaseQuantizeConfig(nbits=4, group_size=64),
                              compute_dtype=dtype, device=device, del_orig=True)
            setattr(model.get_submodule(parent), child, layer)
        model = model.to(device)
        set_hqq_backend("pytorch")
        config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules=names, **LORA)  # all-linear misses HQQLinear
    else:
        raise ValueError(f"no hand-wired twin for {name}")
    sync(device)
    seconds = time.perf_counter() - start
    stats = weight_stats(model, SETTINGS[name][0], name, ctx)
    return peft.get_peft_model(model, config), seconds, stats


def weight_stats(model, backend, name, ctx, kind=None):
    import qadapt

    total = storage_bytes(model)
    if backend is None:
        import torch

        head = model.get_output_embeddings()
        is_q = lambda m: isinstance(m, torch.nn.Linear) and m is not head  # noqa: E731
    else:
        is_q = qadapt.get_backend(backend).is_quantized_layer
    bits, stored, weights = quantized_bits_per_weight(model, is_q)
    kind = kind or SETTINGS[name][2]
    extra = {}
    if kind in ("hqq", "gptq", "awq", "inc-rtn"):
        extra["group_size"] = SETTINGS[name][1]["group_size"]
    if kind == "inc-rtn":
        extra["bits"] = SETTINGS[name][1]["bits"]
    if kind == "aqlm":
        options = SETTINGS[name][1]
        extra.update(codebooks=options["num_codebooks"], code_bits=options["nbits_per_codebook"],
                     in_group=options["in_group_size"])
    if kind in ("hqq", "torchao-int8", "none", "aqlm"):
        extra["scale_bits"] = 8 * _element_size(ctx["dtype"])
    theory = theory_bits_for(model, is_q, kind, **extra)
    return {"weight_bytes": total, "quantized_layers_bytes": stored, "quantized_weights": weights,
            "bits_per_weight": bits, "theory_bits_per_weight": theory,
            "get_memory_footprint": _footprint(model)}


def _element_size(dtype):
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _footprint(model):
    try:
        return int(model.get_memory_footprint())
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------- training
class _Trainer:
    """One model's LoRA training loop (AdamW), a step at a time, each step timed between device syncs."""

    def __init__(self, model, ctx, flags):
        import torch

        self.model, self.device = model, ctx["device"]
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        if flags.get("compile"):
            compile_layers(model)
        model.train()
        self.batches = ctx["batches"]
        if flags.get("batch"):  # a larger batch: does the gap shrink when per-layer overheads are amortized?
            n = int(flags["batch"])
            self.batches = [b.repeat((n + b.shape[0] - 1) // b.shape[0], 1)[:n] for b in self.batches]
        self.times, self.losses = [], []

    def step(self, index):
        batch = self.batches[index % len(self.batches)]
        sync(self.device)
        start = time.perf_counter()
        loss = self.model(input_ids=batch, labels=batch, use_cache=False).loss  # training needs no KV cache
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        self.times.append(time.perf_counter() - start)
        self.losses.append(loss.item())

    def result(self, warmup):
        timed = self.times[warmup:]
        step_s = statistics.median(timed)
        tokens = self.batches[0].numel()
        result = {"step_s_median": step_s, "step_s_all": timed, "warmup_s": self.times[:warmup],
                  "tokens_per_s": tokens / step_s, "tokens_per_step": tokens, "trainable_params": self.trainable,
                  "loss_first": self.losses[0], "loss_last": self.losses[-1]}
        if not all(math.isfinite(x) for x in self.losses):
            result["warning"] = "non-finite loss"
        return result


def train(model, ctx, flags):
    import torch

    trainer = _Trainer(model, ctx, flags)
    free(ctx["device"])
    for step in range(ctx["warmup"] + ctx["steps"]):
        trainer.step(step)
    result = trainer.result(ctx["warmup"])
    if ctx["device"] == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_interleaved(spec, ctx):
    """qadapt's model and its hand-wired twin side by side in memory, their training steps alternating (qadapt, raw,
    raw, qadapt, ...): drift of clocks and host load hits both alike, and one load per side replaces --repeat's
    reloads. Peak memory is not per side here (both models are resident): take it from a run without --interleave."""
    name, flags = flags_of(spec)
    rows = {side: {"setting": spec, "side": side, "interleaved": True} for side in ("qadapt", "raw")}
    try:
        models = {}
        for side, build in (("qadapt", build_qadapt), ("raw", build_raw)):
            models[side], rows[side]["quantize_s"], stats = build(name, flags, ctx)
            rows[side].update(stats)
        trainers = {side: _Trainer(model, ctx, flags) for side, model in models.items()}
        for step in range(ctx["warmup"] + ctx["steps"]):
            order = ("qadapt", "raw") if step % 2 == 0 else ("raw", "qadapt")
            for side in order:
                trainers[side].step(step)
        for side, trainer in trainers.items():
            rows[side].update(trainer.result(ctx["warmup"]))
            log(f"[{spec} / {side}, interleaved] {rows[side]['tokens_per_s']:.0f} tok/s, "
                f"step {rows[side]['step_s_median'] * 1e3:.1f} ms, loss {rows[side]['loss_last']:.3f}")
    except Exception as exc:
        for row in rows.values():
            row["error"] = f"{type(exc).__name__}: {exc}"[:600]
            row["traceback"] = traceback.format_exc()[-3000:]
        log(f"[{spec} / interleaved] FAILED: {rows['qadapt']['error']}")
    finally:
        models = trainers = None  # noqa: F841
        free(ctx["device"])
    return list(rows.values())


def run_one(spec, side, ctx):
    """Build (qadapt or raw) and train one setting; returns a result row (an 'error' row if anything failed)."""
    name, flags = flags_of(spec)
    row = {"setting": spec, "side": side}
    try:
        if side == "qadapt":
            model, seconds, stats = build_qadapt(name, flags, ctx)
            row.update(stats)
        else:
            model, seconds, stats = build_raw(name, flags, ctx)
            row.update(stats)
        row["quantize_s"] = seconds
        if ctx["device"] == "cuda":
            import torch

            row["allocated_before_train_gib"] = torch.cuda.memory_allocated() / 2**30
        row.update(train(model, ctx, flags))
        log(f"[{spec} / {side}] {row['tokens_per_s']:.0f} tok/s, step {row['step_s_median'] * 1e3:.1f} ms"
            + (f", peak {row['peak_gib']:.2f} GiB" if "peak_gib" in row else "")
            + f", load {seconds:.1f} s, weights {row['weight_bytes'] / 2**20:.1f} MiB, "
              f"{row['bits_per_weight']:.3f} bits/w (theory {row['theory_bits_per_weight']:.3f}), loss {row['loss_last']:.3f}")
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:600]
        row["traceback"] = traceback.format_exc()[-3000:]
        log(f"[{spec} / {side}] FAILED: {row['error']}")
    finally:
        model = None  # noqa: F841
        free(ctx["device"])
    return row


def warm_up_libraries(ctx, names):
    """Import each backend and run its kernels once on a toy model, so the first timed setting pays no start-up."""
    import torch

    import qadapt
    from qadapt.testing import toy

    for backend in sorted({SETTINGS[n][0] for n in names if SETTINGS[n][0] in ("bnb", "torchao", "hqq")}):
        try:
            options = {"bits": 4} if backend in ("bnb", "hqq") else {}
            model = qadapt.load(toy.build_model(dtype=ctx["dtype"]).to(ctx["device"]), backend=backend, **options)
            model = qadapt.attach(model, "lora", r=4)
            ids = torch.randint(0, 512, (1, 16), device=ctx["device"])
            model(input_ids=ids, labels=ids).loss.backward()
        except Exception as exc:
            log(f"[warm-up] {backend}: {type(exc).__name__}: {exc}")
        free(ctx["device"])


def merge_repeats(rows):
    """One row per side: the first run's row, with the median step time over every timed step of every repeat."""
    merged = {}
    for r in rows:
        if r["side"] not in merged:
            merged[r["side"]] = dict(r, repeats=[])
        first = merged[r["side"]]
        if "error" in r or "error" in first:
            first.setdefault("error", r.get("error"))
            continue
        first["repeats"].append(r["step_s_median"])
        first.setdefault("_all", []).extend(r["step_s_all"])
    for first in merged.values():
        if "error" not in first and first.get("_all"):
            first["step_s_all"] = first.pop("_all")  # every timed step of every repeat
            first["step_s_median"] = statistics.median(first["step_s_all"])
            first["tokens_per_s"] = first["tokens_per_step"] / first["step_s_median"]
    return list(merged.values())


# ---------------------------------------------------------------------------------------------------- summary
def ratio_interval(qadapt_times, raw_times, draws=2000, seed=0):
    """95 % bootstrap interval of median(raw step time) / median(qadapt step time), i.e. of qadapt/raw in tokens/s
    (steps resampled with replacement on each side; a fixed seed, so the same results.json gives the same interval)."""
    import random

    rng = random.Random(seed)
    ratios = sorted(
        statistics.median(rng.choices(raw_times, k=len(raw_times)))
        / statistics.median(rng.choices(qadapt_times, k=len(qadapt_times)))
        for _ in range(draws)
    )
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def summarize(rows, device):
    by = {(r["setting"], r["side"]): r for r in rows if "error" not in r}
    base = by.get(("full", "qadapt"))
    table = []
    for r in rows:
        if r["side"] != "qadapt":
            continue
        line = {"setting": r["setting"]}
        if "error" in r:
            line["error"] = r["error"]
            table.append(line)
            continue
        raw = by.get((r["setting"], "raw"))
        line.update(
            tokens_per_s=r["tokens_per_s"], peak_gib=r.get("peak_gib"), quantize_s=r["quantize_s"],
            weight_mib=r["weight_bytes"] / 2**20, bits=r["bits_per_weight"], theory_bits=r["theory_bits_per_weight"],
            raw_tokens_per_s=raw["tokens_per_s"] if raw else None,
            raw_peak_gib=raw.get("peak_gib") if raw else None,
            qadapt_over_raw=(r["tokens_per_s"] / raw["tokens_per_s"]) if raw else None,
            over_full=(r["tokens_per_s"] / base["tokens_per_s"]) if base else None,
            same_trainable=(raw["trainable_params"] == r["trainable_params"]) if raw else None,
            step_spread=_spread(r["step_s_all"]),
        )
        if raw and len(r["step_s_all"]) >= 10 and len(raw["step_s_all"]) >= 10:
            line["qadapt_over_raw_ci95"] = ratio_interval(r["step_s_all"], raw["step_s_all"])
        table.append(line)
    return table


def _spread(times):
    """Interquartile range of the timed steps over their median: how noisy one side's steps were."""
    if len(times) < 4:
        return None
    q1, _, q3 = statistics.quantiles(times)
    return (q3 - q1) / statistics.median(times)


def markdown(table, device):
    cpu = device != "cuda"
    head = ("| setting | tok/s | peak GiB | raw tok/s | qadapt/raw | 95 % interval | step IQR | vs full | weights MiB | "
            "bits/w | theory | quantize s |"
            if not cpu else "| setting | qadapt/raw | 95 % interval | vs full | weights MiB | bits/w | theory |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for t in table:
        if "error" in t:
            lines.append(f"| {t['setting']} | failed: {t['error'][:120]} |")
            continue
        ci = t.get("qadapt_over_raw_ci95")
        ci = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "-"
        if cpu:
            lines.append(f"| {t['setting']} | {fmt(t['qadapt_over_raw'], '.3f')} | {ci} | {fmt(t['over_full'], '.2f')} | "
                         f"{t['weight_mib']:.2f} | {t['bits']:.3f} | {t['theory_bits']:.3f} |")
        else:
            spread = t.get("step_spread")
            lines.append(f"| {t['setting']} | {t['tokens_per_s']:,.0f} | {fmt(t['peak_gib'], '.2f')} | "
                         f"{fmt(t['raw_tokens_per_s'], ',.0f')} | {fmt(t['qadapt_over_raw'], '.3f')} | {ci} | "
                         f"{'-' if spread is None else format(spread, '.0%')} | "
                         f"{fmt(t['over_full'], '.2f')} | {t['weight_mib']:,.0f} | {t['bits']:.3f} | "
                         f"{t['theory_bits']:.3f} | {t['quantize_s']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--settings", help="comma-separated settings (default: all; see SETTINGS / TUNE)")
    parser.add_argument("--tune", action="store_true", help="run the 4-bit tuning experiments instead of the table")
    parser.add_argument("--no-raw", action="store_true", help="skip the hand-wired twins")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeat", type=int, help="qadapt/raw pairs per setting, alternated (default: 1 on GPU, 3 on CPU)")
    parser.add_argument("--interleave", action="store_true",
                        help="qadapt and hand-wired models resident together, training steps alternating (the "
                             "qadapt/raw ratio with the least drift; no per-side peak memory)")
    parser.add_argument("--out", default="out/throughput", help="folder for results.json and table.md")
    parser.add_argument("--summarize", metavar="RESULTS_JSON",
                        help="print the table of an earlier run's results.json (with this version's columns) and exit")
    args = parser.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as handle:
            data = json.load(handle)
        device = "cuda" if "CPU" not in data["meta"]["device"] else "cpu"
        print(markdown(summarize(data["rows"], device), device))
        return 0

    warnings.filterwarnings("ignore")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(4, os.cpu_count() or 1)))
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = SIZES[args.size]
    specs = args.settings.split(",") if args.settings else (TUNE if args.tune else list(SETTINGS))
    if device != "cuda":
        specs = [s for s in specs if not s.startswith("awq")]  # AWQ quantization needs CUDA (recorded below)
    names = sorted({flags_of(s)[0] for s in specs})
    ensure_backends({SETTINGS[n][0] for n in names})
    os.makedirs(args.out, exist_ok=True)

    import peft

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__}
    for lib in ("bitsandbytes", "torchao", "hqq", "gptqmodel"):
        try:
            import importlib.metadata as md

            versions[lib] = md.version(lib)
        except Exception:
            versions[lib] = None
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "dtype": dtype_name(dtype), "size": args.size, "shape": size["model"], "batch": size["batch"], "seq": size["seq"],
        "lora": LORA, "optimizer": "AdamW lr 1e-4", "versions": versions, "command": " ".join([sys.executable] + sys.argv),
        "interleave": args.interleave, "training_forward": "use_cache=False",
    }
    log(json.dumps(meta))
    with tempfile.TemporaryDirectory(prefix="qadapt-bench-") as folder:
        started = time.perf_counter()
        meta["params"] = build_base(args.size, dtype, folder, device)
        meta["build_s"] = time.perf_counter() - started
        generator = torch.Generator().manual_seed(0)
        vocab = size["model"]["vocab_size"]
        batches = [torch.randint(0, vocab, (size["batch"], size["seq"]), generator=generator).to(device) for _ in range(4)]
        calibration = [torch.randint(0, vocab, (1, size["seq"]), generator=generator) for _ in range(size["calib"])]
        ctx = dict(device=device, dtype=dtype, folder=folder, batches=batches, calibration=calibration,
                   steps=args.steps or size["steps"], warmup=args.warmup or size["warmup"])
        warm_up_libraries(ctx, names)
        rows = []
        if device != "cuda" and not args.settings:
            rows.append({"setting": "awq-4bit-g128", "side": "qadapt", "error": "skipped: AWQ quantization needs CUDA"})
        repeat = args.repeat or (1 if device == "cuda" else 3)
        meta["repeat"] = repeat
        for spec in specs:
            name, flags = flags_of(spec)
            # a twin only for settings whose flags change training alone (batch, compile), which apply to both sides
            twin = SETTINGS[name][3] and set(flags) <= TWIN_FLAGS and not args.no_raw and not args.tune
            if args.interleave and twin:
                rows.extend(run_interleaved(spec, ctx))
                _write(args.out, meta, rows, device)
                continue
            pair = []
            for _ in range(repeat):  # alternate the two sides, so drift (clocks, allocator) hits both alike
                pair.append(run_one(spec, "qadapt", ctx))
                if twin:
                    pair.append(run_one(spec, "raw", ctx))
            rows.extend(merge_repeats(pair))
            _write(args.out, meta, rows, device)
    table = _write(args.out, meta, rows, device)
    log(markdown(table, device))
    return 0


def _write(out, meta, rows, device):
    table = summarize(rows, device)
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump({"meta": meta, "rows": rows, "table": table}, handle, indent=1, default=str)
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(markdown(table, device) + "\n")
    return table


if __name__ == "__main__":
    sys.exit(main())
