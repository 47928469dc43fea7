"""``qadapt matrix``: the declared capability table, and ``--verify`` to check it on this machine."""

from __future__ import annotations

import json
import sys

from .capabilities import METHODS, OPERATIONS
from .errors import QadaptError

#: option sets the matrix shows and verifies, per backend (others: the defaults)
VARIANTS = {
    "bnb": [{"bits": 4}, {"bits": 8}],
    "torchao": [{"scheme": "int8_weight_only"}, {"scheme": "int4_weight_only"}],
    "aqlm": [{"num_codebooks": 2, "nbits_per_codebook": 8}, {"num_codebooks": 1, "nbits_per_codebook": 8},
             {"num_codebooks": 1, "nbits_per_codebook": 16}],
    "inc": [{"algorithm": "rtn", "bits": 4}],
}

#: option sets verified only where a CUDA GPU is present (and shown in the declared table everywhere)
GPU_VARIANTS = {
    "gptq": [{"kernel": "marlin", "dtype": "float16"}],
    "awq": [{"kernel": "marlin", "dtype": "float16"}],
}

#: (backend, machine) pairs with no record by design, and why (shown in docs/compatibility.md)
NOT_RUN_ON = {
    ("inc", "gpu"): "INC's weight-only layers are CPU code (its FP8 path needs Intel Gaudi)",
}

#: checkpoints made on another machine (tests/data, relative to the repository root), for backends whose quantizer
#: cannot run here: the adapter cells are verified on them instead (AWQ's scale search is CUDA-only).
CHECKPOINTS = {"awq": "tests/data/awq-tiny"}


def variants(name: str) -> list[dict]:
    """The option sets of ``name`` the matrix covers: its VARIANTS (else its defaults), then its GPU_VARIANTS."""
    return VARIANTS.get(name, [{}]) + GPU_VARIANTS.get(name, [])


def declared_rows(names=None) -> list[dict]:
    from .plugins import backends

    rows = []
    for name, registration in backends().items():
        if names and name not in names:
            continue
        backend = registration.backend
        for options in variants(name):
            try:
                resolved = backend.validate_options(options)
            except QadaptError:
                if options in GPU_VARIANTS.get(name, []):
                    continue  # e.g. a GPU-only kernel on a CPU machine: declared only where it can be chosen
                raise
            table = backend.capabilities(resolved)
            for method in METHODS:
                for operation in OPERATIONS:
                    cell = table[(method, operation)]
                    rows.append({"backend": name, "options": options, "method": method, "operation": operation,
                                 "supported": cell.supported, "reason": cell.reason, "hint": cell.hint})
    return rows


def verify(names=None) -> dict:
    """Run :func:`qadapt.conformance.check_backend` for every backend that can run here.

    The record holds what ``docs/compatibility.md`` is rendered from (``python -m qadapt.compat_docs``): the machine,
    the versions, each backend's environment check, the declared table (with reasons) and every cell's outcome.
    """
    import datetime
    import importlib.metadata
    import os
    import platform
    import time

    import torch

    from .conformance import check_backend
    from .plugins import backends

    cuda = torch.cuda.is_available()
    started = time.monotonic()
    versions = {}
    for package in ("torch", "transformers", "peft"):
        versions[package] = importlib.metadata.version(package)
    results = []
    environments = {}
    for name, registration in backends().items():
        if names and name not in names:
            continue
        backend = registration.backend
        versions[backend.distribution or name] = backend.library_version()
        env = backend.check_environment()
        environments[name] = {"ok": env.ok, "version": env.version, "reason": env.reason, "hint": env.hint}
        for options in variants(name):
            if not env.ok:
                results.append({"backend": name, "options": options, "outcome": "unavailable", "detail": env.reason})
                continue
            if options in GPU_VARIANTS.get(name, []) and not cuda:
                results.append({"backend": name, "options": options, "outcome": "unavailable",
                                "detail": "verified only on a CUDA GPU"})
                continue
            try:
                calibration = None
                if backend.needs_calibration(backend.validate_options(options)):
                    calibration = _calibration()
                cells = check_backend(name, options, calibration=calibration)
                source = {}
                checkpoint = CHECKPOINTS.get(name)
                if (checkpoint and os.path.exists(checkpoint) and cells
                        and all(cell.outcome == "unavailable" for cell in cells)):
                    # quantizing cannot run here, but adapters on a checkpoint made elsewhere can be checked
                    source = {"source": f"the stored checkpoint {checkpoint} (quantizing is unavailable here: "
                                        f"{cells[0].detail})"}
                    cells = check_backend(name, options, model_factory=lambda: checkpoint)
            except Exception as exc:
                results.append({"backend": name, "options": options, "outcome": "failed", "detail": f"{type(exc).__name__}: {exc}"})
                continue
            for cell in cells:
                results.append({**cell.to_dict(), "options": options, **source})

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 1),
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "versions": versions, "environments": environments, "declared": declared_rows(names),
            "results": results}


def _calibration():
    """Calibration batches for backends that need them: the test suite's, cut from local text (no downloads)."""
    from . import toy

    return toy.token_batches(toy.build_tokenizer(), batch_size=2, seq_len=32, count=4)


def run(args) -> int:
    if args.verify:
        outcome = verify(args.backend)
        outcome["command"] = " ".join(["qadapt", "matrix", "--verify"] + [f"--backend {b}" for b in args.backend or ()])
        failed = [r for r in outcome["results"] if r["outcome"].startswith("failed")]
        if args.output:
            with open(args.output, "w") as handle:
                handle.write(_compact_json(outcome))
        if args.json:
            json.dump(outcome, sys.stdout, indent=2, default=str)
            print()
        else:
            for row in outcome["results"]:
                opts = ",".join(f"{k}={v}" for k, v in row["options"].items())
                print(f"{row['backend']:<8} {opts:<26} {row.get('method', '-'):<8} {row.get('operation', '-'):<18} "
                      f"{row['outcome']:<20} {row.get('detail', '')}")
            print(f"\n{len(outcome['results'])} checks, {len(failed)} failed")
        return 1 if failed else 0
    rows = declared_rows(args.backend)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(render_table(rows))
    return 0


def _compact_json(record: dict) -> str:
    """JSON with one list item per line: small files whose diffs show which cell changed."""
    parts = []
    for key, value in record.items():
        if isinstance(value, list):
            items = ",\n".join("    " + json.dumps(item, default=str) for item in value)
            parts.append(f"  {json.dumps(key)}: [\n{items}\n  ]" if value else f"  {json.dumps(key)}: []")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value, default=str)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def render_table(rows) -> str:
    """A Markdown table: one line per backend option set x method, one column per operation."""
    lines = ["| backend | options | method | " + " | ".join(OPERATIONS) + " |",
             "|---|---|---|" + "---|" * len(OPERATIONS)]
    grouped: dict = {}
    for row in rows:
        key = (row["backend"], json.dumps(row["options"], sort_keys=True), row["method"])
        grouped.setdefault(key, {})[row["operation"]] = row
    for (backend, options, method), cells in grouped.items():
        opts = ", ".join(f"{k}={v}" for k, v in json.loads(options).items()) or "defaults"
        marks = " | ".join("yes" if cells[op]["supported"] else "no" for op in OPERATIONS)
        lines.append(f"| {backend} | {opts} | {method} | {marks} |")
    return "\n".join(lines)
