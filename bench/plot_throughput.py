"""Plot LoRA training tokens/s against peak GPU memory, one point per backend setting.

    python bench/plot_throughput.py out/throughput/results.json docs/throughput_vs_memory.png
    python bench/plot_throughput.py --reference docs/throughput_vs_memory.png   # the H100 numbers seen once

Needs matplotlib (not a qadapt dependency: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json

#: seen once on an H100 (TinyLlama-1.1B shape, random weights, batch 4 x 512, LoRA r=16 all-linear, AdamW, no
#: gradient checkpointing), recorded in the project's ENVIRONMENT.md; not produced by bench/train_throughput.py
REFERENCE_H100 = {
    "bf16 (no quantization)": (13434, 8.5),
    "bnb nf4 + double quant": (7784, 7.2),
    "bnb int8": (9208, 9.9),
    "torchao int8 weight-only": (10407, 9.9),
    "quanto int8": (9432, 8.4),
}


def points_from(results_path):
    with open(results_path) as handle:
        data = json.load(handle)
    points = {}
    for row in data["table"]:
        if "error" not in row and row.get("peak_gib") is not None:
            points[row["setting"]] = (row["tokens_per_s"], row["peak_gib"])
    meta = data["meta"]
    title = f"{meta['device']}, {meta['size']} ({meta['batch']}x{meta['seq']}, LoRA r=16), {meta['date'][:10]}"
    return points, title


def plot(points, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, (tokens, peak) in points.items():
        ax.scatter(peak, tokens, s=60)
        ax.annotate(label, (peak, tokens), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("peak GPU memory during training (GiB)")
    ax.set_ylabel("training tokens / s")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    xs = [p for _, p in points.values()]
    ax.set_xlim(min(xs) - 1, max(xs) + 2.5)
    ax.set_ylim(0, max(t for t, _ in points.values()) * 1.15)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", help="results.json written by bench/train_throughput.py on a GPU")
    parser.add_argument("png")
    parser.add_argument("--reference", action="store_true", help="plot the H100 reference numbers instead")
    args = parser.parse_args(argv)
    if args.reference:
        plot(REFERENCE_H100, "H100, seen once: TinyLlama-1.1B shape, 4x512 tokens, LoRA r=16", args.png)
    else:
        points, title = points_from(args.results)
        plot(points, title, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
