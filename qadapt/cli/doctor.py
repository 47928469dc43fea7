"""``qadapt doctor``: what can run here, what cannot, and why."""

from __future__ import annotations

import importlib.metadata
import platform

from ..hf import is_installed


def findings() -> dict:
    report = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        report["torch"] = torch.__version__
        report["cuda"] = torch.cuda.is_available()
        if report["cuda"]:
            report["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # torch itself broken
        report["torch"] = f"not importable ({exc})"
    for package in ("transformers", "peft", "accelerate", "safetensors"):
        report[package] = importlib.metadata.version(package) if is_installed(package) else None
    from ..plugins import registrations, slow_plugins
    from .backends import backend_rows

    report["known_bad_installs"] = []
    for name, registration in registrations().items():
        try:
            found = [(str(problem), str(fix)) for problem, fix in registration.backend.install_problems()]
        except BaseException as exc:  # noqa: BLE001 - a broken plugin must not take the doctor down
            if isinstance(exc, KeyboardInterrupt):
                raise
            found = [(f"backend '{name}' could not check its install ({type(exc).__name__}: {exc})", "run with a fixed plugin")]
        report["known_bad_installs"] += [{"backend": name, "problem": problem, "fix": fix} for problem, fix in found]

    report["backends"] = backend_rows(check=True)
    report["slow_plugins"] = [{"plugin": name, "seconds": round(seconds, 2)} for name, seconds in slow_plugins().items()]
    return report


def add_parser(commands) -> None:
    commands.add_parser("doctor", help="torch/CUDA, each backend's import status, known bad installs")


def run(args=None) -> int:
    report = findings()
    print(f"python {report['python']} on {report['platform']}")
    print(f"torch {report['torch']}, CUDA {'yes: ' + report.get('gpu', '') if report.get('cuda') else 'no'}")
    print(", ".join(f"{p} {report[p]}" for p in ("transformers", "peft", "accelerate", "safetensors")))
    print()
    failed = False
    for row in report["backends"]:
        status = row.get("status")
        failed |= status == "failed"
        mark = {"ok": "ok  ", "unavailable": "no  ", "failed": "FAIL"}.get(status, "?   ")
        version = f" {row.get('library')} {row.get('library_version')}" if row.get("library_version") else ""
        print(f"[{mark}] {row['name']}{version}")
        if row.get("reason"):
            print(f"       {row.get('reason')}")
        if status == "failed":
            for line in row.get("traceback", "").strip().splitlines()[-3:]:
                print(f"       | {line}")
            print("       Fix or uninstall the plugin, or leave it out: QADAPT_LOAD_PLUGINS=<the plugins you want>")
        elif row.get("hint") and row.get("reason"):
            print(f"       {row['hint']}")
    if report["slow_plugins"]:
        print("\nSlow plugins (every qadapt command waits for them; QADAPT_LOAD_PLUGINS leaves them out):")
        for item in report["slow_plugins"]:
            print(f"  - {item['plugin']}: {item['seconds']:.1f} s to import and register")
    if report["known_bad_installs"]:
        print("\nKnown bad installs:")
        for item in report["known_bad_installs"]:
            print(f"  - {item['problem']}\n    fix: {item['fix']}")
    return 1 if failed or report["known_bad_installs"] else 0
