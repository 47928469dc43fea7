"""Running benchmark rows each in its own process, within a time budget, writing results as each row finishes.

Used by ``bench/peers.py`` and ``bench/generate.py``: the parent builds a model folder once (in a child), then runs
one child per row with what is left of ``--budget`` (a row that cannot start in time is recorded as skipped), and
rewrites the results file atomically after each row, so a time-out of the whole call keeps every finished row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def repo_on_path():
    """bench/ and the repo root (qadapt and qadapt_plugins from a checkout) importable."""
    for index, path in enumerate((HERE, os.path.dirname(HERE))):
        if path not in sys.path:
            sys.path.insert(index, path)


def run_child(script, extra, timeout, folder):
    """Run ``script`` with ``extra`` arguments in a fresh process; its JSON result (or an error row)."""
    result = os.path.join(folder, f"result-{time.monotonic_ns()}.json")
    command = [sys.executable, os.path.abspath(script), *extra, "--result", result]
    try:
        done = subprocess.run(command, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else str(exc.stdout or "")
        return {"error": f"timed out after {timeout:.0f} s", "output": output[-2000:]}
    row = {"error": f"exit status {done.returncode}, no result"}
    if os.path.exists(result):
        with open(result) as handle:
            row = json.load(handle)
        os.remove(result)
    if done.returncode and "error" not in row:
        row["error"] = f"exit status {done.returncode}"
    if "error" in row:
        row["output"] = (done.stdout + done.stderr)[-3000:]
    return row


def run_rows(script, names, common, budget, folder, out, meta, rows, report):
    """One child per row name (``--row NAME`` + ``common``), each given what is left of ``budget`` seconds."""
    started = time.monotonic()
    for name in names:
        left = budget - (time.monotonic() - started)
        if left < 20:
            rows.append({"setting": name, "error": f"skipped: the time budget ({budget:.0f} s) ran out"})
            continue
        rows.append({"setting": name, **run_child(script, ["--row", name, *common], left, folder)})
        report(rows[-1])
        write_results(out, meta, rows)
    write_results(out, meta, rows)


def write_results(out, meta, rows, table=None):
    """``{"meta", "rows", "table"}`` to ``out`` (written to a temporary name, then renamed into place)."""
    if not out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if table is None:  # the shape bench/plot_throughput.py reads
        table = [{"setting": r["setting"], "tokens_per_s": r.get("tokens_per_s"), "peak_gib": r.get("peak_gib")}
                 if "error" not in r else {"setting": r["setting"], "error": r["error"]} for r in rows]
    with open(out + ".tmp", "w") as handle:
        json.dump({"meta": meta, "rows": rows, "table": table}, handle, indent=1, default=str)
    os.replace(out + ".tmp", out)


def build_folder(size, folder):
    """The random Llama of ``size``'s shape (bench/train_throughput.py's SIZES) saved in bf16 (float32 on a CPU), with
    a tokenizer (unsloth and generate need one); the run's metadata."""
    import importlib.metadata as md
    import platform

    import torch

    repo_on_path()
    from train_throughput import SIZES, build_base

    from qadapt.testing import toy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    params = build_base(size, dtype, folder, device)
    toy.build_tokenizer().save_pretrained(folder)
    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "hqq", "torchao", "triton", "liger-kernel",
                 "cut-cross-entropy", "unsloth", "unsloth-zoo", "trl", "gptqmodel"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)",
            "shape": SIZES[size]["model"], "params": params, "batch": SIZES[size]["batch"], "seq": SIZES[size]["seq"],
            "dtype": str(dtype).replace("torch.", ""), "build_s": time.perf_counter() - start, "versions": versions}


def add_internal_arguments(parser):
    """``--summarize`` and the arguments the parent passes its children."""
    import argparse

    parser.add_argument("--summarize", nargs="+", metavar="RESULTS_JSON", help="print the table of results files")
    for name in ("--row", "--folder", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)


def dispatch(args, run_parent, run_row, markdown) -> int:
    """``--summarize`` prints the table; a child (``--build``/``--row``) writes its result, any failure recorded with
    its traceback; otherwise the parent runs."""
    if args.summarize:
        runs = []
        for path in args.summarize:
            with open(path) as handle:
                data = json.load(handle)
            runs.append((data["meta"], data["rows"]))
        print(markdown(runs))
        return 0
    if not (args.row or args.build):
        return run_parent(args)
    try:
        result = build_folder(args.size, args.folder) if args.build else run_row(args)
    except Exception as exc:  # recorded in the results file
        result = {"error": f"{type(exc).__name__}: {exc}"[:600], "traceback": traceback.format_exc()[-3000:]}
    with open(args.result, "w") as handle:
        json.dump(result, handle, default=str)
    return 0
