#!/usr/bin/env bash
# The GPU checks recorded in docs/gpu-runs.md (CI has no GPU): the `pytest -m gpu` suite, and `qadapt matrix --verify`
# for each backend, whose records (<backend>-gpu.json) docs/compatibility.md is rendered from.
#
# Run from the repository root on a machine with a CUDA GPU, qadapt installed with the backends' libraries (and the
# kernels extra; a wheel install: remove the copy's qadapt/ and qadapt_plugins/ first, or the plugin guard refuses the
# wheel's entry points as another qadapt-lm than the one imported, and every backend test is skipped). The whole
# suite is long (on the H200, 2026-12-03: 6 of 37 tests finished in 290 s, torch.compile and CUDA graphs in most): split it with -k.
#     bash tests/gpu_checks.sh out/gpu            # then: cp out/gpu/*-gpu.json docs/matrix/
#     BACKENDS="gptq awq" bash tests/gpu_checks.sh out/gpu
# Writes into the folder given: device.txt, pytest-gpu.log, and per backend <backend>-gpu.json and matrix-<backend>.log.
# The pytest suite and the backends' matrix runs go in parallel (every model is a toy; the GPU has room for all).
# inc is left out: its weight-only layers are CPU code (FP8 needs Intel Gaudi), so its records are CPU runs only.
# Exit status: 0 when every part passed.
set -u
out=${1:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-4} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/device.txt" 2>&1
python3 - >> "$out/device.txt" <<'EOF'
import importlib.metadata as md, platform
names = ["torch", "transformers", "peft", "bitsandbytes", "hqq", "torchao", "gptqmodel", "aqlm", "neural-compressor-pt", "eetq",
         "liger-kernel", "cut-cross-entropy"]
found = {}
for name in names:
    try:
        found[name] = md.version(name)
    except md.PackageNotFoundError:
        found[name] = None
print("python", platform.python_version(), found)
EOF

python3 -m pytest -m gpu -v -rs -p no:cacheprovider -o addopts="" --durations=0 tests > "$out/pytest-gpu.log" 2>&1 &
pids=($!)
for backend in ${BACKENDS:-bnb hqq torchao gptq awq aqlm eetq}; do
    python3 -m qadapt matrix --verify --backend "$backend" --output "$out/$backend-gpu.json" \
        > "$out/matrix-$backend.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
exit $status
