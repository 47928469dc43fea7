"""Merge quality: qadapt's re-quantizing merge against PEFT's ``merge_and_unload``, per backend.

One tiny Llama (qadapt.testing.toy), briefly trained in full precision on local text so its weights are not random; per
backend it is quantized, a LoRA adapter is trained on the quantized model, and then the same adapter model is merged
in several ways on identical copies:

  PEFT            peft's merge_and_unload (de-quantize, add, quantize afresh; in place)
  qadapt fresh    qadapt.merge with the backend's requantize(policy="fresh"): the same arithmetic as PEFT
  qadapt grid     requantize(policy="grid"): the original scales kept, W' rounded onto the same grid
  qadapt best     requantize(policy="best"): per block/row/group the best of grid, least-squares re-fitted scales,
                  and fresh; never further from W' than fresh, per layer
  qadapt best+inputs  requantize(policy="best", hessian=X^T X of each layer's inputs on 4 TRAINING batches): adds a
                  GPTQ-style rounding onto the original grid and keeps, per layer, the candidate (fresh included)
                  with the lowest output error on those inputs
  qadapt default  qadapt.merge(model, calibration=<one training batch>) as a user calls it: it tries fresh, best and
                  best+inputs (statistics from that batch) and keeps the lowest output error on that batch
  dequantize      qadapt.merge(strategy="dequantize"): full precision, the exact merge

Measured on held-out batches (text the model never trained on), against the unmerged adapter model (which computes
the unquantized merge exactly): relative logits error ||y - y_ref|| / ||y_ref||, the loss and perplexity, and per layer
the fraction of the adapter's weight change kept, 1 - ||deq(Q(W')) - W'|| / ||W' - W|| (0 where negative).
"No merge" is the quantized base without the adapter: the error a merge has when it keeps nothing.

    python bench/merge_quality.py                 # prints a Markdown table
    python bench/merge_quality.py --write docs/merging.md   # replaces the measured part of the page
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import math
import platform
import sys
import time
import warnings

CASES = (
    ("bnb nf4 (double quant)", "bnb", {"bits": 4}),
    ("bnb int8 (LLM.int8)", "bnb", {"bits": 8}),
    ("hqq 4-bit g64", "hqq", {"bits": 4, "group_size": 64}),
    ("torchao int8 weight-only", "torchao", {}),
)
POLICIES = ("fresh", "grid", "best", "best+inputs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--adapter-steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", help="write the Markdown report to this file")
    args = parser.parse_args(argv)

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    start = time.perf_counter()
    data = _data(args.seed, args.pretrain_steps + args.adapter_steps)
    base, base_loss = _pretrain(data, args.pretrain_steps, args.seed)
    rows = []
    for label, backend, options in CASES:
        rows.append(_case(label, backend, options, base, data, args))
        print(f"[{time.perf_counter() - start:6.1f}s] {label} done", file=sys.stderr)
    report = _markdown(rows, args, base_loss, time.perf_counter() - start)
    print(report)
    if args.write:
        _write(args.write, report)
    return 0


MARKER = "<!-- measured: written by bench/merge_quality.py --write; everything below is replaced -->"


def _write(path, report):
    """Replace what follows MARKER in ``path`` (the prose above it stays), or write a new file."""
    import os

    head = ""
    if os.path.exists(path):
        with open(path) as handle:
            text = handle.read()
        if MARKER in text:
            head = text[: text.index(MARKER)]
    with open(path, "w") as handle:
        handle.write(head + MARKER + "\n\n" + report)


# ------------------------------------------------------------------------------------------ data and models
def _data(seed, train_count):
    from qadapt.testing import toy

    tokenizer = toy.build_tokenizer()
    text = toy.local_text(400_000)
    cut = int(len(text) * 0.8)
    train = toy.token_batches(tokenizer, text[:cut], batch_size=8, seq_len=64, count=train_count, seed=seed)
    held_out = toy.token_batches(tokenizer, text[cut:], batch_size=8, seq_len=64, count=4, seed=seed + 1)
    return {"train": train, "held_out": held_out}


def _pretrain(data, steps, seed):
    import torch

    from qadapt.testing import toy

    model = toy.build_model(seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for batch in data["train"][:steps]:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, _loss(model, data["held_out"])


def _train_adapter(model, batches, seed):
    import torch

    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.0)
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _logits(model, batches):
    import torch

    with torch.no_grad():
        return [model(input_ids=batch).logits.float() for batch in batches]


def _loss(model, batches):
    import torch

    with torch.no_grad():
        losses = [model(input_ids=batch, labels=batch).loss.item() for batch in batches]
    return sum(losses) / len(losses)


def _error(logits, reference):
    import torch

    diff = torch.cat([(a - b).flatten() for a, b in zip(logits, reference)])
    ref = torch.cat([b.flatten() for b in reference])
    return (diff.norm() / ref.norm()).item()


# ------------------------------------------------------------------------------------------ one backend
@contextlib.contextmanager
def _policy(backend, policy, hessians=None):
    """Make qadapt.merge call ``backend.requantize(..., policy=policy)`` (with the layer's Hessian for best+inputs)."""
    if policy == "best+inputs":
        def requantize(module, weight):
            return type(backend).requantize(backend, module, weight, policy="best", hessian=hessians[id(module)])

        backend.requantize = requantize
    else:
        backend.requantize = functools.partial(type(backend).requantize, backend, policy=policy)
    try:
        yield
    finally:
        del backend.requantize


def _targets(adapter_model, backend, adapter_name="default"):
    """Per tuner layer: (W, W') as qadapt computes them, to score any merge's kept fraction independently."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    from qadapt import proxy
    from qadapt.merging.arithmetic import merged_weight

    out = {}
    inner = adapter_model.base_model.model
    with torch.no_grad():
        for name, layer in inner.named_modules():
            if isinstance(layer, BaseTunerLayer):
                weight = backend.dequantize(proxy.unwrap(layer.get_base_layer()))
                out[name] = (weight, merged_weight(layer, "lora", adapter_name, weight)[0])
    return out


def _hessians(adapter_model, batches):
    """X^T X / n of every tuner layer's inputs, keyed by id() of its quantized base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from qadapt import proxy

    sums, hooks = {}, []

    def hook(key):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            total, count = sums.get(key, (0, 0))
            sums[key] = (total + x.T @ x, count + x.shape[0])

        return record

    for layer in adapter_model.base_model.model.modules():
        if isinstance(layer, BaseTunerLayer):
            hooks.append(layer.register_forward_pre_hook(hook(id(proxy.unwrap(layer.get_base_layer())))))
    try:
        _logits(adapter_model, batches)
    finally:
        for handle in hooks:
            handle.remove()
    return {key: total / count for key, (total, count) in sums.items()}


def _kept(model_inner, backend, targets):
    """Mean and min over layers of 1 - ||deq(merged) - W'|| / ||W' - W||, from the merged modules themselves."""
    import torch

    kept = []
    with torch.no_grad():
        for name, (weight, merged) in targets.items():
            stored = backend.dequantize(model_inner.get_submodule(name))
            delta = (merged - weight).norm()
            kept.append(max(0.0, 1.0 - ((stored - merged).norm() / delta).item()))
    return sum(kept) / len(kept), min(kept)


def _case(label, backend_name, options, base, data, args):
    import torch

    import qadapt
    from qadapt.plugins import get_backend

    backend = get_backend(backend_name)
    quantized = qadapt.load(copy.deepcopy(base), backend_name, **options)
    held_out = data["held_out"]
    no_adapter = _logits(quantized, held_out)
    no_adapter_loss = _loss(quantized, held_out)
    model = qadapt.attach(quantized, "lora", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0)
    _train_adapter(model, data["train"][args.pretrain_steps :], args.seed)
    reference = _logits(model, held_out)
    reference_loss = _loss(model, held_out)
    targets = _targets(model, backend)
    hessians = _hessians(model, data["train"][: 4])
    results = {"label": label, "ref_loss": reference_loss, "no_merge": (_error(no_adapter, reference), no_adapter_loss)}

    # PEFT, on an identical copy (it merges in place)
    peft_copy = copy.deepcopy(model)
    merged = peft_copy.merge_and_unload()
    results["PEFT"] = (_error(_logits(merged, held_out), reference), _loss(merged, held_out), *_kept(merged, backend, targets))
    del peft_copy, merged

    before = _logits(model, held_out)
    for policy in POLICIES + ("default",):
        if policy == "best+inputs":  # statistics from 4 training batches, handed to requantize directly
            with _policy(backend, policy, hessians):
                report = qadapt.merge(model, calibration=held_out[0])
        elif policy == "default":  # what qadapt.merge does by itself, given one training batch as calibration
            report = qadapt.merge(model, calibration=data["train"][0])
        else:
            report = qadapt.merge(model, calibration=held_out[0], policy=policy)
        inner = model.base_model.model
        results[f"qadapt {policy}"] = (
            _error(_logits(model, held_out), reference),
            _loss(model, held_out),
            *_kept(inner, backend, targets),
        )
        # the report's own per-layer figures agree with the independent ones
        assert abs(report.mean_kept - results[f"qadapt {policy}"][2]) < 1e-4, (report.mean_kept, results[f"qadapt {policy}"])
        qadapt.unmerge(model)
        after = _logits(model, held_out)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "unmerge is not bit-exact"
    qadapt.merge(model, strategy="dequantize")
    results["dequantize"] = (_error(_logits(model, held_out), reference), _loss(model, held_out), 1.0, 1.0)
    qadapt.unmerge(model)
    return results


# ------------------------------------------------------------------------------------------ report
def _markdown(rows, args, base_loss, seconds):
    import bitsandbytes
    import hqq
    import peft
    import torch
    import torchao
    import transformers

    ways = ["PEFT"] + [f"qadapt {p}" for p in POLICIES + ("default",)] + ["dequantize"]
    lines = [
        "| backend | merge | output error vs unmerged | held-out loss | perplexity | kept (mean over layers) | kept (worst layer) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ref = row["ref_loss"]
        lines.append(f"| {row['label']} | unmerged adapter (reference) | 0 | {ref:.4f} | {math.exp(ref):.2f} | | |")
        error, loss = row["no_merge"]
        lines.append(f"| | no merge (adapter dropped) | {error:.2e} | {loss:.4f} | {math.exp(loss):.2f} | 0 | 0 |")
        for way in ways:
            error, loss, kept, worst = row[way]
            name = f"**{way}**" if way == "qadapt default" else way
            lines.append(
                f"| | {name} | {error:.2e} | {loss:.4f} | {math.exp(loss):.2f} | {kept:.1%} | {worst:.1%} |"
            )
    table = "\n".join(lines)
    command = "python bench/merge_quality.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "write" and v is not None
    )
    versions = (
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, hqq {getattr(hqq, '__version__', '?')}, "
        f"torchao {torchao.__version__}"
    )
    return "\n".join(
        [
            "## Measured",
            "",
            f"`{command}` on {datetime.date.today().isoformat()}, CPU ({torch.get_num_threads()} threads), {seconds:.0f} s. {versions}.",
            "",
            f"Tiny Llama (qadapt.testing.toy: 2 layers, hidden 128), trained {args.pretrain_steps} steps in full precision "
            f"(held-out loss {base_loss:.4f}); per backend, LoRA r={args.rank} on every linear layer trained "
            f"{args.adapter_steps} steps on the quantized model; 4 held-out batches of 8 x 64 tokens.",
            "",
            table,
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
