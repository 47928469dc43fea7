"""LoRA training against peers: qadapt's plain and prepared paths, hand-wired transformers + PEFT, and unsloth.

Each row runs in its own process (unsloth patches transformers when imported, and each peak is its own), in order
of importance, and the results file is rewritten as each row finishes, so a time-out keeps every finished row.
Same model (a randomly initialised Llama, built once and saved with safetensors and a tokenizer), same batches
(4 x 512 random tokens), LoRA r=16 alpha 32 dropout 0 on every linear layer but the head, AdamW lr 1e-4, the same
warm-up and timed steps. Per row: tokens/s (median step), peak allocated memory over the steps
(``torch.cuda.max_memory_allocated``: weights + adapter + AdamW + activations), memory allocated right after loading
(and attaching, and preparing), the losses, and for qadapt's prepared rows the report of what ran where.

    # the two GPU calls docs/benchmarks.md records (each fits one 10-minute call on an H200)
    python3 bench/peers.py --size 8b --out $OUT/peers-h200-8b.json
    python3 bench/peers.py --size full --out $OUT/peers-h200-1.1b.json
    # any CPU, a minute (unsloth rows are skipped: they need CUDA)
    python3 bench/peers.py --tiny --out out/peers-tiny.json
    # the markdown table of one or more results files, and the plot
    python3 bench/peers.py --summarize docs/bench-results/peers-h200-1.1b.json docs/bench-results/peers-h200-8b.json
    python3 bench/plot_throughput.py docs/bench-results/peers-h200-8b.json docs/peers_8b.png

Rows (``--rows a,b,c``; default: ``ORDER``): see ``ROWS``. unsloth runs as its documentation says:
``FastLanguageModel.from_pretrained(folder, load_in_4bit=True, local_files_only=True)`` (nf4 + double quant, bf16)
and ``FastLanguageModel.get_peft_model(..., use_gradient_checkpointing=False or "unsloth")``, offline
(``HF_HUB_OFFLINE=1``, ``UNSLOTH_DISABLE_STATISTICS=1``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _children import (  # noqa: E402  (stdlib only: unsloth's row imports unsloth first)
    add_internal_arguments, dispatch, repo_on_path, run_child, run_rows, write_results)
NF4 = dict(bits=4, quant_type="nf4", double_quant=True)
HQQ4 = dict(bits=4, group_size=64)
INT8 = dict(scheme="int8_weight_only")
NF4_TORCHAO = dict(scheme="nf4")  # torchao's NF4Tensor (the scheme that trains sharded)
# the other backends that train on a GPU, each on its trainable kernel; GPTQ and AWQ calibrate on random tokens, AQLM
# fits its codebooks with a short k-means (speed and memory do not depend on the code values)
GPTQ4 = dict(bits=4, group_size=128, kernel="torch")
AWQ4 = dict(bits=4, group_size=128, kernel="torch")
EETQ = dict(kernel="torch")
BNB8 = dict(bits=8)
AQLM2X8 = dict(num_codebooks=2, nbits_per_codebook=8, in_group_size=8, kmeans_iterations=2, refine_passes=0)
#: backends whose quantization takes a minute or more: the first row of a call saves the quantized model in the
#: call's folder (qadapt.save) and the next row of that backend loads it from there
SLOW_TO_QUANTIZE = {"gptq", "awq", "aqlm"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: name -> how the row is built. kind: "qadapt" (qadapt.load + attach [+ prepare]), "raw" (transformers + PEFT by
#: hand), "unsloth"
ROWS = {
    # "fast" on CUDA: compile="auto" is CUDA graphs over each compiled decoder layer
    "qadapt-nf4-fast": dict(kind="qadapt", backend="bnb", options=NF4, prepare="fast"),
    "unsloth-nf4": dict(kind="unsloth", checkpointing=False),
    "qadapt-nf4-fast-eager": dict(kind="qadapt", backend="bnb", options=NF4, prepare="fast", parts={"compile": "off"}),
    "qadapt-nf4-lean": dict(kind="qadapt", backend="bnb", options=NF4, prepare="lean"),
    "unsloth-nf4-offload": dict(kind="unsloth", checkpointing="unsloth"),
    # the normed inputs of q/k/v and the MLP recomputed instead of kept (qadapt's torch RMSNorm, not Liger's): -1 GiB
    "qadapt-nf4-fast-normrecompute": dict(kind="qadapt", backend="bnb", options=NF4, prepare="fast",
                                          parts={"norm": "recompute"}),
    "bf16-peft": dict(kind="raw", quant=None),
    "qadapt-nf4": dict(kind="qadapt", backend="bnb", options=NF4, prepare=None),
    "qadapt-hqq-fast": dict(kind="qadapt", backend="hqq", options=HQQ4, prepare="fast"),
    "qadapt-torchao-fast": dict(kind="qadapt", backend="torchao", options=INT8, prepare="fast"),
    "nf4-raw": dict(kind="raw", quant="nf4"),
    "qadapt-hqq": dict(kind="qadapt", backend="hqq", options=HQQ4, prepare=None),
    "qadapt-torchao": dict(kind="qadapt", backend="torchao", options=INT8, prepare=None),
    "qadapt-bf16-fast": dict(kind="qadapt", backend=None, options={}, prepare="fast"),
    "qadapt-torchao-nf4": dict(kind="qadapt", backend="torchao", options=NF4_TORCHAO, prepare=None),
    "qadapt-torchao-nf4-fast": dict(kind="qadapt", backend="torchao", options=NF4_TORCHAO, prepare="fast"),
    # "lean" on torchao: its tensor-subclass weights are not replayed as CUDA graphs, so the checkpointed layers are
    # compiled regionally (not in the default order)
    "qadapt-torchao-lean": dict(kind="qadapt", backend="torchao", options=INT8, prepare="lean"),
    "qadapt-torchao-nf4-lean": dict(kind="qadapt", backend="torchao", options=NF4_TORCHAO, prepare="lean"),
    # not in the default order (device time): PEFT's kbit preparation (checkpointing), and compile on top of fast
    "qadapt-nf4-default": dict(kind="qadapt", backend="bnb", options=NF4, prepare="default"),
    "qadapt-nf4-fast-compile": dict(kind="qadapt", backend="bnb", options=NF4, prepare="fast",
                                    parts={"compile": "regional"}),
    "qadapt-nf4-lean-compile": dict(kind="qadapt", backend="bnb", options=NF4, prepare="lean",
                                    parts={"compile": "regional"}),
    # "lean" on CUDA replays each checkpointed layer's two passes as CUDA graphs; this one keeps the layer inputs on
    # the GPU instead of the host (one hidden state a layer: 16 MiB at 8B, 4 x 512 tokens)
    "qadapt-nf4-lean-recompute": dict(kind="qadapt", backend="bnb", options=NF4, prepare="lean",
                                      parts={"checkpoint": "recompute"}),
    # "fast" with gate and up recomputed in the backward in every MLP, or in N of them (the memory/speed dial that
    # keeps CUDA graphs)
    "qadapt-nf4-fast-mlprecompute": dict(kind="qadapt", backend="bnb", options=NF4, prepare="fast",
                                         parts={"mlp": "recompute"}),
    **{f"qadapt-nf4-fast-mlp{n}": dict(kind="qadapt", backend="bnb", options=NF4, prepare="fast",
                                       parts={"mlp": "recompute", "mlp_layers": n}) for n in (8, 9, 10, 12, 16)},
    # the switch's gain on the other GPU backends: each pair plain, then prepare("fast") (the second loads the first's
    # quantized model)
    **{f"qadapt-{name}{suffix}": dict(kind="qadapt", backend=backend, options=options,
                                      prepare="fast" if suffix else None)
       for name, backend, options in (("gptq", "gptq", GPTQ4), ("awq", "awq", AWQ4), ("eetq", "eetq", EETQ),
                                      ("int8", "bnb", BNB8), ("aqlm", "aqlm", AQLM2X8))
       for suffix in ("", "-fast")},
}
ORDER = ["qadapt-nf4-fast", "unsloth-nf4", "qadapt-nf4-fast-eager", "qadapt-nf4-lean", "unsloth-nf4-offload",
         "qadapt-nf4-fast-normrecompute", "bf16-peft", "qadapt-nf4", "qadapt-hqq-fast", "qadapt-torchao-fast", "nf4-raw",
         "qadapt-hqq", "qadapt-torchao", "qadapt-bf16-fast", "qadapt-torchao-nf4-fast", "qadapt-torchao-nf4"]
#: the plain path each prepared row is compared with (the switch's gain)
PLAIN = {name: "qadapt-nf4" for name in ("qadapt-nf4-fast", "qadapt-nf4-fast-eager", "qadapt-nf4-lean",
                                         "qadapt-nf4-lean-compile", "qadapt-nf4-lean-recompute",
                                         "qadapt-nf4-fast-normrecompute",
                                         "qadapt-nf4-default", "qadapt-nf4-fast-compile", "qadapt-nf4-fast-mlprecompute",
                                         *(f"qadapt-nf4-fast-mlp{n}" for n in (8, 9, 10, 12, 16)))}
PLAIN.update({"qadapt-hqq-fast": "qadapt-hqq", "qadapt-torchao-fast": "qadapt-torchao", "qadapt-bf16-fast": "bf16-peft",
              "qadapt-torchao-nf4-fast": "qadapt-torchao-nf4", "qadapt-torchao-lean": "qadapt-torchao",
              "qadapt-torchao-nf4-lean": "qadapt-torchao-nf4"})
PLAIN.update({f"qadapt-{name}-fast": f"qadapt-{name}" for name in ("gptq", "awq", "eetq", "int8", "aqlm")})
STEPS = {"8b": (2, 6), "full": (3, 10), "tiny": (1, 3)}  # (warm-up, timed)


def log(*args):
    print(*args, flush=True)


# ---------------------------------------------------------------------------------------------------- parent
def run_parent(args) -> int:
    size = "tiny" if args.tiny else args.size
    names = args.rows.split(",") if args.rows else list(ORDER)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "size": size,
            "command": " ".join([sys.executable] + sys.argv), "budget_s": args.budget,
            "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "targets": "all linear but lm_head"},
            "optimizer": "AdamW lr 1e-4", "steps": dict(zip(("warmup", "timed"), STEPS[size]))}
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qadapt-peers-") as folder:
        build = run_child(__file__, ["--build", "--size", size, "--folder", folder], args.budget, folder)
        if "error" in build:
            write_results(args.out, meta, [{"setting": "build", **build}])
            log(f"[build] FAILED: {build['error']}\n{build.get('output', '')}")
            return 1
        meta.update(build)
        log(f"[build] {meta['params']:,} parameters in {meta['build_s']:.0f} s")
        left = args.budget - (time.monotonic() - started)
        common = ["--size", size, "--folder", folder] + (["--trace-memory"] if args.trace_memory else []) \
            + (["--profile-kernels"] if args.profile_kernels else [])
        run_rows(__file__, names, common, left, folder, args.out, meta, rows, _report)
    log(markdown([(meta, rows)]))
    return 0


def _gib(value):
    return "-" if value is None else f"{value:.2f}"


def _report(row):
    if "error" in row:
        log(f"[{row['setting']}] FAILED: {row['error']}")
        return
    log(f"[{row['setting']}] {row['tokens_per_s']:,.0f} tok/s, peak {_gib(row['peak_gib'])} GiB (reserved "
        f"{_gib(row.get('peak_reserved_gib'))}), after load "
        f"{_gib(row['after_load_gib'])} GiB, loss {row['losses'][0]:.3f} -> {row['losses'][-1]:.3f}")
    kernels = row.get("kernels")
    if kernels:
        import _kernel_profile

        for line in _kernel_profile.describe(kernels, "step", top=12):
            log(line)
        log("  host (self CPU ms under the profiler): " + ", ".join(f"{op} {ms:.1f}" for op, ms in kernels["host_top"][:10]))
    trace = row.get("memory_at_peak")
    if trace:
        log(f"  alive at the peak of one step ({trace['peak_gib']:.2f} GiB; {trace['before_gib']:.2f} GiB from before it):")
        for size, place in trace["places"]:
            log(f"    {size}  {place}")


# ---------------------------------------------------------------------------------------------------- children
def sizes():
    repo_on_path()
    from train_throughput import SIZES

    return SIZES


def run_row(args) -> dict:
    spec = ROWS[args.row]
    if spec["kind"] == "unsloth":
        for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("UNSLOTH_DISABLE_STATISTICS", "1")):
            os.environ[key] = value
        model, extra = build_unsloth(args, spec)  # imports unsloth before transformers, as unsloth requires
    else:
        model, extra = (build_qadapt if spec["kind"] == "qadapt" else build_raw)(args, spec)
    import torch

    row = dict(extra)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        row["after_load_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    row.update(train(model, args.size, cuda, trace_memory=args.trace_memory and cuda,
                     profile_kernels=args.profile_kernels and cuda))
    if cuda:
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        # what the allocator holds from the GPU, its cache and CUDA graph pools included (a recorded graph's working
        # memory is reserved, not allocated, between replays)
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    else:
        row["after_load_gib"] = row["peak_gib"] = None  # a CPU has no allocator statistics: speed ratios only
    return row


def _dtype():
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def build_qadapt(args, spec):
    import torch

    sizes()
    from train_throughput import ensure_backends, load_full

    import qadapt

    ensure_backends({spec["backend"]})
    dtype, device = _dtype(), "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    options = dict(spec["options"])
    if spec["backend"] in ("bnb", "hqq"):
        options["compute_dtype"] = str(dtype).replace("torch.", "")
    if spec["backend"] in ("gptq", "awq"):
        options["dtype"] = str(dtype).replace("torch.", "")
    saved = os.path.join(args.folder, f"quantized-{spec['backend']}")
    if spec["backend"] is None:
        model = load_full(args.folder, dtype, device)
    elif spec["backend"] == "hqq":  # HQQ converts an in-memory model (on the host) layer by layer onto the GPU
        model = qadapt.load(load_full(args.folder, dtype, "cpu"), backend="hqq", **options)
    elif spec["backend"] in SLOW_TO_QUANTIZE and os.path.isdir(saved):
        model = qadapt.load(saved)  # a qadapt checkpoint: it records its backend and options (the kernel too)
    else:
        calibration = None
        if spec["backend"] in ("gptq", "awq"):
            size = sizes()[args.size]
            generator = torch.Generator().manual_seed(1)
            calibration = [torch.randint(0, size["model"]["vocab_size"], (1, size["seq"]), generator=generator)
                           for _ in range(size["calib"])]
        model = qadapt.load(args.folder, backend=spec["backend"], calibration=calibration, **options)
        if spec["backend"] in SLOW_TO_QUANTIZE:
            qadapt.save(model, saved + ".tmp")
            os.replace(saved + ".tmp", saved)
    model = qadapt.attach(model, "lora", r=16, lora_alpha=32, lora_dropout=0.0)
    extra = {"load_s": time.perf_counter() - start}
    if spec["prepare"]:
        report = qadapt.prepare(model, spec["prepare"], **spec.get("parts", {}))
        extra["prepare"] = report.to_dict()  # its "fallbacks" name every module that fell back, and why
        log(str(report))
    return model, extra


def build_raw(args, spec):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype, device = _dtype(), "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    kwargs = {}
    if spec["quant"] == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype, device_map=device, **kwargs)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(model, config), {"load_s": time.perf_counter() - start}


def build_unsloth(args, spec):
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("skipped: unsloth needs a CUDA GPU")
    from unsloth import FastLanguageModel  # first: it patches transformers on import

    start = time.perf_counter()
    size = sizes()[args.size]
    model, _ = FastLanguageModel.from_pretrained(args.folder, max_seq_length=size["seq"], dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing=spec["checkpointing"],
                                             random_state=0)
    return model, {"load_s": time.perf_counter() - start}


def train(model, size_name, cuda, trace_memory=False, profile_kernels=False):
    """AdamW on the trainable parameters, the same random batches for every row: step times and losses (and with
    ``trace_memory``, what is alive at the peak of one more step: bench/_memory_trace.py; with ``profile_kernels``,
    where the GPU time of one more step goes: bench/_kernel_profile.py)."""
    import torch

    import _kernel_profile
    import _memory_trace

    size = sizes()[size_name]
    warmup, timed = STEPS[size_name]
    device = "cuda" if cuda else "cpu"
    generator = torch.Generator().manual_seed(0)
    vocab = size["model"]["vocab_size"]
    batches = [torch.randint(0, vocab, (size["batch"], size["seq"]), generator=generator).to(device) for _ in range(4)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    times, losses, extra = [], [], {}
    extras = [name for name, on in (("trace", trace_memory), ("profile", profile_kernels)) if on]
    for index in range(warmup + timed + len(extras)):
        ids = batches[index % len(batches)]
        extra_step = extras[index - warmup - timed] if index >= warmup + timed else None  # after the timed ones
        if extra_step == "trace":
            _memory_trace.start()
        elif extra_step == "profile":
            profiler = _kernel_profile.start()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if extra_step == "trace":
            extra["memory_at_peak"] = _memory_trace.stop_and_summarize()
            continue
        if extra_step == "profile":  # busy against the timed median: the profiler slows the host
            extra["kernels"] = _kernel_profile.stop_and_summarize(profiler, statistics.median(times[warmup:]))
            continue
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step = statistics.median(times[warmup:])
    return {"tokens_per_s": size["batch"] * size["seq"] / step, "step_s_median": step, "step_s_all": times,
            "losses": losses, "trainable_params": sum(p.numel() for p in trainable), "first_step_s": times[0], **extra}


# ---------------------------------------------------------------------------------------------------- summary
def markdown(runs) -> str:
    """One table over (meta, rows) pairs: per shape and row, speed, memory, losses, gain over the plain path and
    ratio to unsloth's nf4 row of the same run."""
    lines = ["| shape | setting | tokens/s | peak GiB (reserved) | after load GiB | loss first -> last | vs its plain path | "
             "vs unsloth nf4 (tok/s, peak) |", "|---|---|---|---|---|---|---|---|"]
    for meta, rows in runs:
        shape = {"8b": "Llama-3-8B", "full": "TinyLlama-1.1B", "tiny": "tiny (CPU)"}.get(meta.get("size"), meta.get("size"))
        by = {r["setting"]: r for r in rows if "error" not in r}
        peer = by.get("unsloth-nf4")
        for r in rows:
            if "error" in r:
                lines.append(f"| {shape} | {r['setting']} | failed: {r['error'][:100]} | | | | | |")
                continue
            plain = by.get(PLAIN.get(r["setting"], ""))
            gain = "-"
            if plain:
                gain = f"{r['tokens_per_s'] / plain['tokens_per_s']:.2f}x tok/s"
                if r["peak_gib"] is not None:
                    gain += f", {r['peak_gib'] - plain['peak_gib']:+.2f} GiB"
            versus = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x, {r['peak_gib'] / peer['peak_gib']:.2f}x" \
                if peer and peer.get("peak_gib") and r["peak_gib"] is not None else "-"
            reserved = f" ({_gib(r['peak_reserved_gib'])})" if r.get("peak_reserved_gib") else ""
            lines.append(f"| {shape} | {r['setting']} | {r['tokens_per_s']:,.0f} | {_gib(r['peak_gib'])}{reserved} | "
                         f"{_gib(r['after_load_gib'])} | {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f} | {gain} | "
                         f"{versus} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "8b", "tiny"), default="full")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape on whatever device is here (CPU: a minute)")
    parser.add_argument("--rows", help=f"comma-separated rows (default: {','.join(ORDER)})")
    parser.add_argument("--out", help="results JSON, rewritten after every row")
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole run (rows not started in "
                        "time are recorded as skipped)")
    parser.add_argument("--trace-memory", action="store_true", help="record the allocator's history over the first "
                        "timed step and put what is alive at its peak, by the line that allocated it, in each row (GPU)")
    parser.add_argument("--profile-kernels", action="store_true", help="profile one more step and put its GPU time by "
                        "kernel and kind of work, and how busy the GPU was, in each row (GPU)")
    add_internal_arguments(parser)
    return dispatch(parser.parse_args(argv), run_parent, run_row, markdown)


if __name__ == "__main__":
    sys.exit(main())
