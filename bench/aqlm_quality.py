"""Weight reconstruction error of qadapt's AQLM quantizer against round-to-nearest at matched storage.

    python bench/aqlm_quality.py            # a minute or so on 2 CPU cores
    python bench/aqlm_quality.py --big      # adds an uncapped 1x16 on a 1024x1024 matrix (several minutes)
    python bench/aqlm_quality.py --check-numba   # aqlm's own numba CPU kernel, call after call (see docs/aqlm.md)

For each matrix and AQLM shape (M codebooks x B bits, groups of g input weights) it prints the relative Frobenius
error ||W - deq(Q(W))|| / ||W|| and the storage in bits per parameter *including* codebooks (16-bit values) and the
16-bit per-row scales; next to it, per-group min-max RTN (16-bit scale + 16-bit zero per group) with the largest
storage that does not exceed AQLM's. Then, for merges: how much of a low-rank weight change survives re-quantization
with the layer's SAME codebooks and scales (qadapt's ``requantize``).

Matrices: the toy Llama's linears (random init, N(0, 0.02)), a 512x512 Gaussian, and a 512x512 heavy-tailed
low-rank-plus-noise matrix (Student-t noise, a few outlier columns) standing in for trained weights. No trained
checkpoints are available offline, so read the absolute numbers as indicative only.
"""

from __future__ import annotations

import argparse
import time

import torch

from qadapt_plugins import _aqlm_quantize as aq

RTN_GROUPS = (16, 32, 64, 128, 256, 512, 1024)


def matrices(big: bool):
    from qadapt.testing import toy

    model = toy.build_model()
    out = [
        ("toy q_proj 128x128", model.model.layers[0].self_attn.q_proj.weight.detach().clone()),
        ("toy gate_proj 256x128", model.model.layers[0].mlp.gate_proj.weight.detach().clone()),
        ("toy down_proj 128x256", model.model.layers[0].mlp.down_proj.weight.detach().clone()),
    ]
    gen = torch.Generator().manual_seed(0)
    out.append(("gaussian 512x512", torch.randn(512, 512, generator=gen) * 0.02))
    low_rank = torch.randn(512, 16, generator=gen) @ torch.randn(16, 512, generator=gen) * 0.004
    noise = torch.distributions.StudentT(torch.tensor(4.0)).sample((512, 512)) * 0.01
    heavy = low_rank + noise
    heavy[:, torch.randperm(512, generator=gen)[:4]] *= 8.0  # outlier input channels
    out.append(("heavy-tailed 512x512", heavy))
    if big:
        out.append(("gaussian 1024x1024", torch.randn(1024, 1024, generator=gen) * 0.02))
    return out


def rtn_match(bits_budget: float, in_features: int):
    """The RTN (bits, group) with the largest storage <= bits_budget (ties: more bits, smaller groups)."""
    best = None
    for bits in (1, 2, 3, 4, 8):
        for group in RTN_GROUPS:
            if group > in_features or in_features % group:
                continue
            cost = aq.rtn_bits_per_parameter(bits, group)
            if cost <= bits_budget + 1e-9 and (best is None or cost > best[2]):
                best = (bits, group, cost)
    return best


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def check_numba(repeats: int = 8):
    """aqlm's own CPU kernel for 256-entry codebooks (numba LUT) against its own de-quantization, call after call."""
    import aqlm
    from aqlm.utils import _dequantize_weight, unpack_int_data

    from qadapt_plugins._aqlm_layers import pack_codes

    weight = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    result = aq.quantize_weight(weight, num_codebooks=2, nbits_per_codebook=8, kmeans_iterations=5)
    layer = aqlm.QuantizedLinear(128, 256, 8, 1, 2, 8, bias=False)
    layer.codes.data = pack_codes(result.codes, 8)
    layer.codebooks.data = result.codebooks.clone()
    layer.scales.data = result.scales.clone()
    reference_weight = _dequantize_weight(unpack_int_data(layer.codes.data, 8), layer.codebooks.data, layer.scales.data)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(1))
    reference = x @ reference_weight.T
    import numba

    print(f"aqlm numba kernel (2x8, 40 x 128 input, {numba.get_num_threads()} numba threads): "
          "max |y - y_ref| / max |y_ref| per call")
    with torch.no_grad():
        errors = [((layer(x) - reference).abs().max() / reference.abs().max()).item() for _ in range(repeats)]
    print("  " + ", ".join(f"{e:.2e}" for e in errors))
    print(f"  codes shape after the first call: {tuple(layer.codes.shape)} (was {tuple(result.codes.shape)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--big", action="store_true", help="add an uncapped 1x16 run on a 1024x1024 matrix")
    parser.add_argument("--kmeans-iterations", type=int, default=20)
    parser.add_argument("--refine-passes", type=int, default=3)
    parser.add_argument("--check-numba", action="store_true",
                        help="only run aqlm's numba CPU kernel against its own de-quantization, several times")
    args = parser.parse_args()
    if args.check_numba:
        check_numba()
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shapes = [(1, 8, 8), (2, 8, 8), (3, 8, 8), (1, 16, 8)]

    print("| matrix | AQLM MxB g | AQLM bits/param | AQLM rel. error | quantize s | RTN (bits, group) | RTN bits/param | RTN rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    kept_rows = []
    for name, weight in matrices(args.big):
        out_features, in_features = weight.shape
        for m, b, g in shapes:
            groups = out_features * in_features // g
            if b == 16 and groups <= 2**16 and "1024" not in name and name != "toy q_proj 128x128":
                continue  # 1x16 is shown capped once (toy q_proj) and uncapped with --big
            if b == 16 and "1024" in name:
                iterations = 3
            else:
                iterations = args.kmeans_iterations
            if "1024" in name and b != 16:
                continue
            start = time.perf_counter()
            result = aq.quantize_weight(weight, in_group_size=g, num_codebooks=m, nbits_per_codebook=b,
                                        kmeans_iterations=iterations, refine_passes=args.refine_passes)
            seconds = time.perf_counter() - start
            restored = aq.dequantize_codes(result.codes, result.codebooks, result.scales)
            bpp = aq.bits_per_parameter(out_features, in_features, in_group_size=g, out_group_size=1,
                                        num_codebooks=m, nbits_per_codebook=b)
            match = rtn_match(bpp, in_features)
            if match:
                rtn_err = rel(aq.rtn_quantize(weight, match[0], match[1]), weight)
                rtn_cells = f"{match[0]}-bit, g{match[1]} | {match[2]:.2f} | {rtn_err:.3f}"
            else:
                rtn_cells = "- | - | -"
            note = " (capped: codebook > groups)" if result.capped_kmeans else ""
            print(f"| {name} | {m}x{b} g{g}{note} | {bpp:.2f} | {rel(restored, weight):.3f} | {seconds:.1f} | {rtn_cells} |")
            if (m, b) == (2, 8) and name in ("toy q_proj 128x128", "gaussian 512x512"):
                kept_rows.append((name, weight, result))

    print()
    print("Requantize (merge) with the same codebooks and scales: share of a rank-8 weight change that survives")
    print()
    print("| matrix (2x8 g8) | ||dW|| / ||W|| | kept = 1 - ||deq(Q(W+dW)) - deq(Q(W)) - dW|| / ||dW|| |")
    print("|---|---|---|")
    for name, weight, result in kept_rows:
        base = aq.dequantize_codes(result.codes, result.codebooks, result.scales)
        gen = torch.Generator().manual_seed(1)
        direction = torch.randn(weight.shape[0], 8, generator=gen) @ torch.randn(8, weight.shape[1], generator=gen)
        direction /= direction.norm()
        for size in (0.01, 0.05, 0.2, 0.5, 1.0):
            delta = direction * size * base.norm()
            codes = aq.reassign_codes(base + delta, result.codes, result.codebooks, result.scales)
            stored = aq.dequantize_codes(codes, result.codebooks, result.scales)
            kept = 1 - rel(stored - base, delta)
            print(f"| {name} | {size:.2f} | {kept:.1%} |")


if __name__ == "__main__":
    main()
