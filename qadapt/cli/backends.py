"""``qadapt backends``: every registered backend with its plugin, library version and whether it can run here."""

from __future__ import annotations

import json
import sys


def add_parser(commands) -> None:
    listing = commands.add_parser("backends", help="list backends: plugin, version, status")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--no-check", action="store_true", help="do not import backend libraries to check them")


def backend_rows(check: bool = True) -> list[dict]:
    """One row per registered backend (and per plugin that failed to load), as ``qadapt backends --json`` prints."""
    from ..plugins import failures, registrations

    rows = []
    for name, registration in registrations().items():
        try:
            rows.append(_row(name, registration, check))
        except BaseException as exc:  # noqa: BLE001 - a broken plugin gets a 'failed' row, never a crash
            if isinstance(exc, KeyboardInterrupt):
                raise
            rows.append({"name": name, "plugin": registration.plugin, "status": "failed",
                         "reason": f"the backend could not describe itself ({type(exc).__name__}: {exc})",
                         "hint": "run `qadapt doctor`"})
    for failure in failures():
        rows.append({"name": failure.plugin, "plugin": failure.plugin, "status": "failed",
                     "reason": failure.describe(),
                     "hint": "`qadapt doctor` shows where it failed", "traceback": failure.traceback})
    return rows


def _row(name, registration, check: bool) -> dict:
    from ..plugins import checked_environment

    backend = registration.backend
    row = {
        "name": name,
        "plugin": registration.plugin,
        "plugin_version": registration.plugin_version,
        "builtin": registration.builtin,
        "summary": str(backend.summary),
        "library": backend.distribution or None,
        "library_version": backend.library_version(),
        "options": {o.name: {"default": o.default, "choices": list(o.choices) if o.choices else None, "help": o.help}
                    for o in backend.options},
        # qadapt.load(device_map=, max_memory=, cpu_offload=), with the default options
        "placement": {key: {"supported": cell.supported, "reason": cell.reason}
                      for key, cell in backend.placement(backend.validate_options({})).items()},
    }
    if check:
        env = checked_environment(backend)
        broken = env.details.get("plugin_error") if isinstance(env.details, dict) else None
        row.update(status="failed" if broken else env.status, reason=env.reason, hint=env.hint)
    return row


def run(args) -> int:
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
