"""Plot LoRA training tokens/s against peak GPU memory, one point per backend setting.

    python bench/plot_throughput.py out/throughput/results.json docs/throughput_vs_memory.png
    # several runs in one plot, in the order they ran (a setting measured again in a later file replaces the earlier
    # point: a row name keeps its meaning of the latest run, e.g. bench/peers.py's "lean" once it replayed CUDA graphs)
    python bench/plot_throughput.py docs/bench-results/throughput-h100-full.json \
        docs/bench-results/throughput-h100-packed.json docs/bench-results/throughput-h100-aqlm.json \
        docs/bench-results/throughput-h100-eetq.json docs/bench-results/tune-h100-compile.json \
        docs/bench-results/tune-h100-compile-rest.json docs/throughput_vs_memory.png
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
        if "batch=" in row["setting"]:  # another batch size: not comparable with the run's batch in the title
            continue
        if "error" not in row and row.get("peak_gib") is not None:
            points[row["setting"]] = (row["tokens_per_s"], row["peak_gib"])
    meta = data["meta"]
    title = f"{meta['device']}, {meta['size']} ({meta['batch']}x{meta['seq']}, LoRA r=16)"
    return points, title, meta["date"][:10]


def plot(points, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    colors = plt.get_cmap("tab20").colors
    ordered = sorted(points.items(), key=lambda item: -item[1][0])  # legend from fastest to slowest
    for index, (label, (tokens, peak)) in enumerate(ordered):
        # torch.compile'd settings and peers (bench/peers.py's unsloth rows) stand out
        marker = "s" if label.startswith("unsloth") else "*" if "compile" in label else "o"
        ax.scatter(peak, tokens, s=150 if marker == "*" else 60, marker=marker, color=colors[index % len(colors)],
                   label=f"{label}: {tokens:,.0f} tok/s, {peak:.1f} GiB")
    ax.set_xlabel("peak GPU memory during training (GiB)")
    ax.set_ylabel("training tokens / s")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    xs = [p for _, p in points.values()]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(0, max(t for t, _ in points.values()) * 1.1)
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="results.json ... png",
                        help="results.json files written by bench/train_throughput.py on a GPU, then the PNG to write")
    parser.add_argument("--reference", action="store_true", help="plot the H100 reference numbers instead")
    args = parser.parse_args(argv)
    *results, png = args.paths
    if args.reference:
        plot(REFERENCE_H100, "H100, seen once: TinyLlama-1.1B shape, 4x512 tokens, LoRA r=16", png)
        return 0
    if not results:
        parser.error("give at least one results.json before the PNG (or --reference)")
    points, title, dates = {}, None, []
    for path in results:
        more, run_title, date = points_from(path)
        title = title or run_title
        dates.append(date)
        points.update(more)  # a later run's row replaces an earlier one's
    first, last = min(dates), max(dates)
    plot(points, f"{title}, {first if first == last else f'{first} to {last}'}"
         + (f" ({len(results)} runs)" if len(results) > 1 else ""), png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
