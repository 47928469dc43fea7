"""Where one training step's GPU time goes, by kernel and by kind of work, and how much of the step the GPU was busy.

Used by ``bench/peers.py --profile-kernels``: ``torch.profiler`` over one step after the timed ones; every CUDA
kernel's time is summed by name and by a coarse kind (matmul, bitsandbytes/HQQ/torchao de-quantization, attention,
Triton (Liger, compiled code), other elementwise), with the number of launches. ``busy`` is the kernels' total time
over the step's wall time: well below 1, the step waits on the host (kernel launches, Python), not on the GPU.
"""

from __future__ import annotations

import collections

#: (kind, substrings of a kernel's name), first match wins; what is left is torch's elementwise kernels (``at::native``)
#: or, without ``void``/``at::`` in its name, a Triton kernel (Liger's, unsloth's, compiled code)
_KINDS = (
    ("dequantize", ("dequant", "Dequant", "kgemm_4bit", "hqq", "unpack", "int4", "_weight_int8")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas", "splitK")),
    ("copy / cast", ("copy", "Copy", "Memcpy", "Memset", "fill", "Fill")),
)


def _kind(name: str) -> str:
    for kind, keys in _KINDS:
        if any(key in name for key in keys):
            return kind
    return "torch elementwise" if ("at::" in name or name.startswith("void ")) else "triton"


def start():
    import torch

    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
    profiler.__enter__()
    return profiler


def stop_and_summarize(profiler, wall_s: float, top: int = 25) -> dict:
    """``{"wall_ms", "kernel_ms", "busy", "launches", "by_kind": [[kind, ms, launches]], "top": [[name, ms, n]],
    "host_top": [[op, self CPU ms under the profiler]]}``."""
    from torch.autograd import DeviceType

    profiler.__exit__(None, None, None)
    by_name, count, host = collections.Counter(), collections.Counter(), collections.Counter()
    for event in profiler.events():
        if event.is_user_annotation:  # ranges such as Optimizer.step, drawn on the GPU's timeline too
            continue
        if event.device_type == DeviceType.CUDA:  # a kernel, memcpy or memset as the GPU ran it
            by_name[event.name] += event.time_range.elapsed_us()
            count[event.name] += 1
        elif event.device_type == DeviceType.CPU:
            host[event.name] += event.self_cpu_time_total
    kinds, kind_count = collections.Counter(), collections.Counter()
    for name, us in by_name.items():
        kinds[_kind(name)] += us
        kind_count[_kind(name)] += count[name]
    total = sum(by_name.values())
    return {"wall_ms": wall_s * 1e3, "kernel_ms": total / 1e3, "busy": total / 1e3 / (wall_s * 1e3) if wall_s else None,
            "launches": sum(count.values()),
            "by_kind": [[k, round(us / 1e3, 2), kind_count[k]] for k, us in kinds.most_common()],
            "top": [[name[:120], round(us / 1e3, 2), count[name]] for name, us in by_name.most_common(top)],
            "host_top": [[name[:120], round(us / 1e3, 2)] for name, us in host.most_common(top)]}


def describe(kernels: dict, span: str, top: int) -> list[str]:
    """Log lines for :func:`stop_and_summarize`'s result: totals, the time by kind and the ``top`` kernels; ``span``
    names what ``wall_ms`` covered (a training step, a generation)."""
    lines = [f"  kernels: {kernels['kernel_ms']:.1f} ms in {kernels['launches']} launches, GPU busy "
             f"{kernels['busy']:.0%} of the {kernels['wall_ms']:.1f} ms {span}; by kind: "
             + ", ".join(f"{k} {ms:.1f} ms/{n}" for k, ms, n in kernels["by_kind"])]
    lines += [f"    {ms:8.2f} ms {n:6d}x  {name}" for name, ms, n in kernels["top"][:top]]
    return lines
