"""``qadapt matrix``: the declared capability table, and ``--verify`` to check it on this machine."""

from __future__ import annotations

import json
import sys

from .capabilities import METHODS, OPERATIONS

#: option sets the matrix shows and verifies, per backend (others: the defaults)
VARIANTS = {
    "bnb": [{"bits": 4}, {"bits": 8}],
    "torchao": [{"scheme": "int8_weight_only"}, {"scheme": "int4_weight_only"}],
    "aqlm": [{"num_codebooks": 2, "nbits_per_codebook": 8}, {"num_codebooks": 1, "nbits_per_codebook": 8},
             {"num_codebooks": 1, "nbits_per_codebook": 16}],
    "inc": [{"algorithm": "rtn", "bits": 4}],
}


def declared_rows(names=None) -> list[dict]:
    from .plugins import backends

    rows = []
    for name, registration in backends().items():
        if names and name not in names:
            continue
        backend = registration.backend
        for options in VARIANTS.get(name, [{}]):
            resolved = backend.validate_options(options)
            table = backend.capabilities(resolved)
            for method in METHODS:
                for operation in OPERATIONS:
                    cell = table[(method, operation)]
                    rows.append({"backend": name, "options": options, "method": method, "operation": operation,
                                 "supported": cell.supported, "reason": cell.reason, "hint": cell.hint})
    return rows


def verify(names=None) -> dict:
    """Run :func:`qadapt.conformance.check_backend` for every backend that can run here."""
    import importlib.metadata
    import platform

    from .conformance import check_backend
    from .plugins import backends

    versions = {}
    for package in ("torch", "transformers", "peft"):
        versions[package] = importlib.metadata.version(package)
    results = []
    for name, registration in backends().items():
        if names and name not in names:
            continue
        backend = registration.backend
        versions[backend.distribution or name] = backend.library_version()
        env = backend.check_environment()
        for options in VARIANTS.get(name, [{}]):
            if not env.ok:
                results.append({"backend": name, "options": options, "outcome": "unavailable", "detail": env.reason})
                continue
            try:
                cells = check_backend(name, options)
            except Exception as exc:
                results.append({"backend": name, "options": options, "outcome": "failed", "detail": f"{type(exc).__name__}: {exc}"})
                continue
            for cell in cells:
                results.append({**cell.to_dict(), "options": options})
    import torch

    return {"machine": {"python": platform.python_version(), "cuda": torch.cuda.is_available(),
                        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "versions": versions, "results": results}


def run(args) -> int:
    if args.verify:
        outcome = verify(args.backend)
        failed = [r for r in outcome["results"] if r["outcome"].startswith("failed")]
        if args.output:
            with open(args.output, "w") as handle:
                json.dump(outcome, handle, indent=2, default=str)
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
