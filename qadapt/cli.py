"""The ``qadapt`` command: backends, matrix, doctor, demo."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="qadapt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("backends", help="list backends: plugin, version, status")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--no-check", action="store_true", help="do not import backend libraries to check them")

    matrix = commands.add_parser("matrix", help="the capability table (backend x method x operation)")
    matrix.add_argument("--backend", action="append", help="only this backend (repeatable)")
    matrix.add_argument("--json", action="store_true")
    matrix.add_argument("--verify", action="store_true", help="run every combination available here and compare")
    matrix.add_argument("--output", help="with --verify: write the results as JSON to this file")

    commands.add_parser("doctor", help="torch/CUDA, each backend's import status, known bad installs")

    demo = commands.add_parser("demo", help="tiny offline run of every available backend: load, train, merge, save, reload")
    demo.add_argument("--backend", action="append", help="only this backend (repeatable)")
    demo.add_argument("--steps", type=int, default=8)

    args = parser.parse_args(argv)
    if args.command == "backends":
        return _backends(args)
    if args.command == "matrix":
        from .matrix import run as run_matrix

        return run_matrix(args)
    if args.command == "doctor":
        from .doctor import run as run_doctor

        return run_doctor()
    from .demo import run as run_demo

    return run_demo(args.backend, steps=args.steps)


def backend_rows(check: bool = True) -> list[dict]:
    from .plugins import backends, failures

    rows = []
    for name, registration in backends().items():
        backend = registration.backend
        row = {
            "name": name,
            "plugin": registration.plugin,
            "plugin_version": registration.plugin_version,
            "summary": backend.summary,
            "library": backend.distribution or None,
            "library_version": backend.library_version(),
            "options": {o.name: {"default": o.default, "choices": list(o.choices) if o.choices else None, "help": o.help}
                        for o in backend.options},
        }
        if check:
            env = backend.check_environment()
            row.update(status=env.status, reason=env.reason, hint=env.hint)
        rows.append(row)
    for failure in failures():
        rows.append({"name": failure.plugin, "plugin": failure.plugin, "status": "failed",
                     "reason": f"plugin failed to {failure.stage}: {failure.error}", "hint": "run `qadapt doctor`"})
    return rows


def _backends(args) -> int:
    rows = backend_rows(check=not args.no_check)
    if args.json:
        json.dump(rows, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(f"{'backend':<10} {'status':<12} {'library':<24} reason")
    for row in rows:
        library = f"{row.get('library') or '-'} {row.get('library_version') or ''}".strip()
        print(f"{row['name']:<10} {row.get('status', '?'):<12} {library:<24} {row.get('reason', '')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
