"""Attach overhead: qadapt.attach with every backend installed, against plain peft.get_peft_model.

PEFT's LoRA dispatch tries every backend it knows and imports each installed backend library on every attach.
qadapt asks only the dispatcher of the model's own backend. This measures, each in a fresh process (median of
--repeat runs), the wall time of the attach call alone on a 2-layer toy Llama:

  plain   peft.get_peft_model in an environment with NO backend installed (--plain-python)
  raw     peft.get_peft_model in this environment (every backend installed)
  qadapt  qadapt.attach in this environment, on a full-precision model and on bnb / hqq / torchao models

    python bench/attach_overhead.py --plain-python /path/to/venv-without-backends/bin/python
    (or: nox -s bench_attach, which builds both environments)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SNIPPET = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
mode, backend = sys.argv[1], sys.argv[2]
from qadapt.testing import toy
import peft, transformers
model = toy.build_model(num_hidden_layers=2)
if mode == "qadapt":
    import qadapt
    if backend != "none":
        model = qadapt.load(model, backend=backend)
    start = time.perf_counter()
    qadapt.attach(model, "lora", r=8)
else:
    start = time.perf_counter()
    peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "modules": len(sys.modules)}))
"""


def measure(python: str, mode: str, backend: str, repeat: int) -> dict:
    times, modules = [], 0
    for _ in range(repeat):
        out = subprocess.run([python, "-c", SNIPPET, mode, backend], capture_output=True, text=True, check=True,
                             env={"GPTQMODEL_CPU_WORKERS": "2", "PATH": "/usr/bin:/bin", "QADAPT_LOAD_PLUGINS": "bnb,hqq,torchao,gptq,awq,aqlm,eetq,inc"})
        result = json.loads(out.stdout.strip().splitlines()[-1])
        times.append(result["seconds"])
        modules = result["modules"]
    return {"median_s": statistics.median(times), "runs": times, "modules": modules}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plain-python", required=True, help="python of an environment with no backend installed")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = {"plain peft (no backends)": measure(args.plain_python, "peft", "none", args.repeat),
            "raw peft (all backends)": measure(sys.executable, "peft", "none", args.repeat)}
    for backend in ("none", "bnb", "hqq", "torchao"):
        rows[f"qadapt.attach ({backend}, all backends)"] = measure(sys.executable, "qadapt", backend, args.repeat)
    baseline = rows["plain peft (no backends)"]["median_s"]
    print(f"{'case':<38} {'median s':>9} {'x plain':>8} {'modules':>8}")
    for name, row in rows.items():
        print(f"{name:<38} {row['median_s']:>9.3f} {row['median_s'] / baseline:>8.2f} {row['modules']:>8}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    worst = max(v["median_s"] for k, v in rows.items() if k.startswith("qadapt")) / baseline
    print(f"\nworst qadapt/plain ratio: {worst:.2f} (target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
