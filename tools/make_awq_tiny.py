"""Make qadapt_plugins/data/awq-tiny: a real AWQ checkpoint of qadapt.testing.toy's tiny Llama, quantized by gptqmodel on a CUDA GPU.

AWQ's activation-aware scale search runs only on CUDA, and CI has no GPU, so the CPU tests load this small checkpoint
(well under 2 MB). Re-make it on any CUDA machine with gptqmodel installed:

    python tools/make_awq_tiny.py qadapt_plugins/data/awq-tiny

It writes the checkpoint (AWQ "gemm" format, 4-bit, group size 64, zero points, float16, with the toy tokenizer) and
``reference.safetensors``: fixed ``input_ids``, the full-precision model's logits and the AWQ model's logits on the GPU.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(out: str) -> None:
    import torch
    from safetensors.torch import save_file

    import qadapt
    from qadapt.testing import toy

    assert torch.cuda.is_available(), "AWQ quantization needs a CUDA GPU"
    os.makedirs(out, exist_ok=True)
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(seed=0)
    batches = toy.token_batches(tokenizer, batch_size=4, seq_len=64, count=8, seed=0)
    ids = toy.token_batches(tokenizer, batch_size=2, seq_len=16, count=1, seed=1)[0]
    with torch.no_grad():
        float_logits = model(input_ids=ids).logits.float()
    start = time.time()
    awq = qadapt.load(model, "awq", calibration=batches, group_size=64, dtype="float16")
    seconds = time.time() - start
    backend = qadapt.get_backend("awq")
    backend.save(awq, out, backend.validate_options({"group_size": 64, "dtype": "float16"}))
    tokenizer.save_pretrained(out)
    with torch.no_grad():
        awq_logits = awq(input_ids=ids.to(awq.device)).logits.float().cpu()
    save_file(
        {"input_ids": ids.contiguous(), "float_logits": float_logits.contiguous(), "awq_logits_gpu": awq_logits.contiguous()},
        os.path.join(out, "reference.safetensors"),
    )
    info = {
        "made_by": "tools/make_awq_tiny.py",
        "device": torch.cuda.get_device_name(0),
        "quantize_seconds": round(seconds, 2),
        "torch": torch.__version__,
        "gptqmodel": backend.library_version(),
        "layer": type(awq.model.layers[0].self_attn.q_proj).__name__,
    }
    with open(os.path.join(out, "made.json"), "w") as handle:
        json.dump(info, handle, indent=2)
    print(json.dumps(info))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "awq-tiny"))
