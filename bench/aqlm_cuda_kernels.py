"""Do aqlm's own CUDA/Triton kernels agree with aqlm's own de-quantization? (GPU only.)

For random AQLM layers (random codes, codebooks and scales: the kernels' arithmetic does not care how they were
fitted) of several shapes and codebook layouts, in float16 and bfloat16, the output of ``aqlm.QuantizedLinear`` with
the kernels aqlm itself selects (one row: its inference kernel; 64 rows: its training kernel) is compared with
``x @ W.T``, ``W`` from ``aqlm.utils._dequantize_weight`` in float32, and so is the gradient it passes back to its
input with ``grad @ W``. qadapt's AQLM layers use the latter on CUDA too,
because on an H100 the two disagreed on the toy model (docs/gpu-runs.md).

    python bench/aqlm_cuda_kernels.py --out out/aqlm-cuda.json
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

SHAPES = [(128, 128), (1024, 1024), (2048, 5632), (5632, 2048)]  # (in_features, out_features)
LAYOUTS = [(2, 8), (1, 8), (1, 16)]  # (num_codebooks, nbits_per_codebook)


def random_layer(in_features, out_features, num_codebooks, nbits, dtype, seed=0):
    import aqlm
    import torch
    from aqlm.utils import pack_int_data

    generator = torch.Generator().manual_seed(seed)
    layer = aqlm.QuantizedLinear(in_features, out_features, in_group_size=8, out_group_size=1,
                                 num_codebooks=num_codebooks, nbits_per_codebook=nbits, bias=False, dtype=dtype)
    codes = torch.randint(0, 2**nbits, layer.codes.shape, generator=generator, dtype=torch.int64)
    layer.codes.data = pack_int_data(codes, nbits)
    layer.codebooks.data = (torch.randn(layer.codebooks.shape, generator=generator) * 0.05).to(dtype)
    layer.scales.data = (torch.rand(layer.scales.shape, generator=generator) + 0.5).to(dtype)
    return layer.requires_grad_(False)


def rel(actual, expected) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def main(argv=None) -> int:
    import torch
    from aqlm.utils import _dequantize_weight, unpack_int_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--layouts", default=",".join(f"{m}x{b}" for m, b in LAYOUTS), help="e.g. 2x8,1x16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    rows = []
    layouts = [tuple(map(int, text.split("x"))) for text in args.layouts.split(",")]
    for num_codebooks, nbits in layouts:
        for in_features, out_features in SHAPES:
            for dtype in (torch.float16, torch.bfloat16):
                row = dict(layout=f"{num_codebooks}x{nbits}", in_features=in_features, out_features=out_features,
                           dtype=str(dtype).replace("torch.", ""))
                try:
                    layer = random_layer(in_features, out_features, num_codebooks, nbits, dtype).cuda()
                    weight = _dequantize_weight(unpack_int_data(layer.codes, nbits), layer.codebooks.float(),
                                                layer.scales.float())
                    for batch in (1, 64):
                        x = torch.randn(batch, in_features, device="cuda", dtype=dtype, requires_grad=True)
                        got = layer(x)  # aqlm's own kernel choice (gemv_op None: prepare_matmul_op)
                        grad_out = torch.randn_like(got)
                        got.backward(grad_out)
                        expected = x.detach().float() @ weight.T
                        expected_grad = grad_out.float() @ weight
                        row[f"rel_error_rows{batch}"] = rel(got.detach().float(), expected)
                        row[f"rel_error_grad_rows{batch}"] = rel(x.grad.float(), expected_grad)
                    row["kernels"] = [getattr(op, "__name__", type(op).__name__) for op in (layer.gemv_op, layer.gemm_op)]
                except Exception as exc:  # a layout a kernel refuses is a result too
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    row["traceback"] = traceback.format_exc()[-800:]
                rows.append(row)
                print({k: v for k, v in row.items() if k != "traceback"}, flush=True)
    record = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "aqlm": __import__("importlib.metadata").metadata.version("aqlm"), "rows": rows}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
