"""Serving what was trained: ``generate`` tokens/s and peak memory per backend and kernel, adapter separate and merged.

The transformers quantization guides compare backends on generation throughput (fp16 vs bnb vs GPTQ vs AWQ, their
fused and Marlin kernels); this is that comparison through qadapt, with a LoRA adapter on every linear layer (r=16,
random B so that it computes something) kept separate (PEFT's layers in the forward) and then merged into the
quantized weights with ``qadapt.merge`` (policy "fresh": one re-quantization, no candidate search). Each backend runs
in its own process (a fresh allocator: each peak is its own), in order of importance, within ``--budget`` seconds;
the results file is rewritten after each row.

Per row and batch size (1 and 8): greedy ``generate`` of ``--new`` tokens (forced: ``min_new_tokens``) after a
``--prompt``-token random prompt, one short warm-up generation first, then ``--repeats`` timed calls (3); tokens/s =
batch x new tokens / the median call's seconds (prefill included, as the guides measure; every call's rate is kept in
``runs_tokens_per_s``: on the H200 the first call after a load was seen up to 2.5x slower than later ones);
``torch.cuda.max_memory_allocated`` over those calls.

    python3 bench/generate.py --size 8b --out $OUT/generate-h200-8b.json       # the GPU call (one 10-minute call)
    python3 bench/generate.py --tiny --out out/generate-tiny.json              # any CPU, to check the script
    python3 bench/generate.py --summarize docs/bench-results/generate-h200-8b.json

Kernels: bitsandbytes picks its own (a 4-bit GEMV for one token at a time, LLM.int8's int8 matmul) and has no
switch; torchao's int4 weight-only scheme is tinygemm's int4 kernel (``scheme="int4_weight_only"``, CUDA, bf16;
nothing trains on it, so it has no adapter rows); HQQ's default training backend de-quantizes every step (slow to
serve), HQQ's ``kernel="torchao_int4"`` runs its layers on tinygemm's int4 kernel (HQQ's own conversion; serving
only, so base rows: a merged model saved with the default kernel loads onto it the same way); EETQ runs its own CUDA
kernel where it can (``kernel="auto"``; its torch route elsewhere, the H200 included); AQLM's layers de-quantize in
PyTorch, and its merge is the exact one (``strategy="dequantize"``: a full-precision model), since it refuses to
re-quantize; ``aqlm-2x8`` saves its checkpoint with the adapter separate, which ``aqlm-2x8-aqlm`` serves on aqlm's own
CUDA kernels (``kernel="aqlm"``, serving only).

GPTQ and AWQ (gptqmodel) train on their torch kernel and serve on Marlin (``kernel="marlin"``, CUDA). Their torch
row (``gptq-4bit``, ``awq-4bit``) quantizes the model (one random 128-token calibration sequence: the weights are
random, so only the format matters here; ``load s`` includes it) or loads ``--gptq-folder``/``--awq-folder``, runs
the adapter separate and merged, and saves both as qadapt checkpoints in the work folder; the Marlin rows then serve
those checkpoints with ``qadapt.load(checkpoint, kernel="marlin")``, each in its own process: ``gptq-4bit-marlin``
the adapter separate (PEFT's layers over Marlin's), ``gptq-4bit-marlin-merged`` merged (Marlin alone); the same for
``awq-4bit``. ``--work DIR`` keeps the model and checkpoints between calls (an 8B GPTQ/AWQ set does not fit one
10-minute call):

    python3 bench/generate.py --size 8b --work out/g8b --rows gptq-4bit,gptq-4bit-marlin,gptq-4bit-marlin-merged
    python3 bench/generate.py --size 8b --work out/g8b --rows awq-4bit,awq-4bit-marlin,awq-4bit-marlin-merged

``gptq-4bit-marlin-both`` serves both checkpoints in one process (the eighth session's arrangement, not in the default
order). At batch 1 an eager decode is bound by the host, not the GPU: ``--profile-kernels`` records, per batch-1
cell, the GPU time by kernel and how busy the GPU was, and cProfile's top Python functions; each row records the
classes of the layers that serve (``layers``), so a kernel that did not take shows.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
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
#: name -> qadapt backend and options; adapter=False: nothing trains on it (base only)
ROWS = {
    "bf16": dict(backend=None, options={}),
    "bnb-nf4": dict(backend="bnb", options=NF4),
    "torchao-int8": dict(backend="torchao", options=dict(scheme="int8_weight_only")),
    "torchao-int4": dict(backend="torchao", options=dict(scheme="int4_weight_only"), adapter=False),
    "bnb-int8": dict(backend="bnb", options=dict(bits=8)),
    "hqq-4bit": dict(backend="hqq", options=dict(bits=4, group_size=64)),
    # HQQ's serving kernel (tinygemm's int4 matmul, qadapt's kernel="torchao_int4"): nothing trains on it, so the
    # base only (a merged model saved with the default kernel loads onto it the same way)
    "hqq-4bit-torchao_int4": dict(backend="hqq", options=dict(bits=4, group_size=64, kernel="torchao_int4"),
                                  adapter=False),
    # EETQ int8: its own CUDA kernel where it runs, else its torch route (H200: EETQ's kernels refuse SM90); AQLM 2x8
    # with a short k-means (speed does not depend on the code values), de-quantized by qadapt's PyTorch layers; AQLM
    # refuses a re-quantizing merge (it would lose the adapter), so its merged rows are its exact merge: full precision
    "eetq-int8": dict(backend="eetq", options={}),
    "aqlm-2x8": dict(backend="aqlm", options=dict(num_codebooks=2, nbits_per_codebook=8, in_group_size=8,
                                                  kmeans_iterations=2, refine_passes=0), merge="dequantize",
                     saves=("trained",)),
    # aqlm's own CUDA kernels (kernel="aqlm", serving only): the aqlm row's checkpoint with its adapter separate (its
    # merged model is full precision, so there is no merged AQLM checkpoint to serve)
    "aqlm-2x8-aqlm": dict(backend="aqlm", options=dict(kernel="aqlm"), serves="aqlm-2x8-trained", adapter="separate"),
    # gptqmodel's torch kernel (trainable): quantized here (or --gptq-folder/--awq-folder); the adapter separate and
    # merged are saved in the work folder as "<row>-trained" and "<row>-merged"
    "gptq-4bit": dict(backend="gptq", options=dict(bits=4, group_size=128), calibrated=True, saves=("trained", "merged")),
    "awq-4bit": dict(backend="awq", options=dict(bits=4, group_size=128), calibrated=True, saves=("trained", "merged")),
    # Marlin (serving only): each of the torch row's two checkpoints loaded with kernel="marlin", in its own process
    # (two checkpoints loaded one after the other in one process peaked at the sum of both on the H200)
    **{f"{name}-4bit-marlin{suffix}": dict(backend=name, options=dict(kernel="marlin"),
                                           serves=f"{name}-4bit-{checkpoint}", adapter=adapter)
       for name in ("gptq", "awq")
       for suffix, checkpoint, adapter in (("", "trained", "separate"), ("-merged", "merged", "merged"))},
    # the eighth session's arrangement, kept to compare with: both checkpoints served in one process, trained first
    "gptq-4bit-marlin-both": dict(backend="gptq", options=dict(kernel="marlin"),
                                  serves=("gptq-4bit-trained", "gptq-4bit-merged"), adapter=("separate", "merged")),
}
ORDER = ["bf16", "bnb-nf4", "torchao-int8", "torchao-int4", "hqq-4bit-torchao_int4", "bnb-int8", "hqq-4bit",
         "gptq-4bit", "gptq-4bit-marlin", "gptq-4bit-marlin-merged", "awq-4bit", "awq-4bit-marlin",
         "awq-4bit-marlin-merged", "eetq-int8", "aqlm-2x8", "aqlm-2x8-aqlm"]
BATCHES = (1, 8)
PROFILED_TOKENS = 16  # --profile-kernels: one batch-1 generate of this many tokens under torch.profiler
CALIBRATION_TOKENS = 128  # one random sequence: GPTQ/AWQ need calibration; on random weights its quality is moot


def log(*args):
    print(*args, flush=True)


def run_parent(args) -> int:
    size = "tiny" if args.tiny else args.size
    names = args.rows.split(",") if args.rows else list(ORDER)
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        log(f"unknown rows: {', '.join(unknown)}; known: {', '.join(ROWS)}")
        return 2
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "size": size,
            "command": " ".join([sys.executable] + sys.argv), "budget_s": args.budget, "prompt": args.prompt,
            "new_tokens": args.new, "batches": list(BATCHES), "adapter": "LoRA r=16 on every linear layer, random B",
            "merge": "qadapt.merge(strategy='requantize', policy='fresh' where the backend offers policies; "
                     "AQLM: strategy='dequantize')"}
    rows = []
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.work:
            folder = os.path.abspath(args.work)
            os.makedirs(folder, exist_ok=True)
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="qadapt-generate-"))
        build = built_model(folder, size, args.budget)
        if "error" in build:
            write_results(args.out, meta, [{"setting": "build", **build}], table=[])
            log(f"[build] FAILED: {build['error']}\n{build.get('output', '')}")
            return 1
        meta.update(build)
        common = ["--size", size, "--folder", folder, "--prompt", str(args.prompt), "--new", str(args.new),
                  "--repeats", str(args.repeats)] \
            + (["--profile-kernels"] if args.profile_kernels else [])
        for name in ("gptq", "awq"):
            if getattr(args, f"{name}_folder"):
                common += [f"--{name}-folder", os.path.abspath(getattr(args, f"{name}_folder"))]
        left = args.budget - (time.monotonic() - started)
        run_rows(__file__, names, common, left, folder, args.out, meta, rows, _report)
    write_results(args.out, meta, rows, table=table(rows))
    log(markdown([(meta, rows)]))
    return 0


def built_model(folder, size, budget) -> dict:
    """Build the random model into ``folder`` (in a child), or reuse the one a run with the same ``--work`` built."""
    record = os.path.join(folder, "build.json")
    if os.path.exists(record):
        with open(record) as handle:
            build = json.load(handle)
        if build.get("size") == size:
            return dict(build, reused=True)
        return {"error": f"{folder} holds a {build.get('size')!r} model, not {size!r}: pass another --work folder"}
    build = run_child(__file__, ["--build", "--size", size, "--folder", folder], budget, folder)
    if "error" not in build:
        with open(record + ".tmp", "w") as handle:
            json.dump(dict(build, size=size), handle, default=str)
        os.replace(record + ".tmp", record)
    return build


def _report(row):
    if "error" in row:
        log(f"[{row['setting']}] FAILED: {row['error']}")
        return
    log(f"[{row['setting']}] layers: {row.get('layers')}")
    for cell in row["cells"]:
        log(f"[{row['setting']}] {cell['adapter']:<9} batch {cell['batch']}: " + (
            f"{cell['tokens_per_s']:,.1f} tok/s (runs {cell.get('runs_tokens_per_s')}), peak {cell['peak_gib']}"
            if "error" not in cell else cell["error"]))
        kernels = cell.get("kernels")
        if kernels:
            import _kernel_profile

            for line in _kernel_profile.describe(kernels, f"{PROFILED_TOKENS}-token generation (the timed calls' "
                                                 "pace)", top=8):
                log(line)
        python = cell.get("python")
        if python:
            log(f"  python, {python['per']}: {python['wall_ms']:.0f} ms; by own time:")
            for name, calls, ms in python["top"][:12]:
                log(f"    {ms:8.2f} ms {calls:6d}x  {name}")


def run_row(args) -> dict:
    import torch

    repo_on_path()
    from train_throughput import SIZES, ensure_backends, load_full

    import qadapt

    spec = ROWS[args.row]
    ensure_backends({spec["backend"]})
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    vocab = SIZES[args.size]["model"]["vocab_size"]
    if "serves" in spec:
        return serve_checkpoint(args, spec, vocab, cuda)
    options = dict(spec["options"])
    if spec["backend"] in ("bnb", "hqq") and options.get("bits") == 4:
        options["compute_dtype"] = str(dtype).replace("torch.", "")
    start = time.perf_counter()
    row = {"cells": []}
    if spec.get("calibrated"):
        runtime = dict(kernel="torch", dtype=str(dtype).replace("torch.", ""))  # the trainable kernel
        given = getattr(args, f"{spec['backend']}_folder")
        if given:
            model = qadapt.load(given, backend=spec["backend"], **runtime)
        else:
            ids = torch.randint(4, vocab, (1, CALIBRATION_TOKENS), generator=torch.Generator().manual_seed(0))
            model = qadapt.load(args.folder, backend=spec["backend"], calibration=[ids], **options, **runtime)
            row["quantized_here"] = f"1 x {CALIBRATION_TOKENS} random calibration tokens, included in load_s"
    elif spec["backend"] is None:
        model = load_full(args.folder, dtype, device)
    elif spec["backend"] == "hqq":
        model = qadapt.load(load_full(args.folder, dtype, "cpu"), backend="hqq", **options)
    else:
        model = qadapt.load(args.folder, backend=spec["backend"], **options)
    row["load_s"] = time.perf_counter() - start
    row["layers"] = layer_classes(model)
    if spec.get("adapter", True):
        model = qadapt.attach(model, "lora", r=16, lora_alpha=32)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.01)
        row["cells"] += [dict(measure(model, batch, args, vocab, cuda), adapter="separate") for batch in BATCHES]
        if "trained" in spec.get("saves", ()):
            row["save_s"] = save(model, os.path.join(args.folder, f"{args.row}-trained"))
        backend = qadapt.get_backend(spec["backend"]) if spec["backend"] else None
        start = time.perf_counter()
        policy = "fresh" if backend is not None and "fresh" in backend.requantize_policies else None
        strategy = spec.get("merge", "requantize")
        report = qadapt.merge(model, strategy, **({"policy": policy} if strategy == "requantize" else {}))
        row["merge_strategy"] = strategy
        row["merge_s"] = time.perf_counter() - start
        row["merge_error"] = getattr(report, "output_error", None)
        row["cells"] += [dict(measure(model, batch, args, vocab, cuda), adapter="merged") for batch in BATCHES]
        if "merged" in spec.get("saves", ()):
            row["save_s"] += save(model, os.path.join(args.folder, f"{args.row}-merged"))
    else:
        row["cells"] += [dict(measure(model, batch, args, vocab, cuda), adapter="none") for batch in BATCHES]
    return row


def save(model, path) -> float:
    """qadapt.save into the work folder (a rerun replaces its own checkpoint); the seconds it took."""
    import qadapt

    start = time.perf_counter()
    qadapt.save(model, path, overwrite=True)
    return time.perf_counter() - start


def serve_checkpoint(args, spec, vocab, cuda) -> dict:
    """The checkpoint(s) the torch row saved (``spec["serves"]``), loaded with this row's runtime options (Marlin);
    several are served one after the other in this process, each deleted before the next loads."""
    import gc

    import torch

    import qadapt

    served = spec["serves"] if isinstance(spec["serves"], tuple) else (spec["serves"],)
    adapters = spec["adapter"] if isinstance(spec["adapter"], tuple) else (spec["adapter"],)
    row = {"cells": []}
    for checkpoint, adapter in zip(served, adapters):
        path = os.path.join(args.folder, checkpoint)
        if not os.path.isdir(path):
            raise RuntimeError(f"no {path}: run the {checkpoint.rsplit('-', 1)[0]!r} row first with the same --work "
                               "folder")
        start = time.perf_counter()
        model = qadapt.load(path, **spec["options"])
        row.setdefault("load_s", time.perf_counter() - start)
        row.setdefault("layers", layer_classes(model))
        row["cells"] += [dict(measure(model, batch, args, vocab, cuda), adapter=adapter) for batch in BATCHES]
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def layer_classes(model) -> dict:
    """How many modules of each class hold the decoder's weights (the kernel that serves: ``MarlinQuantLinear``,
    ``TorchQuantLinear``, ``Linear4bit``...), counted over the leaf modules that own a weight or packed tensor of two or
    more dimensions (aqlm's ``QuantizedLinear`` holds only 3-D codes and 4-D codebooks and scales)."""
    counts = collections.Counter()
    for module in model.modules():
        if next(module.children(), None) is not None:
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(t.dim() >= 2 for t in tensors) and type(module).__name__ not in ("Embedding",):
            counts[type(module).__name__] += 1
    return dict(counts.most_common())


def measure(model, batch, args, vocab, cuda) -> dict:
    import torch

    device = "cuda" if cuda else "cpu"
    ids = torch.randint(4, vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    settings = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.eval()
    try:
        with torch.no_grad():
            model.generate(**settings, max_new_tokens=4, min_new_tokens=4)  # warm-up: kernels, caches
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            runs = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = model.generate(**settings, max_new_tokens=args.new, min_new_tokens=args.new)
                if cuda:
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - start)
    except Exception as exc:  # recorded per cell: one kernel failing at one batch size keeps the others
        return {"batch": batch, "error": f"{type(exc).__name__}: {exc}"[:300]}
    new = out.shape[1] - ids.shape[1]
    seconds = statistics.median(runs)
    cell = {"batch": batch, "tokens_per_s": batch * new / seconds, "seconds": seconds, "new_tokens": new,
            "runs_tokens_per_s": [round(batch * new / s, 2) for s in runs],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    if args.profile_kernels and cuda and batch == 1:  # where one token's time goes, after the timed calls
        import _kernel_profile

        profiler = _kernel_profile.start()
        with torch.no_grad():
            model.generate(**settings, max_new_tokens=PROFILED_TOKENS, min_new_tokens=PROFILED_TOKENS)
        torch.cuda.synchronize()
        cell["kernels"] = _kernel_profile.stop_and_summarize(profiler, PROFILED_TOKENS * seconds / new)
        cell["kernels"]["per"] = (f"{PROFILED_TOKENS} tokens (prefill included); wall_ms from the timed calls' "
                                  "median pace")
        cell["python"] = python_profile(model, settings)
    return cell


def python_profile(model, settings, top: int = 15) -> dict:
    """Where the host's time goes in one batch-1 generation of ``PROFILED_TOKENS`` tokens: cProfile's functions by
    their own time (a host-bound decode spends it in Python and in launching kernels, not waiting on the GPU)."""
    import cProfile
    import pstats

    import torch

    profile = cProfile.Profile()
    start = time.perf_counter()
    with torch.no_grad():
        profile.enable()
        model.generate(**settings, max_new_tokens=PROFILED_TOKENS, min_new_tokens=PROFILED_TOKENS)
        torch.cuda.synchronize()
        profile.disable()
    wall = time.perf_counter() - start
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, primitive calls, own s, cumulative s, _)}
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return {"wall_ms": wall * 1e3, "per": f"{PROFILED_TOKENS} tokens under cProfile (slower than unprofiled)",
            "top": [[f"{os.path.basename(file)}:{line}({function})", calls, round(own * 1e3, 2)]
                    for (file, line, function), (calls, _, own, _, _) in ranked]}


def table(rows):
    flat = []
    for r in rows:
        for cell in r.get("cells", []):
            if "error" not in cell:
                flat.append({"setting": f"{r['setting']} {cell['adapter']} b{cell['batch']}",
                             "tokens_per_s": cell["tokens_per_s"], "peak_gib": cell["peak_gib"]})
    return flat


def markdown(runs) -> str:
    lines = ["| backend / kernel | adapter | batch 1 tok/s | batch 8 tok/s | peak GiB (b1 / b8) | load s | merge s |",
             "|---|---|---|---|---|---|---|"]
    for _, rows in runs:
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['setting']} | failed: {r['error'][:100]} | | | | | |")
                continue
            for adapter in ("separate", "merged", "none"):
                cells = {c["batch"]: c for c in r["cells"] if c["adapter"] == adapter}
                if not cells:
                    continue

                def speed(b):
                    c = cells.get(b)
                    return "-" if c is None else c.get("error", f"{c['tokens_per_s']:,.1f}")

                def peak(b):
                    c = cells.get(b)
                    return "-" if c is None or c.get("peak_gib") is None else f"{c['peak_gib']:.1f}"

                merge = f"{r['merge_s']:.0f}" if adapter == "merged" and "merge_s" in r else ""
                lines.append(f"| {r['setting']} | {adapter} | {speed(1)} | {speed(8)} | {peak(1)} / {peak(8)} | "
                             f"{r['load_s']:.0f} | {merge} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "8b", "tiny"), default="8b")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rows", help=f"comma-separated rows (default: {','.join(ORDER)}); known: {', '.join(ROWS)}")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="generated tokens")
    parser.add_argument("--gptq-folder", help="a GPTQ 4-bit folder of the same shape for the gptq rows (else quantized)")
    parser.add_argument("--awq-folder", help="an AWQ 4-bit folder of the same shape for the awq rows (else quantized)")
    parser.add_argument("--work", help="folder for the model and the rows' checkpoints, kept and reused between runs "
                        "(default: a temporary one)")
    parser.add_argument("--out", help="results JSON, rewritten after every row")
    parser.add_argument("--budget", type=float, default=540)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed generations per cell; tokens/s is their median (all of them are recorded)")
    parser.add_argument("--profile-kernels", action="store_true",
                        help="also profile one batch-1 generation per adapter state: GPU time by kernel, launches, "
                        "how busy the GPU was (bench/_kernel_profile.py)")
    add_internal_arguments(parser)
    return dispatch(parser.parse_args(argv), run_parent, run_row, markdown)


if __name__ == "__main__":
    sys.exit(main())
