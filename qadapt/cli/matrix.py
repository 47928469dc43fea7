"""``qadapt matrix``: the declared capability table, and ``--verify`` to check it on this machine."""

from __future__ import annotations

import json
import sys

from ..capabilities import OPERATIONS
from ..testing.matrix import declared_architecture_rows, declared_rows, verify
from . import check_backend_names


def add_parser(commands) -> None:
    matrix = commands.add_parser("matrix", help="the capability table (backend x method x operation)")
    matrix.add_argument("--backend", action="append", help="only this backend (repeatable)")
    matrix.add_argument("--json", action="store_true")
    matrix.add_argument("--verify", action="store_true", help="run every combination available here and compare")
    matrix.add_argument("--output", help="with --verify: write the results as JSON to this file")
    matrix.add_argument("--architecture", action="append",
                        help="run on this architecture of the panel (repeatable; 'all': the whole panel) instead of the "
                             "toy Llama; without --verify: what each backend declares it cannot quantize there")


def run(args) -> int:
    check_backend_names(args.backend)
    architectures = _architectures(args.architecture)
    if args.verify:
        outcome = verify(args.backend, architectures)
        outcome["command"] = " ".join(["qadapt", "matrix", "--verify"] + [f"--backend {b}" for b in args.backend or ()]
                                      + [f"--architecture {a}" for a in args.architecture or ()])
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
                arch = f"{row.get('architecture', '-'):<10} " if architectures else ""
                print(f"{row['backend']:<8} {opts:<26} {arch}{row.get('method', '-'):<8} {row.get('operation', '-'):<18} "
                      f"{row['outcome']:<20} {row.get('detail', '')}")
            print(f"\n{len(outcome['results'])} checks, {len(failed)} failed")
        if not outcome["results"]:
            print("qadapt matrix: nothing was checked (no backend is registered here)", file=sys.stderr)
            return 1
        return 1 if failed else 0
    if architectures:
        rows = declared_architecture_rows(args.backend, architectures)
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            print()
            return 0
        for row in rows:
            opts = ",".join(f"{k}={v}" for k, v in row["options"].items()) or "defaults"
            print(f"{row['backend']:<8} {opts:<26} {row['architecture']:<10} {'yes' if row['supported'] else 'no':<4} "
                  f"{row['reason']}")
        return 0
    rows = declared_rows(args.backend)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    print(render_table(rows))
    return 0


def _architectures(given):
    if not given:
        return None
    from ..testing import panel

    names = list(panel.NAMES) if "all" in given else list(given)
    for name in names:
        panel.config(name)  # an unknown name is refused before any work
    return names


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
